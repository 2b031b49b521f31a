//! When certificates expire: the earliest `notAfter` of the certificates a PEM file holds, for
//! the gauges that warn before the gateway's own certificate, a member's client certificate or a
//! member's private CA runs out (`gatehouse_tls_certificate_expiry_timestamp_seconds`,
//! `gatehouse_backend_tls_certificate_expiry_timestamp_seconds`).
//!
//! The earliest of a file's certificates, as a TLS prober reports a chain's earliest expiry: a
//! chain fails when any of its certificates has expired, and a CA file's oldest certificate is
//! the first that a member's chain may stop verifying against.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use x509_cert::der::Decode as _;

/// The earliest `notAfter` (Unix seconds) of the PEM certificates in `pem`; `None` when it
/// holds none that parse (a certificate that does not parse is left out: the TLS stack refuses
/// the file on its own, with its own error).
pub fn earliest_expiry(pem: &[u8]) -> Option<i64> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .filter_map(|der| x509_cert::Certificate::from_der(&der).ok())
        .filter_map(|certificate| {
            let not_after = certificate.tbs_certificate.validity.not_after;
            i64::try_from(not_after.to_unix_duration().as_secs()).ok()
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate, as PEM, valid until `not_after`.
    fn certificate_until(not_after: time::OffsetDateTime) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["gatehouse.test".to_owned()]).unwrap();
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn the_earliest_expiry_of_a_file_is_read() {
        let early = time::macros::datetime!(2027-03-01 12:00:00 UTC);
        let late = time::macros::datetime!(2031-06-30 00:00:00 UTC);
        let one = certificate_until(late);
        assert_eq!(earliest_expiry(one.as_bytes()), Some(late.unix_timestamp()));
        // A chain, or a CA bundle, with a key between: the earliest counts.
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let both = [certificate_until(late), key, certificate_until(early)].concat();
        assert_eq!(
            earliest_expiry(both.as_bytes()),
            Some(early.unix_timestamp())
        );
    }

    #[test]
    fn a_file_without_a_certificate_has_no_expiry() {
        assert_eq!(earliest_expiry(b""), None);
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert_eq!(earliest_expiry(key.as_bytes()), None);
        // A certificate block whose content is not a certificate.
        let bogus = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(earliest_expiry(bogus.as_bytes()), None);
    }
}
