//! What a reload says it changed, and the keys it cannot change. In a test binary of
//! its own: the log is captured with a thread-local subscriber (see
//! tests/transparent_log.rs for why).

mod support;

use support::*;
use tether::config::UpstreamConfig;

#[tokio::test(flavor = "current_thread")]
async fn a_reload_logs_what_changed_and_keeps_restart_only_keys_with_a_warning() {
    let (logs, _guard) = Captured::install();
    let (a, b, c) = (
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    );
    let mut cfg = config(&[("a", &a), ("b", &b)]);
    cfg.pool.max_connections = 4;
    let tether = start(cfg.clone()).await;

    cfg.upstream.remove(0);
    cfg.upstream.push(UpstreamConfig::new("c", c.authority()));
    cfg.upstream[0].max_connections = Some(1);
    cfg.pool.max_connections = 2;
    // A listener address cannot move without a restart.
    cfg.admin.listen = "127.0.0.2:0".parse().unwrap();
    tether.reload(cfg).await.unwrap();

    let text = String::from_utf8(logs.bytes()).unwrap();
    let reloaded = text
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap_or_else(|| panic!("no reload line in\n{text}"));
    assert!(
        reloaded.contains(
            "configuration reloaded: added upstream \"c\"; removed upstream \"a\"; \
             pool.max_connections: 4 -> 2; upstream[0].max_connections: unset -> 1"
        ),
        "{reloaded}"
    );
    assert!(
        !reloaded.contains("admin.listen"),
        "held back, not applied: {reloaded}"
    );
    let warning = text
        .lines()
        .find(|l| l.contains(" WARN ") && l.contains("admin.listen"))
        .unwrap_or_else(|| panic!("no warning naming admin.listen in\n{text}"));
    assert!(
        warning.contains("admin.listen changes only on restart: keeping the running value"),
        "{warning}"
    );

    // What the log says is what is in force.
    let table = tether.shared.table();
    assert_eq!(table.config.admin.listen.to_string(), "127.0.0.1:0");
    assert_eq!(
        admin(&tether, "/readyz").await.status,
        200,
        "same admin socket"
    );
    assert!(tether.pool_counts("a").is_none());
    let reply = proxy_get(tether.proxy_addr, &format!("http://{}/", c.authority())).await;
    assert_eq!(reply.status, 200, "the added upstream serves");
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    let pools = json["pools"].as_array().unwrap();
    let limit = |name: &str| {
        pools.iter().find(|p| p["upstream"] == name).unwrap()["limits"]["max_connections"].clone()
    };
    assert_eq!(limit("b"), 1);
    assert_eq!(limit("c"), 2);
}
