//! The HTTP client that calls backend members on the hot path.
//!
//! It is hyper-util's connection-pooling client over a plain `HttpConnector` (TCP_NODELAY, TCP
//! keep-alive) wrapped in hyper-rustls: the system roots plus the member's private CA, its client
//! certificate for mutual TLS, ALPN offering `h2` and `http/1.1` (HTTP/2 wherever a TLS backend
//! picks it), and redirects never followed. The member's connect timeout bounds the TCP
//! connection and the TLS handshake together ([`TimedConnector`]): a backend that accepts the
//! connection and stalls the handshake is a connect failure, so the call goes to the next member
//! (nothing was sent) instead of waiting for the response timeout. It replaced reqwest
//! there because reqwest's extra layers (its own request and response types, a boxed body per
//! call, proxy matching, header defaults) cost CPU on every call; reqwest stays for the other
//! outbound calls (Entra, Key Vault, Graph).
//!
//! One behaviour of reqwest is kept on purpose: when the environment names an HTTP(S) proxy
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`) that covers a call's URL, that call
//! goes through a reqwest client built with the same settings, which speaks to the proxy.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::HttpBody;
use bytes::Bytes;
use gatehouse_schema::config::BackendTls;
use http::{HeaderMap, Method, Uri};
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long an idle pooled connection to a backend is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keep-alive on backend connections: first probe, interval, probes (reqwest's defaults).
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// Environment variables that name a proxy (lower case is checked too).
const PROXY_VARIABLES: &[&str] = &["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"];

/// A client for one TLS setting and connect timeout; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct BackendClient {
    direct: Client<TimedConnector, Full<Bytes>>,
    /// Set only when the environment names a proxy: which URLs it covers, and a client for them.
    proxy: Option<(std::sync::Arc<Matcher>, reqwest::Client)>,
    /// The member's TLS settings offering HTTP/1.1 only, for WebSocket connections (an upgrade
    /// is an HTTP/1.1 exchange).
    websocket_tls: std::sync::Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    /// When the certificates of the files it was built from expire.
    expiry: TlsExpiry,
}

/// When the certificates of a member's TLS files expire: the earliest `notAfter` (Unix seconds)
/// of each file's certificates, `None` for a file not named (or none that parses as X.509).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsExpiry {
    /// The private CA file (`tls.ca_file`).
    pub ca: Option<i64>,
    /// The client identity file (`tls.client_identity_file`).
    pub client_identity: Option<i64>,
}

impl std::fmt::Debug for BackendClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendClient")
            .field("proxy", &self.proxy.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a call did not get a response.
#[derive(Debug)]
pub struct SendError {
    failure: SendFailure,
    source: Box<dyn StdError + Send + Sync>,
}

/// The kind of a [`SendError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendFailure {
    /// The connection could not be made (refused, unreachable, connect timeout, TLS handshake).
    Connect,
    /// The answer did not begin within the member's response timeout.
    Timeout,
    /// Anything else: the connection broke while the request was sent or before the answer.
    Request,
}

impl SendError {
    /// A URL that is not a valid request URI (never expected: every URL the gateway builds is one).
    pub fn invalid_uri() -> SendError {
        SendError {
            failure: SendFailure::Request,
            source: "the backend URL is not a valid request URI".into(),
        }
    }

    /// The member's answer did not begin within `after`.
    pub fn timed_out(after: Duration) -> SendError {
        SendError {
            failure: SendFailure::Timeout,
            source: format!("no answer within {} ms", after.as_millis()).into(),
        }
    }

    /// Whether the connection could not be made (refused, unreachable, connect timeout, TLS
    /// handshake).
    pub fn is_connect(&self) -> bool {
        self.failure == SendFailure::Connect
    }

    /// Whether the member's answer did not begin within its response timeout.
    pub fn is_timeout(&self) -> bool {
        self.failure == SendFailure::Timeout
    }

    /// The attempt's outcome as metrics and audit records name it: `connect_failed`,
    /// `response_timeout` or `request_failed`.
    pub fn reason(&self) -> &'static str {
        match self.failure {
            SendFailure::Connect => "connect_failed",
            SendFailure::Timeout => "response_timeout",
            SendFailure::Request => "request_failed",
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

/// The files a member's TLS settings name, as read: a client is built from them, and kept while
/// they read the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    ca: Option<Vec<u8>>,
    identity: Option<Vec<u8>>,
}

impl TlsFiles {
    /// Reads the files `tls` names; the error names the file that could not be read.
    pub fn read(tls: &BackendTls) -> Result<TlsFiles, String> {
        let ca = match &tls.ca_file {
            Some(path) => Some(
                crate::secret::read_bounded(path)
                    .map_err(|e| format!("cannot read CA file `{path}`: {e}"))?,
            ),
            None => None,
        };
        let identity = match &tls.client_identity_file {
            Some(path) => Some(
                crate::secret::read_bounded(path)
                    .map_err(|e| format!("cannot read client identity `{path}`: {e}"))?,
            ),
            None => None,
        };
        Ok(TlsFiles { ca, identity })
    }
}

/// What a backend client is built from: a member's TLS settings, the files they name as read,
/// and its connect timeout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    tls: BackendTls,
    files: TlsFiles,
    connect_timeout_ms: u64,
}

impl ClientKey {
    /// Whether the files the client was built from read otherwise now (a renewed client
    /// certificate, a rotated CA). A file that cannot be read now (removed for a moment while it
    /// is replaced) counts as unchanged: the client built from it is kept.
    pub fn files_changed(&self) -> bool {
        TlsFiles::read(&self.tls).is_ok_and(|files| files != self.files)
    }

    /// The TLS settings the client was built for.
    pub fn tls(&self) -> &BackendTls {
        &self.tls
    }

    /// The connect timeout the client was built with, in milliseconds.
    pub fn connect_timeout_ms(&self) -> u64 {
        self.connect_timeout_ms
    }
}

/// The backend clients in use, kept across snapshots: a push that leaves a member's TLS settings,
/// their files and its connect timeout as they were keeps its client, and with it the pooled
/// connections (and their TLS sessions) to the member. A changed CA or client identity file
/// makes a new client.
#[derive(Debug, Default)]
pub struct ClientCache {
    clients: std::sync::Mutex<std::collections::HashMap<ClientKey, BackendClient>>,
}

impl ClientCache {
    /// The client for `tls` (its files read now) and `connect_timeout_ms`, built when there is
    /// none yet; with its key, for [`ClientCache::retain`].
    pub fn get_or_build(
        &self,
        tls: &BackendTls,
        connect_timeout_ms: u64,
    ) -> Result<(ClientKey, BackendClient), String> {
        let key = ClientKey {
            tls: tls.clone(),
            files: TlsFiles::read(tls)?,
            connect_timeout_ms,
        };
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok((key, client.clone()));
        }
        let client =
            BackendClient::with_files(tls, &key.files, Duration::from_millis(connect_timeout_ms))?;
        clients.insert(key.clone(), client.clone());
        Ok((key, client))
    }

    /// Forgets the clients not in `keep` (those of the snapshot now running).
    pub fn retain(&self, keep: &[ClientKey]) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| keep.contains(key));
    }
}

impl BackendClient {
    /// Builds the client for a member's TLS settings and connect timeout; the error names the
    /// file that could not be used.
    pub fn new(tls: &BackendTls, connect_timeout: Duration) -> Result<BackendClient, String> {
        BackendClient::with_files(tls, &TlsFiles::read(tls)?, connect_timeout)
    }

    /// Builds the client from the files `tls` names, already read.
    fn with_files(
        tls: &BackendTls,
        files: &TlsFiles,
        connect_timeout: Duration,
    ) -> Result<BackendClient, String> {
        let config = tls_config(tls, files)?;
        let mut websocket_tls = config.clone();
        websocket_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.set_keepalive_interval(Some(TCP_KEEPALIVE));
        http.set_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let https = TimedConnector {
            inner: https,
            timeout: connect_timeout,
        };
        let direct = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);
        let proxy = if proxy_configured() {
            Some((
                std::sync::Arc::new(Matcher::from_system()),
                proxied_client(tls, files, connect_timeout)?,
            ))
        } else {
            None
        };
        let expiry = TlsExpiry {
            ca: files
                .ca
                .as_deref()
                .and_then(crate::certificate_expiry::earliest_expiry),
            client_identity: files
                .identity
                .as_deref()
                .and_then(crate::certificate_expiry::earliest_expiry),
        };
        Ok(BackendClient {
            direct,
            proxy,
            websocket_tls: std::sync::Arc::new(websocket_tls),
            connect_timeout,
            expiry,
        })
    }

    /// When the certificates of the TLS files this client was built from expire.
    pub fn certificate_expiry(&self) -> TlsExpiry {
        self.expiry
    }

    /// Opens a WebSocket to `request`'s URL (`ws://` or `wss://`, its headers the member's
    /// credential and the like): the TCP connection and the TLS handshake within the connect
    /// timeout, the WebSocket handshake within `handshake_timeout`. A member that answers the
    /// upgrade with another status than 101 gives [`WebSocketRefusal::Answered`], with its status,
    /// headers and body. When the environment names a proxy that covers the member's URL (as for
    /// calls), the connection goes through it, in an HTTP `CONNECT` tunnel.
    pub async fn connect_websocket(
        &self,
        request: http::Request<()>,
        handshake_timeout: Duration,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<WebSocketTransport>,
            http::Response<Option<Vec<u8>>>,
        ),
        WebSocketRefusal,
    > {
        let uri = request.uri().clone();
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => {
                return Err(WebSocketRefusal::Unreachable(
                    "not a ws:// or wss:// URL".into(),
                ));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| WebSocketRefusal::Unreachable("the URL names no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        // The environment's proxy matcher reads http(s) URLs: ws:// is matched as http://,
        // wss:// as https://, so HTTP_PROXY and HTTPS_PROXY (and NO_PROXY) apply as to calls.
        let proxy = self.proxy.as_ref().and_then(|(matcher, _)| {
            let scheme = if secure { "https" } else { "http" };
            let matched = Uri::builder()
                .scheme(scheme)
                .authority(uri.authority()?.as_str())
                .path_and_query("/")
                .build()
                .ok()?;
            let proxy = matcher.intercept(&matched)?;
            if proxy.uri().scheme_str() == Some("http") {
                return Some(proxy);
            }
            // Only an http:// proxy speaks CONNECT here; with another (https://, socks5://),
            // the member is reached directly, as before WebSockets used the proxy at all. Said
            // once: the environment does not change while the process runs.
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            tracing::warn!(
                scheme = proxy.uri().scheme_str().unwrap_or_default(),
                "the proxy named by the environment is not an http:// proxy: a Realtime \
                 session's WebSocket goes to its member directly"
            );
            None
        });
        let connecting = async {
            let tcp = match &proxy {
                None => tokio::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|error| WebSocketRefusal::Unreachable(error.to_string()))?,
                Some(proxy) => through_proxy(proxy, &host, port).await?,
            };
            let _ = tcp.set_nodelay(true);
            let tcp = LimitedTcp::new(tcp);
            if !secure {
                return Ok(WebSocketTransport(MemberStream::Plain(tcp)));
            }
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|error| WebSocketRefusal::Unreachable(error.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&self.websocket_tls))
                .connect(name, tcp)
                .await
                .map_err(|error| WebSocketRefusal::Unreachable(error.to_string()))?;
            Ok(WebSocketTransport(MemberStream::Tls(Box::new(tls))))
        };
        let transport = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| {
                WebSocketRefusal::Unreachable(ConnectTimedOut(self.connect_timeout).to_string())
            })??;
        let handshake = tokio_tungstenite::client_async_with_config(request, transport, None);
        match tokio::time::timeout(handshake_timeout, handshake).await {
            Err(_) => Err(WebSocketRefusal::TimedOut),
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(answer))) => {
                Err(WebSocketRefusal::Answered(*answer))
            }
            Ok(Err(error)) => Err(WebSocketRefusal::Broke(error.to_string())),
        }
    }

    /// Sends one request; the body is a buffer, so a failed attempt can be sent again elsewhere.
    /// The response body streams.
    pub async fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        if let Some((matcher, client)) = &self.proxy
            && matcher.intercept(&uri).is_some()
        {
            let url = reqwest::Url::parse(&uri.to_string()).map_err(|error| SendError {
                failure: SendFailure::Request,
                source: Box::new(error),
            })?;
            let response = client
                .request(method, url)
                .headers(headers)
                .body(body)
                .send()
                .await
                .map_err(|error| SendError {
                    failure: if error.is_connect() {
                        SendFailure::Connect
                    } else {
                        SendFailure::Request
                    },
                    source: Box::new(error),
                })?;
            return Ok(http::Response::<reqwest::Body>::from(response).map(UpstreamBody::Proxied));
        }
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let response = self
            .direct
            .request(request)
            .await
            .map_err(|error| SendError {
                failure: if error.is_connect() {
                    SendFailure::Connect
                } else {
                    SendFailure::Request
                },
                source: Box::new(error),
            })?;
        Ok(response.map(UpstreamBody::Direct))
    }
}

/// The HTTPS connector under one deadline for the TCP connection and the TLS handshake together
/// (`HttpConnector`'s own connect timeout covers the TCP part alone, and hyper-rustls sets none on
/// the handshake). A connection not ready in time fails like a refused one: hyper-util reports
/// what a connector returns as a connect error.
#[derive(Clone)]
struct TimedConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

/// A connection (TCP, and TLS for `https`) not made within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("no connection (TCP and TLS handshake) within {} ms", .0.as_millis())]
struct ConnectTimedOut(Duration);

impl tower::Service<Uri> for TimedConnector {
    type Response = <HttpsConnector<HttpConnector> as tower::Service<Uri>>::Response;
    type Error = Box<dyn StdError + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(ConnectTimedOut(timeout).into()),
            }
        })
    }
}

/// The connection under a WebSocket to a member: plain TCP (`ws://`) or TLS (`wss://`), and,
/// once the session runs, a limit on how long a write may wait for the member to take anything
/// ([`WebSocketTransport::limit_sends`]).
#[derive(Debug)]
pub struct WebSocketTransport(MemberStream);

#[derive(Debug)]
enum MemberStream {
    Plain(LimitedTcp),
    Tls(Box<tokio_rustls::client::TlsStream<LimitedTcp>>),
}

impl WebSocketTransport {
    /// From now on, a write to the member's socket that can move nothing for `after` fails with
    /// `TimedOut`: a member that stops reading does not hold the session, however long a message
    /// is, as long as it takes some of it. The limit is on the socket, under TLS, so every byte
    /// the member takes counts as progress.
    pub fn limit_sends(&mut self, after: Duration) {
        let tcp = match &mut self.0 {
            MemberStream::Plain(tcp) => tcp,
            MemberStream::Tls(tls) => tls.get_mut().0,
        };
        tcp.send = Some(crate::idle_deadline::IdleDeadline::new(after));
    }
}

impl tokio::io::AsyncRead for WebSocketTransport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            MemberStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            MemberStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for WebSocketTransport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().0 {
            MemberStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            MemberStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            MemberStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            MemberStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            MemberStream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            MemberStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A member's TCP connection whose writes fail with `TimedOut` once none could move a byte for
/// the send limit (none until [`WebSocketTransport::limit_sends`] sets one).
#[derive(Debug)]
struct LimitedTcp {
    tcp: tokio::net::TcpStream,
    send: Option<crate::idle_deadline::IdleDeadline>,
}

impl LimitedTcp {
    fn new(tcp: tokio::net::TcpStream) -> LimitedTcp {
        LimitedTcp { tcp, send: None }
    }

    /// What a write that had to wait becomes: still waiting, or `TimedOut` once the member has
    /// taken nothing for the send limit.
    fn waited<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match &mut self.send {
            Some(send) => send.bound_write(
                cx,
                polled,
                "the member took nothing of the session's events within the send timeout",
            ),
            None => polled,
        }
    }
}

impl tokio::io::AsyncRead for LimitedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.waited(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_flush(cx);
        this.waited(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Why a member's WebSocket could not be opened.
#[derive(Debug)]
pub enum WebSocketRefusal {
    /// No connection (TCP, TLS) was made.
    Unreachable(String),
    /// The member did not finish the handshake in time.
    TimedOut,
    /// The member answered the upgrade with another status than 101.
    Answered(http::Response<Option<Vec<u8>>>),
    /// The handshake failed otherwise (a malformed answer, a connection cut).
    Broke(String),
}

/// A backend's response body as it streams in.
#[derive(Debug)]
pub enum UpstreamBody {
    /// From a direct connection.
    Direct(Incoming),
    /// Through an HTTP(S) proxy.
    Proxied(reqwest::Body),
    /// The start of a body already read (`head`, handed out first), then the rest of it.
    Resumed {
        /// What was read, until handed out.
        head: Option<Bytes>,
        /// The body the head was read from.
        rest: Box<UpstreamBody>,
    },
    /// A whole body the gateway made itself (a list merged from its members' lists), until
    /// handed out.
    Whole(Option<Bytes>),
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Direct(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Proxied(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Resumed { head, rest } => match head.take() {
                Some(head) => Poll::Ready(Some(Ok(Frame::data(head)))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
            UpstreamBody::Whole(body) => Poll::Ready(body.take().map(|body| Ok(Frame::data(body)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Direct(body) => body.is_end_stream(),
            UpstreamBody::Proxied(body) => body.is_end_stream(),
            UpstreamBody::Resumed { head, rest } => head.is_none() && rest.is_end_stream(),
            UpstreamBody::Whole(body) => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Direct(body) => body.size_hint(),
            UpstreamBody::Proxied(body) => body.size_hint(),
            UpstreamBody::Resumed { head, rest } => {
                let head = head.as_ref().map_or(0, |head| head.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(head));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(head));
                }
                hint
            }
            UpstreamBody::Whole(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |body| body.len() as u64))
            }
        }
    }
}

/// A TCP connection to `host:port` through an `http://` proxy's `CONNECT` tunnel (with the
/// proxy's credentials from its URL, as `Proxy-Authorization: Basic`), for a WebSocket to a
/// member. Errors name the proxy's host and port, never its URL (it may hold a password).
async fn through_proxy(
    proxy: &hyper_util::client::proxy::matcher::Intercept,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, WebSocketRefusal> {
    use tower::Service as _;
    let proxy_uri = proxy.uri();
    let proxy_name = format!(
        "the proxy {}:{}",
        proxy_uri.host().unwrap_or_default(),
        proxy_uri.port_u16().unwrap_or(80)
    );
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    let mut tunnel =
        hyper_util::client::legacy::connect::proxy::Tunnel::new(proxy_uri.clone(), tcp);
    if let Some(credentials) = proxy.basic_auth() {
        tunnel = tunnel.with_auth(credentials.clone());
    }
    // The tunnel's destination: its host and port are what CONNECT names.
    let literal = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let destination: Uri = format!("http://{literal}:{port}")
        .parse()
        .map_err(|error: http::uri::InvalidUri| WebSocketRefusal::Unreachable(error.to_string()))?;
    match tunnel.call(destination).await {
        Ok(io) => Ok(io.into_inner()),
        Err(error) => {
            // hyper-util's errors say little in their own text ("tcp connect error"): the
            // causes say what happened (refused, not resolved).
            let mut text = format!("{proxy_name}: {error}");
            let mut cause = StdError::source(&error);
            while let Some(error) = cause {
                text.push_str(&format!(": {error}"));
                cause = error.source();
            }
            Err(WebSocketRefusal::Unreachable(text))
        }
    }
}

/// Whether the environment names a proxy at all (then each URL is matched against it).
fn proxy_configured() -> bool {
    PROXY_VARIABLES.iter().any(|name| {
        [name.to_string(), name.to_ascii_lowercase()]
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
    })
}

/// The system's trusted roots, read once per process (as most clients read them at start: a
/// change to the system store takes effect at the next start).
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// TLS for backends: the system roots plus the member's CA file, its client identity, ring.
fn tls_config(tls: &BackendTls, files: &TlsFiles) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    // Native stores often hold a few certificates rustls cannot parse; those are skipped.
    let (_valid, _invalid) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if let (Some(path), Some(pem)) = (&tls.ca_file, &files.ca) {
        let certificates = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CA file `{path}` holds no valid PEM certificate: {e}"))?;
        // A DER file, a key or an empty file holds no PEM certificate: taken as it is, every
        // call to the member would then fail its TLS handshake.
        if certificates.is_empty() {
            return Err(format!(
                "ca_file `{path}` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`); a DER file, a key or an empty file cannot be used"
            ));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| format!("CA file `{path}` holds no valid PEM certificate: {e}"))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot build the backend client: {e}"))?
    .with_root_certificates(roots);
    match (&tls.client_identity_file, &files.identity) {
        (Some(path), Some(pem)) => {
            let not_identity = |e: &dyn std::fmt::Display| {
                format!("client identity `{path}` is not a PEM certificate and key: {e}")
            };
            let chain = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| not_identity(&e))?;
            if chain.is_empty() {
                return Err(not_identity(&"no certificate found"));
            }
            let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| not_identity(&e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| not_identity(&e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The reqwest client used for calls that go through a proxy named by the environment.
fn proxied_client(
    tls: &BackendTls,
    files: &TlsFiles,
    connect_timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true)
        // Never follow redirects: a redirect could carry the backend credential elsewhere.
        .redirect(reqwest::redirect::Policy::none());
    if let (Some(path), Some(pem)) = (&tls.ca_file, &files.ca) {
        for certificate in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("CA file `{path}` holds no valid PEM certificate: {e}"))?
        {
            builder = builder.add_root_certificate(certificate);
        }
    }
    if let (Some(path), Some(pem)) = (&tls.client_identity_file, &files.identity) {
        let identity = reqwest::Identity::from_pem(pem).map_err(|e| {
            format!("client identity `{path}` is not a PEM certificate and key: {e}")
        })?;
        builder = builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the backend client: {e}"))
}
