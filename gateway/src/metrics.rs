//! Prometheus metrics, exposed at `/metrics` in the text exposition format.
//!
//! Labels are bounded by configuration: a deployment label is only set for deployments a pool
//! serves, so that a client cannot grow the label space by inventing names.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a finished call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Operation id or `unknown`.
    pub operation: String,
    /// Served deployment or `none`.
    pub deployment: String,
    /// Member of the final attempt or `none`.
    pub backend: String,
    /// Status code sent.
    pub status: u16,
}

/// Labels of a latency observation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// Operation id or `unknown`.
    pub operation: String,
}

/// Labels of a backend attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// Member id.
    pub backend: String,
    /// `answered`, `throttled`, `server_error`, `connect_failed`, `response_timeout`,
    /// `request_failed`, `credential_failed`, `refused_gateway`.
    pub outcome: String,
}

/// Labels of an answer cut after it began.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    /// Member id.
    pub backend: String,
    /// `backend_stream_failed` (the member's answer broke) or `response_idle_timeout` (the member
    /// stayed silent too long).
    pub reason: String,
}

/// Labels of one of the gateway's own certificates.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `listener`: the chain `server.tls` serves.
    pub certificate: String,
}

/// Labels of a certificate file a member's TLS settings name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendCertificateLabels {
    /// Pool id.
    pub pool: String,
    /// Member id.
    pub backend: String,
    /// `ca` (`tls.ca_file`) or `client_identity` (`tls.client_identity_file`).
    pub file: String,
}

/// Labels of a backend member.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Pool id.
    pub pool: String,
    /// Member id.
    pub backend: String,
}

/// Labels of token counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Served deployment.
    pub deployment: String,
    /// `prompt`, `completion`, `cached`, `reasoning`.
    pub kind: String,
}

/// Labels of a call refused by a usage limit.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The limit rule's id (`store` when the store failed closed).
    pub limit: String,
    /// `requests_per_minute`, `tokens_per_minute`, `token_quota`, `exceeds_limit`,
    /// `store_unavailable`.
    pub kind: String,
}

/// Every metric of the gateway.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Held while a scrape refreshes the gauges it sets and encodes them, so that two scrapes
    /// at once (an HA pair of Prometheus servers) do not see each other's half-refilled series.
    scraping: std::sync::Mutex<()>,
    /// Calls finished.
    pub requests: Family<CallLabels, Counter>,
    /// Seconds from arrival to the last byte.
    pub duration: Family<OperationLabels, Histogram>,
    /// Seconds from arrival to the first byte sent.
    pub first_byte: Family<OperationLabels, Histogram>,
    /// Seconds from arrival to the first generated output a stream sent (streams that sent some).
    pub first_token: Family<OperationLabels, Histogram>,
    /// Seconds the gateway itself took before a backend's answer head went to the client.
    pub overhead: Histogram,
    /// Backend attempts by outcome.
    pub attempts: Family<AttemptLabels, Counter>,
    /// Answers cut after they began, by member and reason.
    pub answers_cut: Family<CutLabels, Counter>,
    /// 1 when a member takes calls, 0 when set aside (refreshed at scrape).
    pub backend_available: Family<BackendLabels, Gauge>,
    /// Tokens reported by backends.
    pub tokens: Family<TokenLabels, Counter>,
    /// Records waiting in the audit queue (refreshed at scrape).
    pub audit_queue_depth: Gauge,
    /// Bytes of the records waiting in the audit queue and its writer (refreshed at scrape).
    pub audit_queue_bytes: Gauge<u64, AtomicU64>,
    /// Records the audit queue refused (caught up with the queue's total at scrape).
    pub audit_rejected: Counter<u64, AtomicU64>,
    /// Calls that waited for room in the full audit queue (caught up at scrape).
    pub audit_room_waits: Counter<u64, AtomicU64>,
    /// Batches the audit sink failed to store (caught up at scrape).
    pub audit_write_errors: Counter<u64, AtomicU64>,
    /// Rows the audit sink left out of its store for good (caught up at scrape).
    pub audit_rows_left_out: Counter<u64, AtomicU64>,
    /// Bytes in the audit disk journal (refreshed at scrape).
    pub audit_journal_bytes: Gauge<u64, AtomicU64>,
    /// Records in the audit disk journal (refreshed at scrape).
    pub audit_journal_records: Gauge<u64, AtomicU64>,
    /// Records the audit store has stored, replayed ones included (caught up at scrape).
    pub audit_records_written: Counter<u64, AtomicU64>,
    /// Records the journal could not give back: torn, damaged or vanished lines, and lines this
    /// build cannot read, which are kept apart (caught up at scrape).
    pub audit_journal_records_skipped: Counter<u64, AtomicU64>,
    /// Journal appends and chain-state saves the disk refused (caught up at scrape).
    pub audit_journal_errors: Counter<u64, AtomicU64>,
    /// 1 while the audit store's last write succeeded (refreshed at scrape).
    pub audit_sink_up: Gauge<u64, AtomicU64>,
    /// 1 while the gateway's own TLS certificate files changed and cannot be loaded (the old
    /// pair is still served).
    pub tls_reload_failing: Gauge<u64, AtomicU64>,
    /// 1 while a member's TLS files changed and do not build (its old client is still used).
    pub backend_tls_reload_failing: Gauge<u64, AtomicU64>,
    /// When the chain the listener serves expires: its earliest `notAfter`, Unix seconds.
    pub tls_certificate_expiry: Family<CertificateLabels, Gauge>,
    /// When the certificates of the files members' TLS settings name expire, as in use (set at
    /// scrape).
    pub backend_tls_certificate_expiry: Family<BackendCertificateLabels, Gauge>,
    /// Version of the running configuration snapshot.
    pub config_version: Gauge<u64, AtomicU64>,
    /// Version of the last-known-good snapshot that could not be built at start (the gateway
    /// runs on its configuration file's instead); 0 when none, and again after a push.
    pub last_known_good_refused: Gauge<u64, AtomicU64>,
    /// Calls refused by usage limits.
    pub limit_refusals: Family<LimitLabels, Counter>,
    /// Failures of the limit store (Redis).
    pub limit_store_errors: Counter,
    /// Failures of the shared object map (Redis).
    pub affinity_store_errors: Counter,
    /// 1 while another gateway holds this gateway's `gateway_id` in the audit store.
    pub gateway_id_conflict: Gauge,
}

/// Buckets of the gateway's own time a call: tens of microseconds on an idle gateway (20–40 µs
/// on a 2-core VM), up to tens of milliseconds when it waits for Redis or for CPU.
fn overhead_histogram() -> Histogram {
    Histogram::new([
        0.000_01, 0.000_02, 0.000_03, 0.000_05, 0.000_075, 0.000_1, 0.000_25, 0.000_5, 0.001,
        0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

/// Buckets of a call's duration and time to first byte: from 5 ms up to 10 minutes, past the
/// default response timeout (300 s) and into long streamed answers.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0,
        300.0, 600.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gatehouse");
        let metrics = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            first_byte: Family::new_with_constructor(latency_histogram),
            first_token: Family::new_with_constructor(latency_histogram),
            overhead: overhead_histogram(),
            attempts: Family::default(),
            answers_cut: Family::default(),
            backend_available: Family::default(),
            tokens: Family::default(),
            audit_queue_depth: Gauge::default(),
            audit_queue_bytes: Gauge::default(),
            audit_rejected: Counter::default(),
            audit_room_waits: Counter::default(),
            audit_write_errors: Counter::default(),
            audit_rows_left_out: Counter::default(),
            audit_journal_bytes: Gauge::default(),
            audit_journal_records: Gauge::default(),
            audit_records_written: Counter::default(),
            audit_journal_records_skipped: Counter::default(),
            audit_journal_errors: Counter::default(),
            audit_sink_up: Gauge::default(),
            tls_reload_failing: Gauge::default(),
            backend_tls_reload_failing: Gauge::default(),
            tls_certificate_expiry: Family::default(),
            backend_tls_certificate_expiry: Family::default(),
            config_version: Gauge::default(),
            last_known_good_refused: Gauge::default(),
            limit_refusals: Family::default(),
            limit_store_errors: Counter::default(),
            affinity_store_errors: Counter::default(),
            gateway_id_conflict: Gauge::default(),
            registry: Registry::default(),
            scraping: std::sync::Mutex::new(()),
        };
        registry.register(
            "requests",
            "Calls answered, by operation, deployment, backend and status",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Seconds from a call's arrival to its last byte",
            metrics.duration.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Seconds from a call's arrival to its first response byte",
            metrics.first_byte.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from a streamed call's arrival to the first generated output sent to its client (streams that sent output; the audit record's TimeToFirstToken)",
            metrics.first_token.clone(),
        );
        registry.register(
            "overhead_seconds",
            "Seconds a call relayed from a backend spent in the gateway before the backend's answer head went to the client: from the call's arrival, less the waits for its request body and for backends' answer heads",
            metrics.overhead.clone(),
        );
        registry.register(
            "backend_attempts",
            "Backend attempts by outcome",
            metrics.attempts.clone(),
        );
        registry.register(
            "backend_answers_cut",
            "Backend answers cut after they began: broken by the member, or silent longer than its response_idle_timeout_ms",
            metrics.answers_cut.clone(),
        );
        registry.register(
            "backend_available",
            "1 when a pool member takes calls, 0 while it is set aside",
            metrics.backend_available.clone(),
        );
        registry.register(
            "tokens",
            "Tokens reported by backends",
            metrics.tokens.clone(),
        );
        registry.register(
            "audit_queue_depth",
            "Audit records waiting to be written",
            metrics.audit_queue_depth.clone(),
        );
        registry.register(
            "audit_queue_bytes",
            "Bytes of the audit records waiting in memory to be written or journaled",
            metrics.audit_queue_bytes.clone(),
        );
        registry.register(
            "audit_records_rejected",
            "Audit records the full queue refused",
            metrics.audit_rejected.clone(),
        );
        registry.register(
            "audit_room_waits",
            "Calls that found the audit queue full and waited for room for their record",
            metrics.audit_room_waits.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Audit batches the sink failed to store",
            metrics.audit_write_errors.clone(),
        );
        registry.register(
            "audit_rows_left_out",
            "Audit rows the sink left out of its store for good (an Azure Monitor row too large even shortened; each is logged)",
            metrics.audit_rows_left_out.clone(),
        );
        registry.register(
            "audit_journal_bytes",
            "Bytes in the audit disk journal, waiting for the store",
            metrics.audit_journal_bytes.clone(),
        );
        registry.register(
            "audit_journal_records",
            "Records in the audit disk journal, waiting for the store",
            metrics.audit_journal_records.clone(),
        );
        registry.register(
            "audit_records_written",
            "Audit records the store has stored, replayed ones included",
            metrics.audit_records_written.clone(),
        );
        registry.register(
            "audit_journal_records_skipped",
            "Audit records the journal could not give back: torn, damaged or vanished lines (lost) and lines this build cannot read (kept in unreadable-records.jsonl); each is logged",
            metrics.audit_journal_records_skipped.clone(),
        );
        registry.register(
            "audit_journal_errors",
            "Audit journal appends and chain-state saves the disk refused",
            metrics.audit_journal_errors.clone(),
        );
        registry.register(
            "audit_sink_up",
            "1 while the audit store's last write succeeded, else 0",
            metrics.audit_sink_up.clone(),
        );
        registry.register(
            "tls_reload_failing",
            "1 while the gateway's own TLS certificate files changed and cannot be loaded (the old pair is still served)",
            metrics.tls_reload_failing.clone(),
        );
        registry.register(
            "backend_tls_reload_failing",
            "1 while a member's TLS files changed and do not build (its old client is still used)",
            metrics.backend_tls_reload_failing.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the certificate chain the listener serves expires: the earliest notAfter of its certificates, Unix seconds",
            metrics.tls_certificate_expiry.clone(),
        );
        registry.register(
            "backend_tls_certificate_expiry_timestamp_seconds",
            "When the certificates of a member's CA or client identity file in use expire: the earliest notAfter in the file, Unix seconds",
            metrics.backend_tls_certificate_expiry.clone(),
        );
        registry.register(
            "config_version",
            "Version of the running configuration snapshot",
            metrics.config_version.clone(),
        );
        registry.register(
            "config_last_known_good_refused",
            "Version of the last-known-good snapshot that could not be built at start, the gateway running on its configuration file's instead; 0 when none",
            metrics.last_known_good_refused.clone(),
        );
        registry.register(
            "limit_refusals",
            "Calls refused by usage limits, by limit and kind",
            metrics.limit_refusals.clone(),
        );
        registry.register(
            "limit_store_errors",
            "Failures of the limit store (calls admitted unchecked when failing open)",
            metrics.limit_store_errors.clone(),
        );
        registry.register(
            "affinity_store_errors",
            "Failures of the object map shared by replicas (objects then found through this gateway's own map only)",
            metrics.affinity_store_errors.clone(),
        );
        registry.register(
            "gateway_id_conflict",
            "1 while another gateway holds this gateway's gateway_id in the audit store: both write the same audit chains",
            metrics.gateway_id_conflict.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// Counts one backend attempt.
    pub fn backend_attempt(&self, backend: &str, outcome: &str) {
        self.attempts
            .get_or_create(&AttemptLabels {
                backend: backend.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts a backend answer cut after it began.
    pub fn answer_cut(&self, backend: &str, reason: &str) {
        self.answers_cut
            .get_or_create(&CutLabels {
                backend: backend.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a call refused by a usage limit.
    pub fn limit_refused(&self, refusal: &crate::limits::LimitRefusal) {
        self.limit_refusals
            .get_or_create(&LimitLabels {
                limit: refusal.limit_id().to_owned(),
                kind: crate::limits::refusal_kind(refusal).to_owned(),
            })
            .inc();
    }

    /// Brings `counter` up to `total`, a running total kept elsewhere (the audit queue's), so
    /// that it is exposed as a counter (`_total`, only ever rising) and not as a gauge. Called
    /// while a scrape holds the metrics, so two scrapes do not both add the same difference.
    pub fn catch_up(counter: &Counter<u64, AtomicU64>, total: u64) {
        let exposed = counter.get();
        if total > exposed {
            counter.inc_by(total - exposed);
        }
    }

    /// Runs `refresh` (which sets the gauges read at scrape time, clearing families first if it
    /// must) and encodes the result, one scrape at a time.
    pub fn scrape(&self, refresh: impl FnOnce(&Metrics)) -> String {
        let _one_at_a_time = self
            .scraping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        refresh(self);
        self.encode()
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "metrics could not be encoded");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape that comes while another refreshes (between its clearing and its refilling of
    /// the members' gauges) waits for it, and so sees every member, not the cleared family.
    #[test]
    fn a_scrape_during_another_ones_refresh_sees_every_member() {
        const MEMBERS: usize = 50;
        let metrics = std::sync::Arc::new(Metrics::default());
        let (cleared, on_cleared) = std::sync::mpsc::channel();
        let first = {
            let metrics = std::sync::Arc::clone(&metrics);
            std::thread::spawn(move || {
                metrics.scrape(|metrics| {
                    metrics.backend_available.clear();
                    cleared.send(()).unwrap();
                    // Time for the second scrape to read the cleared family, were it not held.
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    for member in 0..MEMBERS {
                        metrics
                            .backend_available
                            .get_or_create(&BackendLabels {
                                pool: "p".to_owned(),
                                backend: format!("m{member}"),
                            })
                            .set(1);
                    }
                })
            })
        };
        on_cleared.recv().unwrap();
        let second = metrics.scrape(|_| {});
        let count = |text: &str| text.matches("gatehouse_backend_available{").count();
        assert_eq!(
            count(&second),
            MEMBERS,
            "the second scrape saw a half-refreshed family"
        );
        assert_eq!(count(&first.join().unwrap()), MEMBERS);
    }

    /// A call that waited out the default response timeout (300 s) falls in a bucket of its own,
    /// not in the one above 120 s that also holds hour-long streams.
    #[test]
    fn latency_buckets_reach_past_the_default_response_timeout() {
        let metrics = Metrics::default();
        let labels = OperationLabels {
            operation: "chatcompletions_create".to_owned(),
        };
        metrics.duration.get_or_create(&labels).observe(250.0);
        metrics.duration.get_or_create(&labels).observe(500.0);
        let text = metrics.encode();
        let bucket = |bound: &str| -> String {
            let le = format!(r#"le="{bound}""#);
            text.lines()
                .filter(|line| line.starts_with("gatehouse_request_duration_seconds_bucket{"))
                .find(|line| line.contains(&le))
                .and_then(|line| line.rsplit(' ').next())
                .unwrap_or_else(|| panic!("no bucket `{le}` in:\n{text}"))
                .to_owned()
        };
        assert_eq!(bucket("120.0"), "0");
        assert_eq!(bucket("180.0"), "0");
        assert_eq!(bucket("300.0"), "1");
        assert_eq!(bucket("600.0"), "2");
    }

    #[test]
    fn a_total_kept_elsewhere_is_exposed_as_a_counter_that_only_rises() {
        let metrics = Metrics::default();
        Metrics::catch_up(&metrics.audit_write_errors, 3);
        Metrics::catch_up(&metrics.audit_write_errors, 3);
        assert_eq!(
            metrics.audit_write_errors.get(),
            3,
            "the same total is not added twice"
        );
        Metrics::catch_up(&metrics.audit_write_errors, 5);
        assert_eq!(metrics.audit_write_errors.get(), 5);
        Metrics::catch_up(&metrics.audit_write_errors, 1);
        assert_eq!(
            metrics.audit_write_errors.get(),
            5,
            "a counter never goes down"
        );
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE gatehouse_audit_write_errors counter"),
            "{text}"
        );
        assert!(
            text.contains("\ngatehouse_audit_write_errors_total 5\n"),
            "{text}"
        );
    }
}
