//! What an operator reads in `/metrics`: per-upstream response and error counters
//! (tether's own 502/503/504 included), the cap in force, series registered at
//! zero, build, reload and process series, and a live scrape that passes
//! `promtool check metrics`. The access log's view of the same failures is
//! checked alongside, where a test causes them.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::*;
use tether::testkit::refusing_addr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

    // Each line is written when its response body ends, which can be just after
    // the client has read it.
    let three = || async {
        access_lines(&logs)
            .iter()
            .filter(|l| l["status"] == 502)
            .count()
            >= 3
    };
    assert!(eventually(WAIT, three).await, "{:?}", access_lines(&logs));
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
