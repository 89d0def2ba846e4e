//! Shared test helpers: start tether in-process on `127.0.0.1:0` listeners, talk to
//! it over real sockets, read its metrics. Loopback peers live in `tether::testkit`
//! so `tether demo` and the benches use the same code.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod netns;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tether::config::{Config, RouteConfig, UpstreamConfig};
use tether::Running;
use tokio::net::TcpStream;

pub use tether::testkit::leaky::LeakyClient;
pub use tether::testkit::listening::Listening;
pub use tether::testkit::origin::{Origin, OriginOptions};
pub use tether::testkit::{connect_from, eventually, metric, ss_established_to};

/// How long a condition may take to become true before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A config with every listener on `127.0.0.1:0` and one upstream per origin.
pub fn config(upstreams: &[(&str, &Origin)]) -> Config {
    let mut config = Config::default();
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.upstream = upstreams
        .iter()
        .map(|(name, origin)| UpstreamConfig::new(*name, origin.authority()))
        .collect();
    config
}

/// Adds a route listener on `127.0.0.1:0` for `upstream`.
pub fn route(config: &mut Config, upstream: &str) {
    config.route.push(RouteConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.into(),
    });
}

pub async fn start(config: Config) -> Running {
    tether::start(config).await.expect("tether starts")
}

/// A response read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn tether_error(&self) -> Option<&str> {
        self.headers
            .get("x-tether-error")
            .and_then(|v| v.to_str().ok())
    }
}

/// Sends one request on a new connection to `addr` and reads the whole reply.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect to tether");
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET url` through the forward proxy at `proxy` (absolute-form, as HTTP_PROXY clients send).
pub async fn proxy_get(proxy: SocketAddr, url: &str) -> Reply {
    let uri: http::Uri = url.parse().unwrap();
    let req = Request::get(url)
        .header(http::header::HOST, uri.authority().unwrap().as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(proxy, req).await
}

/// `GET path` on a route listener.
pub async fn route_get(listener: SocketAddr, path: &str) -> Reply {
    let req = Request::get(path)
        .header(http::header::HOST, listener.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(listener, req).await
}

/// The admin endpoint `path` as text.
pub async fn admin(running: &Running, path: &str) -> Reply {
    route_get(running.admin_addr, path).await
}

/// `tether_upstream_connections_closed_total` of `upstream` for `reason`.
pub fn closed_total(tether: &Running, upstream: &str, reason: &str) -> f64 {
    metric(
        &tether.metrics(),
        "tether_upstream_connections_closed_total",
        &[("upstream", upstream), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// The sum of `tether_upstream_connections` over states for `upstream`.
pub fn upstream_gauge(metrics: &str, upstream: &str) -> f64 {
    ["connecting", "active", "idle"]
        .iter()
        .map(|s| {
            metric(
                metrics,
                "tether_upstream_connections",
                &[("upstream", upstream), ("state", s)],
            )
            .unwrap_or(0.0)
        })
        .sum()
}

/// Waits until tether's gauge, tether's pool, the origin's own count and (where
/// available) `ss` all agree that `expected` sockets are open.
pub async fn assert_sockets(
    running: &Running,
    origin: &impl AsRef<Listening>,
    upstream: &str,
    expected: usize,
) {
    let origin = origin.as_ref();
    let agreed = eventually(WAIT, || async {
        let gauge = upstream_gauge(&running.metrics(), upstream);
        let pool = running.pool_counts(upstream).map(|c| c.open()).unwrap_or(0);
        let ss = ss_established_to(origin.addr.port()).unwrap_or(expected);
        gauge == expected as f64 && pool == expected && origin.open() == expected && ss == expected
    })
    .await;
    assert!(
        agreed,
        "expected {expected} sockets to {upstream}: gauge {}, pool {:?}, origin {}, ss {:?}",
        upstream_gauge(&running.metrics(), upstream),
        running.pool_counts(upstream),
        origin.open(),
        ss_established_to(origin.addr.port()),
    );
}

/// A log writer that keeps what it is given, for tests that read tether's log lines
/// on a current-thread runtime (every task of the instance then logs on the test's
/// thread).
///
/// One process-wide subscriber writes each event to the capture the current thread
/// has installed, if any. A subscriber per test (`set_default`) missed lines: tracing
/// caches each callsite's interest process-wide, and a callsite first reached by a
/// test with no subscriber, while another installed its own, could stay "never"
/// (`observability` and `conformance_requests` lost every access line in 1–3 runs of
/// 8 under load).
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

/// The format a capture wants: the fmt layer of that format writes to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<(Captured, Format)>> =
        const { std::cell::RefCell::new(None) };
}

/// Ends the current thread's capture when dropped.
pub struct CaptureGuard(());

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| c.borrow_mut().take());
    }
}

/// The writer of the layer of one format: the current thread's capture when it
/// wants that format, otherwise nowhere.
#[derive(Clone, Copy)]
struct ToThisThread(Format);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ToThisThread {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        Sink(CAPTURE.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|(_, format)| *format == self.0)
                .map(|(captured, _)| captured.clone())
        }))
    }
}

struct Sink(Option<Captured>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.0 {
            Some(captured) => captured.write(buf),
            None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn install_as(format: Format) -> (Captured, CaptureGuard) {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            use tracing_subscriber::layer::SubscriberExt;
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::filter::LevelFilter::INFO)
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(false)
                        .with_writer(ToThisThread(Format::Text)),
                )
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(ToThisThread(Format::Json)),
                );
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in a test binary");
        });
        let logs = Captured::default();
        CAPTURE.with(|c| *c.borrow_mut() = Some((logs.clone(), format)));
        (logs, CaptureGuard(()))
    }

    /// A capture of this thread's log lines until the guard drops.
    pub fn install() -> (Captured, CaptureGuard) {
        Captured::install_as(Format::Text)
    }

    /// A capture of JSON lines (`--log-format json`), as [`Captured::install`].
    pub fn install_json() -> (Captured, CaptureGuard) {
        Captured::install_as(Format::Json)
    }

    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// The value of a series that must exist.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or_else(|| panic!("no series {name} {labels:?}"))
}

/// The access-log lines a JSON capture ([`Captured::install_json`]) holds so far:
/// each line's fields, parsed.
pub fn access_lines(logs: &Captured) -> Vec<serde_json::Value> {
    String::from_utf8(logs.bytes())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every log line is JSON"))
        .filter(|v| v["target"] == "tether::access")
        .map(|v| v["fields"].clone())
        .collect()
}

/// The first access-log line of a JSON capture, once it is written (a line is written
/// when its exchange ends, which can be just after the client has read the response).
pub async fn first_access_line(logs: &Captured, what: &str) -> serde_json::Value {
    assert!(
        eventually(WAIT, || async { !access_lines(logs).is_empty() }).await,
        "{what}"
    );
    access_lines(logs).swap_remove(0)
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens a tunnel through `proxy` to `target`; returns the socket after `200`, or
/// the status line tether answered with.
pub async fn tunnel(
    proxy: std::net::SocketAddr,
    target: &str,
) -> Result<tokio::net::TcpStream, String> {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    // Read the response head byte by byte so no tunnelled byte is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if tokio::io::AsyncReadExt::read(&mut stream, &mut byte)
            .await
            .unwrap()
            == 0
        {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        Ok(stream)
    } else {
        Err(head)
    }
}
