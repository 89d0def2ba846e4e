//! The deploy side agrees with the code: every metric the Grafana dashboard queries
//! exists in a live scrape, and every config shipped under deploy/ is valid (the
//! latter also in tests/config.rs through `tether check-config`).

mod support;

use std::collections::BTreeSet;

use support::*;

/// `tether_*` base names the dashboard's queries use (histogram suffixes stripped).
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tether.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has queries");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("tether_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_string());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_exists_in_a_live_scrape() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.budget.max_connections = 8;
    cfg.pool.max_connections = 1;
    let tether = start(cfg).await;
    let route = tether.route_addrs[0];
    // Traffic that touches every family: requests, a queued request, a refusal,
    // a tunnel, a reload.
    let (a, b) = tokio::join!(route_get(route, "/delay/100"), route_get(route, "/"));
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    assert_eq!(
        proxy_get(tether.proxy_addr, "http://denied.invalid:81/")
            .await
            .status,
        403
    );
    let mut tunnel = tokio::net::TcpStream::connect(tether.proxy_addr)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = origin.authority();
    tunnel
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let _ = tunnel.read(&mut buf).await.unwrap();
    tether
        .reload(tether.shared.table().config.as_ref().clone())
        .await
        .unwrap();

    let scrape = admin(&tether, "/metrics").await.text();
    let missing: Vec<String> = dashboard_metrics()
        .into_iter()
        .filter(|name| {
            !scrape
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name.as_str()))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics a live tether does not export: {missing:?}"
    );
}
