//! The floor under the gateway: a pass-through reverse proxy made of the parts the gateway is
//! built on and nothing else, for `bench/gateway_load.sh` to measure beside nginx and the gateway.
//!
//! Tokio's multi-threaded runtime (one worker per core, as the gateway), mimalloc (the gateway's
//! allocator), hyper-util's server (HTTP/1.1 and HTTP/2, TCP_NODELAY) and its pooling client
//! (TCP_NODELAY): each request goes to the upstream with its method, path, query, headers and
//! body as they came, and the answer comes back as it came, streamed both ways. No key, no
//! parsing, no record, no metrics, no timeouts: what any gateway on these parts pays per call
//! before doing any work of its own. It is a benchmark baseline, not a product: it listens on
//! the loopback address it is given and forwards to the one upstream it is given.
//!
//! ```sh
//! hyper_floor --listen 127.0.0.1:8081 --upstream 127.0.0.1:8080
//! ```

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "A bare pass-through reverse proxy on the gateway's parts (a benchmark floor)")]
struct Args {
    /// Loopback address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Upstream `host:port`, spoken to in plain HTTP/1.1.
    #[arg(long)]
    upstream: SocketAddr,
}

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback() && args.upstream.ip().is_loopback(),
        "the floor proxy only listens on and forwards to loopback addresses"
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let upstream = args.upstream;
    loop {
        // A failed accept (a connection reset before it was taken, no file descriptor left)
        // costs that connection only; a short pause keeps a lasting one from spinning.
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                forward(client.clone(), upstream, request)
            });
            // A client that leaves mid-call ends its connection; nothing to report.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Sends `request` to `upstream` as it came and returns the answer as it comes; a 502 when the
/// upstream cannot be reached.
async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();
    let uri = match format!("http://{upstream}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => return Ok(bad_gateway()),
    };
    parts.uri = uri;
    parts.version = hyper::Version::HTTP_11;
    match client.request(Request::from_parts(parts, body)).await {
        Ok(answer) => Ok(answer.map(BodyExt::boxed)),
        Err(_) => Ok(bad_gateway()),
    }
}

fn bad_gateway() -> Response<Body> {
    let mut answer = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *answer.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    answer
}
