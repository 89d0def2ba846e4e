//! Governance beyond a fixed cap: adaptive idle timeouts from the upstream's own
//! `Keep-Alive`, a shared connection budget, leak diagnosis, warm floors.

mod support;

use std::time::Duration;

use support::*;
use tether::config::Config;

fn closed(tether: &tether::Running, reason: &str) -> f64 {
    metric(
        &tether.metrics(),
        "tether_upstream_connections_closed_total",
        &[("upstream", "up"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Gaps between requests, pseudo-random but repeatable, straddling the upstream's
/// one-second keep-alive timeout.
fn gaps() -> impl Iterator<Item = Duration> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..10).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Duration::from_millis(100 + x % 1400)
    })
}

async fn run_pattern(adaptive: bool) -> (tether::Running, Origin) {
    // The upstream advertises `Keep-Alive: timeout=1` and closes idle sockets at 1 s;
    // tether's own idle timeout is a minute.
    let origin = Origin::start_with(OriginOptions {
        idle_close_after: Some(Duration::from_secs(1)),
        advertise_keep_alive: Some(1),
        ..Default::default()
    })
    .await;
    let mut cfg: Config = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.pool.idle_timeout = Duration::from_secs(60);
    cfg.pool.reap_interval = Duration::from_millis(50);
    cfg.pool.keepalive_margin = Duration::from_millis(300);
    cfg.pool.adaptive_keepalive = adaptive;
    let tether = start(cfg).await;
    for gap in gaps() {
        assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
        tokio::time::sleep(gap).await;
    }
    (tether, origin)
}

#[tokio::test]
async fn an_advertised_keep_alive_timeout_makes_tether_close_first() {
    let (tether, origin) = run_pattern(true).await;
    let stale = metric(
        &tether.metrics(),
        "tether_upstream_stale_retries_total",
        &[("upstream", "up")],
    );
    assert_eq!(
        stale,
        Some(0.0),
        "no request ever met a socket the upstream had closed"
    );
    assert_eq!(
        closed(&tether, "remote_closed"),
        0.0,
        "the upstream never had to close one"
    );
    assert!(closed(&tether, "idle_timeout") >= 1.0);
    // The effective limit shows per connection.
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    assert_eq!(
        json["pools"][0]["connections"][0]["keepalive"]["idle_timeout"],
        "700ms"
    );
    assert_sockets(&tether, &origin, "up", 0).await;
}

#[tokio::test]
async fn without_adaptive_keepalive_the_upstream_closes_first() {
    let (tether, _origin) = run_pattern(false).await;
    // Every request still succeeds (stale sockets are retried), but the closes are
    // the upstream's: the race the adaptive timeout avoids.
    assert!(closed(&tether, "remote_closed") >= 1.0);
    assert_eq!(closed(&tether, "idle_timeout"), 0.0);
}
