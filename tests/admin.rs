//! The admin listener's health, readiness and metrics endpoints.

mod support;

use support::*;

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    assert_eq!(admin(&tether, "/healthz").await.status, 200);
    assert_eq!(admin(&tether, "/readyz").await.status, 200);

    let reply = proxy_get(
        tether.proxy_addr,
        &format!("http://{}/status/404", origin.authority()),
    )
    .await;
    assert_eq!(reply.status, 404);
    let reply = proxy_get(
        tether.proxy_addr,
        &format!("http://{}/", origin.authority()),
    )
    .await;
    assert_eq!(reply.status, 200);

    let metrics = admin(&tether, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    let requests = |code| {
        metric(
            &text,
            "tether_upstream_requests_total",
            &[("upstream", "web"), ("code", code), ("reused", "false")],
        )
        .unwrap_or(0.0)
            + metric(
                &text,
                "tether_upstream_requests_total",
                &[("upstream", "web"), ("code", code), ("reused", "true")],
            )
            .unwrap_or(0.0)
    };
    assert_eq!(requests("2xx"), 1.0);
    assert_eq!(requests("4xx"), 1.0);
    assert!(text.contains("# HELP tether_upstream_connections "));
    assert!(text.contains("tether_upstream_request_duration_seconds_bucket"));
}

#[tokio::test]
async fn readyz_turns_503_on_shutdown() {
    let tether = start(config(&[])).await;
    let admin_addr = tether.admin_addr;
    let shared = tether.shared.clone();
    assert_eq!(route_get(admin_addr, "/readyz").await.status, 200);
    tether.shutdown().await;
    assert!(!shared.is_ready());
}

#[tokio::test]
async fn debug_pools_lists_live_connections() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    proxy_get(
        tether.proxy_addr,
        &format!("http://{}/", origin.authority()),
    )
    .await;
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    let pool = &json["pools"][0];
    assert_eq!(pool["upstream"], "web");
    assert_eq!(pool["limits"]["max_connections"], 32);
    assert_eq!(pool["open"], 1);
    let conns = pool["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["state"], "idle");
    assert_eq!(conns[0]["requests"], 1);
    assert!(conns[0]["local_port"].as_u64().unwrap() > 0);
}
