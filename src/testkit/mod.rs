//! Loopback peers for tests, benches and `tether demo`: servers that count the sockets
//! they accepted and closed ([`listening`], [`origin`], a fake registry and token
//! server in [`registry`]), plain or TLS with certificates made at run time ([`tls`]),
//! a DNS server whose records a test changes ([`dns`]),
//! and a leaky client that imitates the Dragonfly manager (a new HTTP client per job,
//! never closed). They bind `127.0.0.1:0`, unless a test that made its own network
//! namespace gives them an address there.
//!
//! Behind the `testkit` feature, so the proxy's own build and dependency tree hold
//! none of it: the package's dev-dependency on itself turns it on for `cargo test`.

pub mod dns;
pub mod leaky;
pub mod listening;
pub mod memory;
pub mod origin;
pub mod registry;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// A loopback address where connections are refused, reserved for as long as the
/// returned socket lives: it is bound but never listens, so no other test can take
/// the port meanwhile (binding `127.0.0.1:0` and dropping the listener would free
/// it for any test running beside).
pub fn refusing_addr() -> (std::net::SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(([127, 0, 0, 1], 0).into())
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("bound socket has an address");
    (addr, socket)
}

/// A TCP connection to `addr` from `source` (another loopback address stands for
/// another client host).
pub async fn connect_from(
    source: std::net::IpAddr,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// A connected TCP pair on loopback: `(client, server, the client's address as the
/// server sees it)`.
pub async fn tcp_pair() -> (
    tokio::net::TcpStream,
    tokio::net::TcpStream,
    std::net::SocketAddr,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let client = tokio::net::TcpStream::connect(listener.local_addr().expect("bound"))
        .await
        .expect("connect to our own listener");
    let (server, peer) = listener.accept().await.expect("accept");
    (client, server, peer)
}

/// Polls `check` until it returns true or `within` passes; returns the last result.
/// Tests wait on conditions, never on sleeps.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A header map of `fields`, in order (repeated names appended).
pub fn head(fields: &[(&'static str, &'static str)]) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for &(name, value) in fields {
        headers.append(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        );
    }
    headers
}

/// The value of one sample in a Prometheus text exposition: `name` with exactly
/// the given labels (in any order). `None` when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, rest) = match series.find('{') {
                Some(i) => (&series[..i], &series[i + 1..series.len() - 1]),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let found: Vec<(&str, &str)> = rest
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            let same = found.len() == labels.len() && labels.iter().all(|l| found.contains(l));
            same.then(|| value.parse().ok()).flatten()
        })
}

/// Sockets in ESTABLISHED state to `port` as the kernel sees them (`ss`), counted on
/// the connecting side. `None` where `ss` is not installed.
pub fn ss_established_to(port: u16) -> Option<usize> {
    let out = std::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( dport = :{port} )"),
        ])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    })
}
