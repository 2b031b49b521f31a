//! TLS both ways: termination with HTTP/2 and certificate reload; backends behind a private CA
//! that demand a client certificate.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_gateway::server;
use gatehouse_gateway::settings::TlsSettings;
use gatehouse_simulator::{Simulator, SimulatorConfig, SimulatorState};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::json;

use crate::harness::*;

/// A certificate authority that signs leaf certificates.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Authority { cert, key }
    }

    /// (certificate PEM, private key PEM) for `names`.
    fn issue(&self, names: &[&str]) -> (String, String) {
        self.issue_until(names, CertificateParams::default().not_after)
    }

    /// (certificate PEM, private key PEM) for `names`, valid until `not_after`.
    fn issue_until(&self, names: &[&str], not_after: time::OffsetDateTime) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// When the authority's own certificate expires, Unix seconds.
    fn not_after(&self) -> i64 {
        self.cert.params().not_after.unix_timestamp()
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

fn client_trusting(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_termination_speaks_http2_and_reloads_a_renewed_certificate() {
    let sim = simulator("tls-backend").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let old_ca = Authority::new("Old CA");
    let first_expiry = time::macros::datetime!(2027-02-01 00:00:00 UTC);
    let (cert, key) = old_ca.issue_until(&["localhost", "127.0.0.1"], first_expiry);
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let tls = TlsSettings {
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        reload_interval_seconds: 1,
    };
    let (listening, _task) = server::spawn(
        Arc::clone(&gw.gateway),
        "127.0.0.1:0".parse().unwrap(),
        Some(tls),
    )
    .await
    .unwrap();
    let url = format!(
        "https://127.0.0.1:{}{}",
        listening.addr.port(),
        chat_path("gpt-4o")
    );

    // A chat call from a client that trusts only `ca`.
    let call_trusting = |ca: &Authority| {
        client_trusting(&ca.pem())
            .post(&url)
            .header("api-key", KEY)
            .json(&chat(None, false))
            .send()
    };
    let response = call_trusting(&old_ca).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "ALPN must offer h2"
    );
    let expiry = |at: time::OffsetDateTime| {
        format!(
            "\ngatehouse_tls_certificate_expiry_timestamp_seconds{{certificate=\"listener\"}} {}\n",
            at.unix_timestamp()
        )
    };
    let text = gw.metrics().await;
    assert!(text.contains(&expiry(first_expiry)), "{text}");

    // Renew with a certificate from another CA; the running gateway picks it up.
    let new_ca = Authority::new("New CA");
    let renewed_expiry = time::macros::datetime!(2027-05-01 00:00:00 UTC);
    let (cert, key) = new_ca.issue_until(&["localhost", "127.0.0.1"], renewed_expiry);
    std::fs::write(&key_file, key).unwrap();
    std::fs::write(&cert_file, cert).unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let attempt = call_trusting(&new_ca).await;
        if attempt.is_ok_and(|r| r.status() == 200) {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the renewed certificate was not served");
    let text = gw.metrics().await;
    assert!(text.contains(&expiry(renewed_expiry)), "{text}");
    let old = call_trusting(&old_ca).await;
    assert!(old.is_err(), "the old certificate must be gone");

    // A certificate written half way: the renewed one is still served, and a gauge says so.
    std::fs::write(&cert_file, "-----BEGIN CERTIFICATE-----\nAAAA").unwrap();
    assert!(
        reload_failing_reads(&gw, 1).await,
        "the failed reload is not shown"
    );
    let still = call_trusting(&new_ca).await.unwrap();
    assert_eq!(still.status(), 200);
    let text = gw.metrics().await;
    assert!(
        text.contains(&expiry(renewed_expiry)),
        "the expiry of the chain still served: {text}"
    );

    // The next renewal that loads clears it.
    let (cert, key) = new_ca.issue(&["localhost", "127.0.0.1"]);
    std::fs::write(&key_file, key).unwrap();
    std::fs::write(&cert_file, cert).unwrap();
    assert!(
        reload_failing_reads(&gw, 0).await,
        "a renewal that loads clears the gauge"
    );
    listening.shutdown(Duration::from_secs(1));
}

/// Whether `gatehouse_tls_reload_failing` reads `value` within 5 s (the certificate watcher
/// checks every second).
async fn reload_failing_reads(gw: &TestGateway, value: u64) -> bool {
    let line = format!("\ngatehouse_tls_reload_failing {value}\n");
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if gw.metrics().await.contains(&line) {
            return true;
        }
    }
    false
}

/// A simulator behind TLS with a certificate from `ca`, requiring client certificates from `client_ca`.
async fn tls_simulator(
    ca: &Authority,
    client_ca: &Authority,
) -> (std::net::SocketAddr, SimulatorState) {
    server::install_crypto_provider();
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    let certs = rustls_pemfile::certs(&mut cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key.as_bytes())
        .unwrap()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca_cert in rustls_pemfile::certs(&mut client_ca.pem().as_bytes()) {
        roots.add(ca_cert.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let state = SimulatorState::new(SimulatorConfig {
        id: "private".into(),
        ..SimulatorConfig::default()
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Simulator::router(state.clone());
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
    tokio::spawn(axum_server::from_tcp_rustls(listener, tls).serve(app.into_make_service()));
    (addr, state)
}

#[tokio::test]
async fn backends_behind_a_private_ca_with_mutual_tls() {
    let server_ca = Authority::new("Private server CA");
    let client_ca = Authority::new("Private client CA");
    let (addr, state) = tls_simulator(&server_ca, &client_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("private-ca.pem");
    std::fs::write(&ca_file, server_ca.pem()).unwrap();
    let (client_cert, client_key) = client_ca.issue(&["gatehouse-gateway"]);
    let identity_file = dir.path().join("client.pem");
    std::fs::write(&identity_file, format!("{client_cert}{client_key}")).unwrap();

    let endpoint = format!("https://127.0.0.1:{}", addr.port());
    let mut with_identity = member("private", &endpoint, 1);
    with_identity["tls"] = json!({"ca_file": ca_file, "client_identity_file": identity_file});
    let mut without_identity = member("anonymous", &endpoint, 1);
    without_identity["tls"] = json!({"ca_file": ca_file});
    let gw = TestGateway::start(snapshot(
        1,
        json!([
            {"id": "mtls", "deployments": ["gpt-4o"], "members": [with_identity]},
            {"id": "no-identity", "deployments": ["gpt-4o-mini"], "members": [without_identity]},
        ]),
    ))
    .await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(state.hits(), 1);
    // Without the client certificate the handshake fails: the member is unavailable.
    let response = gw
        .post(&chat_path("gpt-4o-mini"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(response, 503).await;
    assert_eq!(state.hits(), 1);
}

/// A client certificate renewed on disk is presented without a push: the member's client is
/// built again from it, and the member, set aside while the old one was refused, is tried at once.
/// A file that does not build keeps the running client.
#[tokio::test]
async fn a_renewed_client_identity_is_presented_without_a_push() {
    let server_ca = Authority::new("Private server CA");
    let client_ca = Authority::new("Private client CA");
    let (addr, state) = tls_simulator(&server_ca, &client_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("private-ca.pem");
    std::fs::write(&ca_file, server_ca.pem()).unwrap();
    // First an identity the member does not trust (as an expired one would be).
    let stranger = Authority::new("Some other CA");
    let (cert, key) = stranger.issue(&["gatehouse-gateway"]);
    let identity_file = dir.path().join("client.pem");
    std::fs::write(&identity_file, format!("{cert}{key}")).unwrap();
    let mut private = member("private", &format!("https://127.0.0.1:{}", addr.port()), 1);
    private["tls"] = json!({"ca_file": ca_file, "client_identity_file": identity_file});
    // Another member's key file, removed before the renewal: a push would be refused for it,
    // the renewal is not.
    let key_file = dir.path().join("other-key");
    std::fs::write(&key_file, "other-key").unwrap();
    let mut other = member("other", "http://127.0.0.1:9", 1);
    other["credential"] =
        json!({"type": "api_key", "secret": format!("file:{}", key_file.display())});
    let gw = TestGateway::start(snapshot(
        1,
        json!([
            {"id": "mtls", "deployments": ["gpt-4o"], "members": [private]},
            {"id": "other", "deployments": ["gpt-4o-mini"], "members": [other]},
        ]),
    ))
    .await;
    std::fs::remove_file(&key_file).unwrap();
    let call = || async {
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap()
    };
    azure_error(call().await, 503).await;
    assert_eq!(
        gw.gateway.reload_backend_tls().await,
        Ok(false),
        "nothing changed"
    );

    // Half a certificate: refused, the running client kept.
    std::fs::write(&identity_file, "-----BEGIN CERTIFICATE-----\nAAAA").unwrap();
    let problems = gw.gateway.reload_backend_tls().await.unwrap_err();
    assert!(problems.contains("pools[0].members[0].tls"), "{problems}");
    assert!(
        gw.metrics()
            .await
            .contains("\ngatehouse_backend_tls_reload_failing 1\n")
    );

    let renewed_expiry = time::macros::datetime!(2027-04-01 00:00:00 UTC);
    let (cert, key) = client_ca.issue_until(&["gatehouse-gateway"], renewed_expiry);
    std::fs::write(&identity_file, format!("{cert}{key}")).unwrap();
    assert_eq!(gw.gateway.reload_backend_tls().await, Ok(true));
    let text = gw.metrics().await;
    assert!(text.contains("\ngatehouse_backend_tls_reload_failing 0\n"));
    // The renewed certificate's expiry, and the CA file's; none for the member without TLS files.
    for (file, not_after) in [
        ("client_identity", renewed_expiry.unix_timestamp()),
        ("ca", server_ca.not_after()),
    ] {
        let line = format!(
            "\ngatehouse_backend_tls_certificate_expiry_timestamp_seconds{{pool=\"mtls\",backend=\"private\",file=\"{file}\"}} {not_after}\n"
        );
        assert!(text.contains(&line), "{line}: {text}");
    }
    assert!(!text.contains("backend=\"other\",file="), "{text}");
    let response = call().await;
    assert_eq!(
        response.status(),
        200,
        "the renewed identity is presented at once"
    );
    assert_eq!(state.hits(), 1);
    assert_eq!(gw.gateway.runtime().snapshot.version, 1);
    assert_eq!(gw.gateway.reload_backend_tls().await, Ok(false));
}

/// A `ca_file` that holds no PEM certificate (an empty file, a DER file, a key) is refused with
/// the snapshot, naming the member's `tls` and the file: taken, it would make every call to the
/// member fail its TLS handshake.
#[tokio::test]
async fn a_ca_file_without_a_pem_certificate_is_refused_with_the_snapshot() {
    let sim = simulator("ca-file").await;
    let pool = |member: serde_json::Value| json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member]}]);
    let gw = TestGateway::start(snapshot(1, pool(member("a", &sim.url(), 1)))).await;
    let ca = Authority::new("Some CA");
    let (_, key) = ca.issue(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in [
        ("empty.pem", Vec::new()),
        ("ca.der", ca.cert.der().to_vec()),
        ("key.pem", key.into_bytes()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        let mut private = member("private", "https://127.0.0.1:1", 1);
        private["tls"] = json!({"ca_file": path});
        let response = gw.push_config(&snapshot(2, pool(private))).await;
        let message = azure_error(response, 422).await;
        assert!(
            message.starts_with("pools[0].members[0].tls: ")
                && message.contains(&format!("`{}`", path.display()))
                && message.contains("PEM certificate"),
            "{name}: {message}"
        );
    }
    assert_eq!(gw.gateway.runtime().snapshot.version, 1, "nothing changed");
}

/// A connection still in its TLS handshake when shutdown begins carries no call: it is closed at
/// once, instead of holding the gateway (and so the audit queue's last flush) until its
/// handshake times out, 10 s later; the drain here is a minute.
#[tokio::test]
async fn a_connection_in_its_tls_handshake_at_shutdown_is_closed_at_once() {
    use tokio::io::AsyncReadExt as _;

    let gw = TestGateway::start(snapshot(1, json!([]))).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (cert, key) = Authority::new("CA").issue(&["localhost", "127.0.0.1"]);
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let tls = TlsSettings {
        cert_file,
        key_file,
        reload_interval_seconds: 10,
    };
    let (listening, task) = server::spawn(
        Arc::clone(&gw.gateway),
        "127.0.0.1:0".parse().unwrap(),
        Some(tls),
    )
    .await
    .unwrap();
    // A client that connects and sends no ClientHello: the server waits in the handshake.
    let mut socket = tokio::net::TcpStream::connect(listening.addr)
        .await
        .unwrap();
    for _ in 0..500 {
        if listening.handle.connection_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(listening.handle.connection_count(), 1, "the server took it");

    listening.shutdown(Duration::from_secs(60));
    // Bounded below the handshake timeout: a server that waits for the handshake ends only then.
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server stops without waiting for the handshake")
        .unwrap()
        .unwrap();
    assert_eq!(listening.handle.connection_count(), 0);
    let mut buffer = [0_u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer))
        .await
        .expect("the connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// A backend over TLS that speaks HTTP/2 and answers every call with a whole `chat.completion`
/// whose length it declares, but ends the stream (END_STREAM) in a frame of its own, a moment
/// after the last byte, as servers behind some proxies do.
async fn http2_backend_ending_apart(ca: &Authority) -> std::net::SocketAddr {
    use axum::response::IntoResponse as _;
    server::install_crypto_provider();
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    let certs = rustls_pemfile::certs(&mut cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key.as_bytes())
        .unwrap()
        .unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
        "model": "gpt-4o-2024-11-20",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Oslo."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}})
    .to_string();
    let app = axum::Router::new().fallback(move |version: http::Version| {
        let answer = answer.clone();
        async move {
            assert_eq!(
                version,
                http::Version::HTTP_2,
                "the gateway speaks HTTP/2 here"
            );
            let length = answer.len();
            let body = futures::stream::unfold(0, move |step| {
                let answer = answer.clone();
                async move {
                    match step {
                        0 => Some((Ok::<_, std::io::Error>(bytes::Bytes::from(answer)), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            None
                        }
                        _ => None,
                    }
                }
            });
            (
                [
                    (http::header::CONTENT_TYPE, "application/json".to_owned()),
                    (http::header::CONTENT_LENGTH, length.to_string()),
                ],
                axum::body::Body::from_stream(body),
            )
                .into_response()
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
    tokio::spawn(axum_server::from_tcp_rustls(listener, tls).serve(app.into_make_service()));
    addr
}

/// An answer whose every declared byte reached the client is complete, although the backend
/// (over HTTP/2) ended its stream a moment later: the record is not marked client-aborted.
#[tokio::test]
async fn an_http2_backend_that_ends_its_stream_after_the_last_byte_is_not_a_client_abort() {
    let ca = Authority::new("HTTP/2 backend CA");
    let addr = http2_backend_ending_apart(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut backend = member("h2", &format!("https://127.0.0.1:{}", addr.port()), 1);
    backend["tls"] = json!({"ca_file": ca_file});
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [backend]}]),
    ))
    .await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "Oslo.");
    let record = &gw.records(1).await[0];
    assert!(!record.client_aborted, "{record:?}");
    assert_eq!(record.last_error_reason, None, "{record:?}");
    assert_eq!(record.usage.as_ref().map(|u| u.total_tokens), Some(14));
}
