//! What an operator reads: per-upstream response and error counters, the cap in
//! force, series registered at zero, build and reload status, process metrics, and
//! the access log (one line per exchange at its end, one per tunnel when it closes).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::*;
use tether::testkit::refusing_addr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or_else(|| panic!("no series {name} {labels:?}"))
}

/// The access-log lines captured so far, parsed.
fn access_lines(logs: &Captured) -> Vec<serde_json::Value> {
    String::from_utf8(logs.bytes())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every log line is JSON"))
        .filter(|v| v["target"] == "tether::access")
        .map(|v| v["fields"].clone())
        .collect()
}

#[tokio::test]
async fn failures_at_a_stopped_origin_count_under_its_upstream_with_kind_connect() {
    let (down, _reserved) = refusing_addr();
    let mut config = support::config(&[]);
    config.upstream = vec![tether::config::UpstreamConfig::new(
        "registry",
        down.to_string(),
    )];
    route(&mut config, "registry");
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let listener = tether.route_addrs[0];

    let before = tether.metrics();
    let series = [
        ("upstream", "registry"),
        ("code", "5xx"),
        ("kind", "connect"),
    ];
    assert_eq!(
        value(&before, "tether_upstream_responses_total", &series),
        0.0,
        "registered at zero before the first failure"
    );
    for _ in 0..3 {
        let reply = route_get(listener, "/v2/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.tether_error(), Some("upstream_connect"));
    }
    let after = tether.metrics();
    assert_eq!(
        value(&after, "tether_upstream_responses_total", &series),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "tether_upstream_errors_total",
            &[("upstream", "registry"), ("kind", "connect")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "tether_upstream_responses_total",
            &[("upstream", "registry"), ("code", "2xx"), ("kind", "none")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &after,
            "tether_downstream_requests_rejected_total",
            &[("reason", "upstream_connect")]
        ),
        3.0
    );

    let lines = access_lines(&logs);
    let failed: Vec<_> = lines.iter().filter(|l| l["status"] == 502).collect();
    assert_eq!(failed.len(), 3, "{lines:?}");
    for line in failed {
        assert_eq!(line["upstream"], "registry", "{line}");
        assert_eq!(line["error"], "connect", "{line}");
        assert!(line["connect_ms"].is_number(), "{line}");
        assert!(line["duration_ms"].is_number(), "{line}");
    }
    tether.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_is_counted_under_its_upstream_with_kind_queue_full() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    config.pool.max_connections = 1;
    config.pool.queue_limit = 0;
    route(&mut config, "a");
    let tether = start(config).await;
    let listener = tether.route_addrs[0];
    // Holds the only socket: the origin sends the rest of the body only through
    // its gate, which stays shut.
    let mut holder = TcpStream::connect(listener).await.unwrap();
    holder
        .write_all(b"GET /gated/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    holder.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    let reply = route_get(listener, "/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let text = tether.metrics();
    assert_eq!(
        value(
            &text,
            "tether_upstream_responses_total",
            &[("upstream", "a"), ("code", "5xx"), ("kind", "queue_full")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "tether_upstream_responses_total",
            &[("upstream", "a"), ("code", "2xx"), ("kind", "none")]
        ),
        1.0,
        "the held request's 200 is counted at its head"
    );
    assert_eq!(
        value(
            &text,
            "tether_upstream_max_connections",
            &[("upstream", "a")]
        ),
        1.0
    );
    drop(holder);
    tether.shutdown().await;
}

#[tokio::test]
async fn the_cap_in_force_and_the_reload_status_are_gauges_that_follow_a_reload() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    config.pool.max_connections = 3;
    config.budget.max_connections = 10;
    let tether = start(config.clone()).await;
    let text = tether.metrics();
    assert_eq!(
        value(
            &text,
            "tether_upstream_max_connections",
            &[("upstream", "a")]
        ),
        3.0
    );
    assert_eq!(value(&text, "tether_budget_max_connections", &[]), 10.0);
    assert_eq!(
        value(&text, "tether_config_last_reload_successful", &[]),
        1.0
    );
    let loaded_at = value(
        &text,
        "tether_config_last_reload_success_timestamp_seconds",
        &[],
    );
    assert!(loaded_at > 1.6e9, "a Unix time: {loaded_at}");

    // A new upstream's series start at zero on the reload that adds it.
    let other = Origin::start().await;
    let mut bigger = config.clone();
    bigger.pool.max_connections = 5;
    bigger
        .upstream
        .push(tether::config::UpstreamConfig::new("b", other.authority()));
    tether.reload(bigger).await.unwrap();
    let text = tether.metrics();
    assert_eq!(
        value(
            &text,
            "tether_upstream_max_connections",
            &[("upstream", "a")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &text,
            "tether_upstream_max_connections",
            &[("upstream", "b")]
        ),
        5.0
    );
    for kind in tether::error::ErrorKind::ALL {
        let class = format!("{}xx", kind.status_class());
        let labels = [
            ("upstream", "b"),
            ("code", class.as_str()),
            ("kind", kind.as_str()),
        ];
        assert_eq!(
            value(&text, "tether_upstream_responses_total", &labels),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "tether_upstream_errors_total",
                &[("upstream", "b"), ("kind", kind.as_str())]
            ),
            0.0
        );
    }

    let mut broken = config.clone();
    broken.pool.max_connections = 0;
    assert!(tether.reload(broken).await.is_err());
    let text = tether.metrics();
    assert_eq!(
        value(&text, "tether_config_last_reload_successful", &[]),
        0.0
    );
    assert!(
        value(
            &text,
            "tether_config_last_reload_success_timestamp_seconds",
            &[]
        ) >= loaded_at,
        "the time of the configuration in force stays"
    );
    assert_eq!(
        value(
            &text,
            "tether_upstream_max_connections",
            &[("upstream", "a")]
        ),
        5.0,
        "a refused reload changes no cap"
    );
    tether.shutdown().await;
}

#[tokio::test]
async fn build_process_and_refusal_series_are_there_from_the_start() {
    let tether = start(support::config(&[])).await;
    let text = tether.metrics();
    let version = env!("CARGO_PKG_VERSION");
    let build = text
        .lines()
        .find(|l| l.starts_with("tether_build_info{"))
        .expect("tether_build_info");
    assert!(
        build.contains(&format!(r#"version="{version}""#)),
        "{build}"
    );
    assert!(build.contains(r#"commit=""#), "{build}");
    assert!(build.ends_with(" 1"), "{build}");
    let fds = value(&text, "process_open_fds", &[]);
    let max_fds = value(&text, "process_max_fds", &[]);
    assert!(fds >= 3.0 && max_fds > fds, "{fds} of {max_fds}");
    assert!(value(&text, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&text, "process_start_time_seconds", &[]) > 1.6e9);
    assert!(metric(&text, "process_cpu_seconds_total", &[]).is_some());
    for code in tether::error::ProxyError::CODES {
        assert_eq!(
            value(
                &text,
                "tether_downstream_requests_rejected_total",
                &[("reason", code)]
            ),
            0.0
        );
    }
    assert!(text.contains("# HELP tether_downstream_requests_rejected_total Requests tether answered with an error of its own"));
    tether.shutdown().await;
}

#[tokio::test]
async fn the_access_line_of_a_download_is_written_at_its_end_with_every_byte() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    route(&mut config, "a");
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let listener = tether.route_addrs[0];

    let reply = route_get(listener, "/stream/1048576?token=secret").await;
    assert_eq!(reply.body.len(), 1 << 20);
    let body = Bytes::from(vec![b'y'; 300_000]);
    let post = Request::post("/echo")
        .header("host", "x")
        .header("authorization", "Bearer secret")
        .body(Full::new(body))
        .unwrap();
    assert_eq!(send(listener, post).await.status, StatusCode::OK);

    assert!(
        eventually(WAIT, || async { access_lines(&logs).len() >= 2 }).await,
        "two access lines"
    );
    let lines = access_lines(&logs);
    let download = &lines[0];
    assert_eq!(download["upstream"], "a");
    assert_eq!(download["status"], 200);
    assert_eq!(download["path"], "/stream/1048576");
    assert_eq!(download["bytes_out"], 1048576);
    assert_eq!(download["reused"], false);
    assert!(download.get("error").is_none(), "{download}");
    let ttfb = download["ttfb_ms"].as_f64().unwrap();
    let duration = download["duration_ms"].as_f64().unwrap();
    assert!(duration >= ttfb, "{duration} >= {ttfb}");
    for field in ["ttfb_ms", "duration_ms", "queue_ms", "connect_ms"] {
        let ms = download[field].as_f64().unwrap();
        assert_eq!(
            (ms * 1000.0).round() / 1000.0,
            ms,
            "{field} has at most 3 decimals"
        );
    }
    let upload = &lines[1];
    assert_eq!(upload["bytes_in"], 300_000, "{upload}");
    assert_eq!(upload["reused"], true, "{upload}");

    let all = String::from_utf8(logs.bytes()).unwrap();
    assert!(
        !all.contains("secret"),
        "no token or Authorization in the log"
    );
    let ready: serde_json::Value = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["fields"]["message"] == "tether is ready")
        .expect("the startup line");
    let routes = ready["fields"]["routes"].as_str().unwrap();
    assert_eq!(routes, listener.to_string(), "no debug text: {ready}");
    assert!(ready["fields"].get("transparent").is_none(), "{ready}");
    tether.shutdown().await;
}

#[tokio::test]
async fn an_abandoned_download_is_logged_as_client_aborted_when_the_client_leaves() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    route(&mut config, "a");
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let mut client = TcpStream::connect(tether.route_addrs[0]).await.unwrap();
    client
        .write_all(b"GET /gated/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    client.read_exact(&mut first).await.unwrap();
    drop(client);
    assert!(
        eventually(WAIT, || async { !access_lines(&logs).is_empty() }).await,
        "the line is written when the client leaves"
    );
    let line = &access_lines(&logs)[0];
    assert_eq!(line["error"], "client_aborted", "{line}");
    assert_eq!(line["status"], 200);
    let text = tether.metrics();
    assert_eq!(
        value(
            &text,
            "tether_upstream_errors_total",
            &[("upstream", "a"), ("kind", "client_aborted")]
        ),
        1.0
    );
    tether.shutdown().await;
}

#[tokio::test]
async fn a_tunnel_is_logged_when_it_closes_with_its_bytes_and_reason() {
    let origin = Origin::start().await;
    let config = support::config(&[("a", &origin)]);
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let target = origin.authority();
    let mut stream = TcpStream::connect(tether.proxy_addr).await.unwrap();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let request = b"GET /bytes/5000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    assert!(response.ends_with(&[b'x'; 5000]));
    drop(stream);

    assert!(
        eventually(WAIT, || async { !access_lines(&logs).is_empty() }).await,
        "the tunnel's line"
    );
    let line = &access_lines(&logs)[0];
    assert_eq!(line["message"], "tunnel closed");
    assert_eq!(line["upstream"], "a");
    assert_eq!(line["target"], target.as_str());
    assert_eq!(line["close"], "remote_closed");
    assert_eq!(line["bytes_in"], request.len());
    assert_eq!(line["bytes_out"], response.len());
    assert!(line["duration_ms"].is_number());
    tether.shutdown().await;
}

#[tokio::test]
async fn the_live_exposition_passes_promtool_check_metrics() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    route(&mut config, "a");
    config.budget.max_connections = 8;
    let tether = start(config).await;
    assert_eq!(
        route_get(tether.route_addrs[0], "/").await.status,
        StatusCode::OK
    );
    let scrape = admin(&tether, "/metrics").await;
    // CI installs promtool (Debian's `prometheus`): its absence is a failure.
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus)");
    use std::io::Write as _;
    check.stdin.take().unwrap().write_all(&scrape.body).unwrap();
    let out = check.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool check metrics: {said}");
    assert!(said.trim().is_empty(), "no lint findings: {said}");
    tether.shutdown().await;
}

#[tokio::test]
async fn timeouts_before_and_after_the_head_count_as_kind_timeout() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    config.pool.response_header_timeout = Duration::from_millis(200);
    config.pool.request_timeout = Duration::from_millis(500);
    route(&mut config, "a");
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let listener = tether.route_addrs[0];
    // No head within response_header_timeout: tether answers 504.
    let reply = route_get(listener, "/delay/5000").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    // A head, then a body that never finishes: cut at request_timeout.
    let mut client = TcpStream::connect(listener).await.unwrap();
    client
        .write_all(b"GET /gated/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;
    assert!(rest.starts_with(b"HTTP/1.1 200"));

    assert!(eventually(WAIT, || async { access_lines(&logs).len() >= 2 }).await);
    let lines = access_lines(&logs);
    assert_eq!(lines[0]["status"], 504);
    assert_eq!(lines[0]["error"], "timeout");
    assert_eq!(lines[1]["status"], 200);
    assert_eq!(lines[1]["error"], "timeout", "{}", lines[1]);
    let text = tether.metrics();
    let a = |labels: &[(&str, &str)]| value(&text, "tether_upstream_responses_total", labels);
    assert_eq!(
        a(&[("upstream", "a"), ("code", "5xx"), ("kind", "timeout")]),
        1.0
    );
    assert_eq!(
        a(&[("upstream", "a"), ("code", "2xx"), ("kind", "none")]),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "tether_upstream_errors_total",
            &[("upstream", "a"), ("kind", "timeout")]
        ),
        2.0,
        "the 504 and the body cut after its head"
    );
    tether.shutdown().await;
}
