//! Secrets never reach the logs, and the admin listener is not exposed by default.
//!
//! Requests carry credentials in every place a client puts them (`Authorization`,
//! `Proxy-Authorization`, a `?token=` query, a `Cookie`, URI userinfo, and inside a
//! CONNECT tunnel) through the forward, route and CONNECT paths, to h1, h2 and TLS
//! upstreams, and into the error paths (400, 403, 405, 431, 502). The whole log is
//! captured at trace level, tether's own and its dependencies' (hyper, h2, rustls,
//! tokio), and must contain none of the secret values.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};

use base64::Engine;
use support::*;
use tether::config::{Config, Protocol, UpstreamConfig};
use tether::testkit::tls::{TestCa, ALPN_H2_HTTP1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BEARER: &str = "bearer-5ecret-1f0a";
const PROXY_PASSWORD: &str = "proxy-5ecret-2e1b";
const QUERY_TOKEN: &str = "query-5ecret-3d2c";
const COOKIE: &str = "cookie-5ecret-4c3d";
const USERINFO: &str = "userinfo-5ecret-5b4e";
const TUNNELLED: &str = "tunnelled-5ecret-6a5f";
const BODY: &str = "body-5ecret-7b6c";

/// `Proxy-Authorization: Basic` carries this: the password is secret, and so is the
/// encoded value (it decodes to the password).
fn proxy_basic() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("proxyuser:{PROXY_PASSWORD}"))
}

fn secrets() -> Vec<String> {
    [
        BEARER,
        PROXY_PASSWORD,
        QUERY_TOKEN,
        COOKIE,
        USERINFO,
        TUNNELLED,
        BODY,
    ]
    .map(String::from)
    .into_iter()
    .chain([proxy_basic()])
    .collect()
}

/// A request head carrying every credential header, then `extra` headers.
fn head(method: &str, target: &str, host: &str, extra: &str) -> String {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\n\
         Authorization: Bearer {BEARER}\r\n\
         Proxy-Authorization: Basic {}\r\n\
         Cookie: session={COOKIE}; theme=dark\r\n\
         Connection: close\r\n{extra}\r\n",
        proxy_basic()
    )
}

/// Writes `request` on a new connection and reads until the server closes it.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // tether may refuse (431) before it has read everything: a failed write is fine.
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    // A reset after a refusal still leaves what was read in `out`.
    let _ = read.expect("the server answers and closes");
    String::from_utf8_lossy(&out).into_owned()
}

fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// The upstreams the requests go to: plain h1, h2 by prior knowledge, h1/h2 over TLS,
/// and one that refuses connections.
struct Peers {
    h1: Origin,
    h2: Origin,
    tls: Origin,
    _ca_file: tempfile::TempPath,
    /// Keeps the refused upstream's port bound (and refusing) for the test.
    _refusing: tokio::net::TcpSocket,
    config: Config,
}

impl Peers {
    async fn start() -> Peers {
        let h1 = Origin::start().await;
        let h2 = Origin::start_with(OriginOptions {
            h2: true,
            ..OriginOptions::default()
        })
        .await;
        let ca = TestCa::new("tether security test CA");
        let ca_file = ca.pem_file().unwrap();
        let tls = Origin::start_with(OriginOptions {
            tls: Some(ca.server(&["127.0.0.1"]).server_config(ALPN_H2_HTTP1)),
            ..OriginOptions::default()
        })
        .await;
        let (refused, refusing) = tether::testkit::refusing_addr();
        let mut config = support::config(&[("h1", &h1)]);
        config.proxy.max_header_bytes = 8192;
        let mut up = UpstreamConfig::new("h2", h2.authority());
        up.protocol = Protocol::Http2;
        config.upstream.push(up);
        let mut up = UpstreamConfig::new("tls", tls.authority());
        up.tls = true;
        up.ca_file = Some(ca_file.to_path_buf());
        config.upstream.push(up);
        config
            .upstream
            .push(UpstreamConfig::new("refused", refused.to_string()));
        for name in ["h1", "tls", "refused"] {
            route(&mut config, name);
        }
        Peers {
            h1,
            h2,
            tls,
            _ca_file: ca_file,
            _refusing: refusing,
            config,
        }
    }

    /// Sends every request to tether's `proxy` listener and its three `routes` (h1,
    /// tls, refused) and checks each got the status of the path it was meant to take.
    async fn exercise(&self, proxy: SocketAddr, routes: &[SocketAddr]) {
        let [h1_route, tls_route, refused_route] = routes else {
            panic!("three routes expected, got {routes:?}");
        };
        let q = format!("?token={QUERY_TOKEN}&other=1");
        let (h1, h2) = (self.h1.authority(), self.h2.authority());
        let mut cases: Vec<(&str, SocketAddr, String, u16)> = vec![
            (
                "forward to h1",
                proxy,
                head("GET", &format!("http://{h1}/echo{q}"), &h1, ""),
                200,
            ),
            (
                "forward to h2",
                proxy,
                head("GET", &format!("http://{h2}/echo{q}"), &h2, ""),
                200,
            ),
            (
                "forward POST with a body",
                proxy,
                head(
                    "POST",
                    &format!("http://{h1}/echo{q}"),
                    &h1,
                    &format!("Content-Length: {}\r\n", BODY.len()),
                ) + BODY,
                200,
            ),
            (
                "route to h1",
                *h1_route,
                head("GET", &format!("/echo{q}"), &h1_route.to_string(), ""),
                200,
            ),
            (
                "route to TLS (h2 by ALPN)",
                *tls_route,
                head("GET", &format!("/echo{q}"), &tls_route.to_string(), ""),
                200,
            ),
            (
                "route to a refused upstream",
                *refused_route,
                head("GET", &format!("/x{q}"), &refused_route.to_string(), ""),
                502,
            ),
            (
                "forward to a denied origin",
                proxy,
                head("GET", &format!("http://denied.invalid:81/x{q}"), "denied.invalid:81", ""),
                403,
            ),
            (
                "forward with userinfo",
                proxy,
                head("GET", &format!("http://user:{USERINFO}@{h1}/x{q}"), &h1, ""),
                400,
            ),
            (
                "forward with https",
                proxy,
                head("GET", &format!("https://{h1}/x{q}"), &h1, ""),
                400,
            ),
            (
                "origin-form to the forward listener",
                proxy,
                head("GET", &format!("/x{q}"), &h1, ""),
                400,
            ),
            (
                "conflicting Content-Length",
                *h1_route,
                head(
                    "POST",
                    &format!("/echo{q}"),
                    &h1,
                    "Content-Length: 1\r\nContent-Length: 2\r\n",
                ) + "x",
                400,
            ),
            (
                "a head over max_header_bytes",
                *h1_route,
                head(
                    "GET",
                    &format!("/x{q}"),
                    &h1,
                    &format!("X-Pad: {}\r\n", "p".repeat(20_000)),
                ),
                431,
            ),
            (
                "a malformed request line",
                proxy,
                format!(
                    "GET http://{h1}/x{q} HTTP/1.1 trailing\r\nAuthorization: Bearer {BEARER}\r\n\r\n"
                ),
                400,
            ),
            (
                "CONNECT to a denied origin",
                proxy,
                head("CONNECT", "denied.invalid:443", "denied.invalid:443", ""),
                403,
            ),
            (
                "CONNECT on a route listener",
                *h1_route,
                head("CONNECT", &h1, &h1, ""),
                405,
            ),
        ];
        for (what, addr, request, expected) in cases.drain(..) {
            let response = exchange(addr, request.as_bytes()).await;
            assert_eq!(status(&response), expected, "{what}: {response}");
            if expected == 200 {
                assert!(
                    response.contains(BEARER) && response.contains(QUERY_TOKEN),
                    "{what}: the upstream saw the credentials: {response}"
                );
                assert!(
                    !response.contains(&proxy_basic()),
                    "{what}: proxy credentials are not forwarded: {response}"
                );
            }
        }
        self.tunnel(proxy).await;
        assert_eq!(self.h2.requests(), 1, "the h2 upstream was reached");
        assert_eq!(self.tls.requests(), 1, "the TLS upstream was reached");
    }

    /// A CONNECT tunnel to the h1 origin with proxy credentials, and a request with
    /// its own credentials inside it.
    async fn tunnel(&self, proxy: SocketAddr) {
        let h1 = self.h1.authority();
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        let connect = head("CONNECT", &h1, &h1, "").replace("Connection: close\r\n", "");
        stream.write_all(connect.as_bytes()).await.unwrap();
        let mut response_head = Vec::new();
        while !response_head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "tunnel closed");
            response_head.push(byte[0]);
        }
        assert!(response_head.starts_with(b"HTTP/1.1 200"));
        let inner = format!(
            "GET /echo?token={TUNNELLED} HTTP/1.1\r\nHost: {h1}\r\n\
             Authorization: Bearer {TUNNELLED}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(inner.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
            .await
            .expect("the tunnelled exchange completes")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 200") && out.contains(TUNNELLED),
            "{out}"
        );
    }
}

/// Fails naming every secret found in `log`, with the line it is on.
fn assert_no_secrets(log: &str) {
    let leaks: Vec<String> = secrets()
        .iter()
        .flat_map(|secret| {
            log.lines()
                .filter(move |line| line.contains(secret.as_str()))
                .map(move |line| format!("{secret}: {line}"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets in the log:\n{}",
        leaks.join("\n")
    );
}

/// Every `ip:port` in `text`.
fn addrs_in(text: &str) -> Vec<SocketAddr> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .filter_map(|word| word.trim_matches(':').parse().ok())
        .collect()
}

/// The binary at trace level, in the given log format: every line it writes.
async fn binary_log(format: &str) -> String {
    let peers = Peers::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.toml");
    std::fs::write(&path, peers.config.to_toml()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TETHER_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .args(["run", "--log-format", format, "--config"])
        .arg(&path)
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap();
                if line.contains("tether is ready") {
                    let _ = ready_tx.send(line.clone());
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let ready = ready_rx
        .recv_timeout(WAIT)
        .expect("tether logs that it is ready");
    // proxy_addr, admin_addr, then the routes, in the order they are logged.
    let addrs = addrs_in(&ready);
    assert_eq!(addrs.len(), 5, "{ready}");
    peers.exercise(addrs[0], &addrs[2..]).await;

    let kill = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let exited = child.try_wait().unwrap().is_some();
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(exited, "tether exits on SIGTERM");
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    log
}

fn assert_trace_log_is_real(log: &str) {
    // The capture saw what it should: access lines and dependency trace output.
    assert!(
        log.lines().filter(|l| l.contains("tether::access")).count() >= 10,
        "access lines missing:\n{log}"
    );
    let mut targets: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" TRACE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|t| t.split("::").next().unwrap_or(t).trim_end_matches(':'))
        .collect();
    targets.sort();
    targets.dedup();
    for target in ["h2", "rustls"] {
        assert!(
            targets.contains(&target),
            "no {target} trace lines (traced: {targets:?}): is RUST_LOG=trace in effect?"
        );
    }
}

#[tokio::test]
async fn no_secret_reaches_the_binarys_trace_log() {
    let log = binary_log("text").await;
    assert_trace_log_is_real(&log);
    assert_no_secrets(&log);
}

#[tokio::test]
async fn no_secret_reaches_the_binarys_json_trace_log() {
    let log = binary_log("json").await;
    assert!(log.lines().all(|l| l.starts_with('{')), "JSON lines only");
    assert_no_secrets(&log);
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The library in-process, every span and event at TRACE captured (the current-thread
/// runtime keeps every task on this thread, where the subscriber is the default).
#[tokio::test(flavor = "current_thread")]
async fn no_secret_reaches_an_in_process_trace_subscriber() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let peers = Peers::start().await;
    let tether = start(peers.config.clone()).await;
    peers.exercise(tether.proxy_addr, &tether.route_addrs).await;
    tether.shutdown().await;

    let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.lines().filter(|l| l.contains("tether::access")).count() >= 10,
        "the subscriber captured tether's access lines:\n{log}"
    );
    assert!(log.contains("TRACE"), "trace level was captured");
    assert_no_secrets(&log);
}

#[test]
fn the_admin_and_proxy_listeners_default_to_loopback() {
    for (what, config) in [
        ("built-in defaults", Config::default()),
        ("an empty file", Config::from_toml("").unwrap()),
        (
            "the embedded config",
            Config::from_toml(tether::config::EMBEDDED_CONFIG).unwrap(),
        ),
    ] {
        assert!(config.admin.listen.ip().is_loopback(), "{what}: admin");
        assert!(config.proxy.listen.ip().is_loopback(), "{what}: proxy");
    }
    assert_eq!(
        tether::config::DEFAULT_ADMIN_LISTEN
            .parse::<SocketAddr>()
            .unwrap(),
        "127.0.0.1:9901".parse().unwrap()
    );
}
