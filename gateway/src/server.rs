//! Step 1: accept connections — plain or TLS, HTTP/1.1 and HTTP/2 — and shut down gracefully.

use std::convert::Infallible;
use std::future::{Future as _, Ready, ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum_server::Handle;
use axum_server::accept::Accept;
use axum_server::tls_rustls::RustlsConfig;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder as HttpBuilder;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::app::{Gateway, ROUTED_PATHS};
use crate::certificate_expiry;
use crate::idle_deadline::IdleDeadline;
use crate::metrics::CertificateLabels;
use crate::settings::TlsSettings;

/// A gateway listening on a socket.
#[derive(Debug, Clone)]
pub struct Listening {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Controls shutdown.
    pub handle: Handle,
    /// Set when shutdown begins: connections still in their TLS handshake are dropped then.
    stopping: Arc<watch::Sender<bool>>,
}

impl Listening {
    /// Stops accepting, lets in-flight calls (streams included) finish for up to `drain`.
    /// Connections still in their TLS handshake are closed at once: they carry no call, and
    /// would otherwise hold the gateway (and the audit queue's last flush) until their handshake
    /// ends or times out.
    pub fn shutdown(&self, drain: Duration) {
        self.stopping.send_replace(true);
        self.handle.graceful_shutdown(Some(drain));
    }

    /// Ends a drain under way at once: every connection still open is closed now.
    pub fn stop_now(&self) {
        self.stopping.send_replace(true);
        self.handle.shutdown();
    }
}

/// Installs the process-wide rustls crypto provider (ring); harmless when already installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Binds `addr` and serves the gateway in a background task until shut down.
pub async fn spawn(
    gateway: Arc<Gateway>,
    addr: SocketAddr,
    tls: Option<TlsSettings>,
) -> anyhow::Result<(Listening, tokio::task::JoinHandle<std::io::Result<()>>)> {
    install_crypto_provider();
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("server.listen: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle = Handle::new();
    let (stopping, stopping_seen) = watch::channel(false);
    let timeouts = gateway.client_timeouts;
    let tls_reload_failing = gateway.metrics.tls_reload_failing.clone();
    let tls_certificate_expiry = gateway.metrics.tls_certificate_expiry.clone();
    let service = Connections {
        router: gateway.router(),
        gateway,
    };
    let task = match tls {
        None => {
            // Small responses must not wait on Nagle's algorithm and delayed ACKs (~40 ms each).
            let mut server = axum_server::from_tcp(listener)
                .acceptor(ClientDeadlines {
                    inner: axum_server::accept::NoDelayAcceptor::new(),
                    first_byte: timeouts.request_head,
                    send: timeouts.send,
                    stopping: stopping_seen,
                })
                .handle(handle.clone());
            limit_idle_clients(server.http_builder(), timeouts.request_head);
            tokio::spawn(async move { server.serve(service).await })
        }
        Some(tls) => {
            let (cert, key) = read_pair(&tls).await.with_context(|| tls_files(&tls))?;
            let loaded = pair_digest(&cert, &key);
            let expiry = certificate_expiry::earliest_expiry(&cert);
            let config = RustlsConfig::from_pem(cert, key)
                .await
                .with_context(|| tls_files(&tls))?;
            show_expiry(&tls_certificate_expiry, expiry);
            tokio::spawn(watch_certificates(
                config.clone(),
                tls,
                loaded,
                tls_reload_failing,
                tls_certificate_expiry,
            ));
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
                .acceptor(axum_server::accept::NoDelayAcceptor::new());
            let mut server = axum_server::from_tcp(listener)
                .acceptor(ClientDeadlines {
                    inner: acceptor,
                    first_byte: timeouts.request_head,
                    send: timeouts.send,
                    stopping: stopping_seen,
                })
                .handle(handle.clone());
            limit_idle_clients(server.http_builder(), timeouts.request_head);
            tokio::spawn(async move { server.serve(service).await })
        }
    };
    Ok((
        Listening {
            addr,
            handle,
            stopping: Arc::new(stopping),
        },
        task,
    ))
}

/// Closes connections whose client has gone quiet: an HTTP/1.1 connection whose next request
/// head has not fully arrived `after` it began to be awaited (hyper's header read timeout), and an
/// HTTP/2 connection from which nothing has arrived for `after` and that does not answer a ping
/// within `after` more (a peer that is gone, or never meant to send). Live HTTP/2 clients answer
/// pings on their own, so they keep their connections however long they are idle.
fn limit_idle_clients(builder: &mut HttpBuilder<TokioExecutor>, after: Duration) {
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(after);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(after)
        .keep_alive_timeout(after);
}

/// Wraps an acceptor so that a connection still in its TLS handshake when shutdown begins is
/// dropped (axum-server awaits the handshake without looking at the shutdown), and each
/// connection keeps two deadlines of its own (after the TLS handshake, which has its own timeout):
///
/// - **version**: a connection whose HTTP version cannot be told within `first_byte` of its
///   acceptance is closed. hyper's header read timeout covers a request head once the connection
///   is served as HTTP/1.1, and HTTP/2's pings once it is served as HTTP/2, but the version is
///   told from the first bytes (HTTP/2 by its 24-byte preface, `PRI * HTTP/2.0…`), and hyper
///   waits for them without a timer: a connection that sends none, or only the start of the
///   preface (`PRI`), would wait for ever;
/// - **send**: a connection the gateway cannot write to for `send` (the client takes nothing, its
///   buffers are full) is closed, as nginx's `send_timeout` does, so that a client that stops
///   reading its answer does not hold the connection, the call and the backend's answer for ever.
#[derive(Debug, Clone)]
struct ClientDeadlines<A> {
    inner: A,
    first_byte: Duration,
    send: Duration,
    /// Becomes `true` when shutdown begins.
    stopping: watch::Receiver<bool>,
}

impl<A, I, S> Accept<I, S> for ClientDeadlines<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = ClientStream<A::Stream>;
    type Service = A::Service;
    type Future = BoxFuture<'static, io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let (first_byte, send) = (self.first_byte, self.send);
        let accepted = self.inner.accept(stream, service);
        let mut stopping = self.stopping.clone();
        Box::pin(async move {
            let stopped = async move {
                // A sender gone without a shutdown (its `Listening` dropped) stops nothing.
                if stopping.wait_for(|stopping| *stopping).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let (stream, service) = tokio::select! {
                biased;
                () = stopped => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the gateway is shutting down",
                    ));
                }
                accepted = accepted => accepted?,
            };
            let stream = ClientStream {
                inner: stream,
                version_deadline: Some(Box::pin(tokio::time::sleep(first_byte))),
                preface_seen: 0,
                send: IdleDeadline::new(send),
            };
            Ok((stream, service))
        })
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4): the bytes hyper reads before it knows a
/// connection is HTTP/2 rather than HTTP/1.1.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection whose reads fail with `TimedOut` if the bytes that tell its HTTP version
/// do not come before its deadline, and whose writes fail with `TimedOut` when none can be made
/// for the send timeout. Otherwise it is the plain connection: the send deadline makes no timer
/// until a write has to wait.
struct ClientStream<S> {
    inner: S,
    /// Until the version is told: the first byte that differs from the HTTP/2 preface, or the
    /// whole preface.
    version_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How many bytes of the HTTP/2 preface have arrived so far.
    preface_seen: usize,
    send: IdleDeadline,
}

impl<S> ClientStream<S> {
    /// Notes bytes that arrived: once they tell the version, the version deadline is lifted.
    fn arrived(&mut self, bytes: &[u8]) {
        if self.version_deadline.is_none() {
            return;
        }
        let expected = &HTTP2_PREFACE[self.preface_seen..];
        let n = bytes.len().min(expected.len());
        if bytes[..n] != expected[..n] || self.preface_seen + n == HTTP2_PREFACE.len() {
            self.version_deadline = None;
        } else {
            self.preface_seen += n;
        }
    }
}

impl<S> ClientStream<S> {
    /// What a write that had to wait becomes: still waiting, or `TimedOut` once the client has
    /// taken nothing for the send timeout.
    fn waited<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.send.bound_write(
            cx,
            polled,
            "the client took nothing of its answer within the send timeout",
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.arrived(&buf.filled()[before..]);
                Poll::Ready(result)
            }
            Poll::Pending => {
                let passed = this
                    .version_deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if passed {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not begin a request within the request head timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.waited(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.waited(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.waited(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.waited(cx, polled)
    }
}

/// Makes the service of each accepted connection, which knows the peer's address.
#[derive(Clone)]
struct Connections {
    gateway: Arc<Gateway>,
    router: Router,
}

impl tower::Service<SocketAddr> for Connections {
    type Response = ConnectionService;
    type Error = Infallible;
    type Future = Ready<Result<ConnectionService, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, peer: SocketAddr) -> Self::Future {
        ready(Ok(ConnectionService {
            gateway: Arc::clone(&self.gateway),
            router: self.router.clone(),
            peer,
        }))
    }
}

/// The requests of one connection: the operational and admin paths through the router (with
/// the peer's address as `ConnectInfo`), model calls straight to the call pipeline — what the
/// router's fallback would do, without its routing, extension map and layers of futures
/// (≈ 5 % of a call's instructions).
#[derive(Clone)]
struct ConnectionService {
    gateway: Arc<Gateway>,
    router: Router,
    peer: SocketAddr,
}

impl tower::Service<http::Request<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let mut request = request.map(Body::new);
        if ROUTED_PATHS.contains(&request.uri().path()) {
            request.extensions_mut().insert(ConnectInfo(self.peer));
            Box::pin(self.router.clone().oneshot(request))
        } else {
            Box::pin(Arc::clone(&self.gateway).serve(self.peer, request).map(Ok))
        }
    }
}

/// The settings' TLS files, for an error about them.
fn tls_files(tls: &TlsSettings) -> String {
    format!(
        "server.tls: the certificate {} and key {}",
        tls.cert_file.display(),
        tls.key_file.display()
    )
}

/// Loads the certificate chain and key as the listener would, so that `check` refuses what
/// `serve` would: files missing or unreadable, no certificate, no key, or a key that does not
/// match the certificate.
pub fn check_tls(tls: &TlsSettings) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    install_crypto_provider();
    let load = || -> anyhow::Result<()> {
        let chain =
            CertificateDer::pem_file_iter(&tls.cert_file)?.collect::<Result<Vec<_>, _>>()?;
        anyhow::ensure!(
            !chain.is_empty(),
            "the certificate file holds no certificate"
        );
        let key = PrivateKeyDer::from_pem_file(&tls.key_file)?;
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(())
    };
    load().with_context(|| tls_files(tls))
}

/// What the certificate and key files held: a digest of both (the watcher keeps no copy of the
/// key of its own).
type PairDigest = [u8; 32];

/// The digest of a certificate chain and key, as [`watch_certificates`] compares them.
fn pair_digest(cert: &[u8], key: &[u8]) -> PairDigest {
    use sha2::{Digest as _, Sha256};
    let mut digest = Sha256::new();
    digest.update((cert.len() as u64).to_be_bytes());
    digest.update(cert);
    digest.update(key);
    digest.finalize().into()
}

/// The certificate chain and key files, as read now.
async fn read_pair(tls: &TlsSettings) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    Ok((
        tokio::fs::read(&tls.cert_file).await?,
        tokio::fs::read(&tls.key_file).await?,
    ))
}

/// Sets the listener's certificate expiry gauge to the earliest `notAfter` of the chain served
/// (`None`: one that does not parse as X.509 is left out of the metrics).
fn show_expiry(gauge: &Family<CertificateLabels, Gauge>, expiry: Option<i64>) {
    let labels = CertificateLabels {
        certificate: "listener".to_owned(),
    };
    match expiry {
        Some(not_after) => {
            gauge.get_or_create(&labels).set(not_after);
        }
        None => {
            gauge.remove(&labels);
        }
    }
}

/// Reloads the certificate and key when either file changes, so renewals need no restart. The
/// files are read at every tick and compared with what was loaded (`loaded`, the digest of the
/// bytes `config` was built from), not by their modification times, which a copy that keeps them
/// (`cp -p`, an archive unpacked) or a coarse clock would leave unchanged. `failing` is 1 while
/// changed files cannot be loaded (the old pair still served), else 0; a pair that failed is
/// tried again only once it changes again, so it is logged once. `expiry` holds the served
/// chain's earliest `notAfter`.
async fn watch_certificates(
    config: RustlsConfig,
    tls: TlsSettings,
    loaded: PairDigest,
    failing: prometheus_client::metrics::gauge::Gauge<u64, std::sync::atomic::AtomicU64>,
    expiry: Family<CertificateLabels, Gauge>,
) {
    let mut served = loaded;
    let mut refused: Option<PairDigest> = None;
    let mut ticker = tokio::time::interval(Duration::from_secs(tls.reload_interval_seconds.max(1)));
    loop {
        ticker.tick().await;
        // A file that cannot be read now (removed for a moment while it is replaced) is looked
        // at again at the next tick.
        let Ok((cert, key)) = read_pair(&tls).await else {
            continue;
        };
        let now = pair_digest(&cert, &key);
        if now == served || Some(now) == refused {
            continue;
        }
        let not_after = certificate_expiry::earliest_expiry(&cert);
        match config.reload_from_pem(cert, key).await {
            Ok(()) => {
                tracing::info!(cert = %tls.cert_file.display(), "TLS certificate reloaded");
                served = now;
                refused = None;
                failing.set(0);
                show_expiry(&expiry, not_after);
            }
            Err(error) => {
                refused = Some(now);
                failing.set(1);
                tracing::error!(%error, "TLS certificate changed but could not be loaded; keeping the old one")
            }
        }
    }
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a new self-signed certificate and its key to the files `tls` names.
    fn write_certificate(tls: &TlsSettings) {
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&tls.cert_file, issued.cert.pem()).unwrap();
        std::fs::write(&tls.key_file, issued.key_pair.serialize_pem()).unwrap();
    }

    /// A renewal is loaded by what the files hold, not by their modification times: one written
    /// with the times of the files it replaces (`cp -p`, an archive unpacked) is picked up.
    #[tokio::test]
    async fn a_renewal_with_the_old_modification_times_is_picked_up() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsSettings {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
            reload_interval_seconds: 1,
        };
        write_certificate(&tls);
        // What `spawn` does.
        let (cert, key) = read_pair(&tls).await.unwrap();
        let loaded = pair_digest(&cert, &key);
        let config = RustlsConfig::from_pem(cert, key).await.unwrap();
        let first = config.get_inner();
        let times: Vec<std::time::SystemTime> = [&tls.cert_file, &tls.key_file]
            .iter()
            .map(|path| std::fs::metadata(path).unwrap().modified().unwrap())
            .collect();
        write_certificate(&tls);
        for (path, time) in [&tls.cert_file, &tls.key_file].iter().zip(times) {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(time)
                .unwrap();
        }
        let watcher = tokio::spawn(watch_certificates(
            config.clone(),
            tls,
            loaded,
            prometheus_client::metrics::gauge::Gauge::default(),
            Family::default(),
        ));
        // Bounded, so that a watcher that never reloads fails the test instead of hanging it.
        let mut reloaded = false;
        for _ in 0..50 {
            if !Arc::ptr_eq(&first, &config.get_inner()) {
                reloaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        watcher.abort();
        assert!(reloaded, "the renewed certificate was not loaded");
    }
}
