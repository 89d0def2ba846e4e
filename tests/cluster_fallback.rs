//! Cluster caps when the member list misleads: never readable (each pool falls
//! back to its own `max_connections`), unreadable after a good read (the share in
//! force stays), and this replica missing from it (share 0, no crash). Each says
//! so in the log and a metric.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::cluster::{cluster_config, held, write_members, UPSTREAM};
use support::{admin, eventually, metric, route_get, start, Captured, Origin, WAIT};
use tether::Running;

fn me() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

fn other() -> IpAddr {
    IpAddr::from([127, 0, 0, 9])
}

fn gauge(running: &Running, name: &str) -> f64 {
    metric(&running.metrics(), name, &[]).unwrap_or(f64::NAN)
}

/// Waits for the cap in force to become `cap`, and holds the exported
/// `tether_upstream_max_connections` to it: the share is what the gauge says.
async fn cap_becomes(running: &Running, cap: usize) {
    let ok = eventually(WAIT, || async { held(running).1 == cap }).await;
    assert!(ok, "the cap in force stayed {}, not {cap}", held(running).1);
    let exported = metric(
        &running.metrics(),
        "tether_upstream_max_connections",
        &[("upstream", UPSTREAM)],
    );
    assert_eq!(exported, Some(cap as f64), "the cap gauge disagrees");
}

#[tokio::test]
async fn a_list_never_read_falls_back_to_the_own_cap_and_says_so() {
    let (logs, _guard) = Captured::install();
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("members"); // not there yet
    let mut cfg = cluster_config(&origin, me(), &file, 16);
    cfg.pool.max_connections = 3;
    let tether = start(cfg).await;
    assert_eq!(
        held(&tether).1,
        3,
        "max_connections stands in for the cluster cap"
    );
    assert_eq!(gauge(&tether, "tether_cluster_fallback"), 1.0);
    let debug = admin(&tether, "/debug/pools").await.text();
    let status: serde_json::Value = serde_json::from_str(&debug).unwrap();
    assert_eq!(status["cluster"]["fallback"], true, "{debug}");
    assert_eq!(status["pools"][0]["share"], 3, "{debug}");
    let log = String::from_utf8(logs.bytes()).unwrap();
    assert!(log.contains("never could"), "{log}");
    assert!(log.contains("max_connections"), "{log}");

    // Requests are served within it: the origin never holds more than 3.
    let route = tether.route_addrs[0];
    let replies =
        futures_util::future::join_all((0..8).map(|_| route_get(route, "/delay/50"))).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert!(origin.peak() <= 3, "the origin held {}", origin.peak());

    // Once the list is read, the fallback ends; a new member takes nothing until it
    // has read it twice and held off.
    // Falling back it is ready; joining, it is not until it has its share, so the
    // Service sends it no clients that would only queue.
    assert_eq!(admin(&tether, "/readyz").await.status, 200);
    write_members(&file, &[me(), other()]);
    cap_becomes(&tether, 0).await;
    assert_eq!(gauge(&tether, "tether_cluster_fallback"), 0.0);
    let readyz = admin(&tether, "/readyz").await;
    assert_eq!(readyz.status, 503);
    assert!(
        readyz.text().contains("joining the cluster"),
        "{}",
        readyz.text()
    );
    cap_becomes(&tether, 3).await; // min(8, max_connections)
    assert_eq!(admin(&tether, "/readyz").await.status, 200);
}

#[tokio::test]
async fn an_unreadable_list_keeps_the_share_in_force() {
    let (logs, _guard) = Captured::install();
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("members");
    write_members(&file, &[me(), other()]);
    let tether = start(cluster_config(&origin, me(), &file, 6)).await;
    cap_becomes(&tether, 3).await;
    std::fs::remove_file(&file).unwrap();
    let failed = eventually(WAIT, || async {
        gauge(&tether, "tether_cluster_read_failures_total") >= 3.0
    })
    .await;
    assert!(failed, "reads did not fail");
    assert_eq!(held(&tether).1, 3, "the last share stays in force");
    assert_eq!(gauge(&tether, "tether_cluster_fallback"), 0.0);
    assert_eq!(gauge(&tether, "tether_cluster_members"), 2.0);
    let log = String::from_utf8(logs.bytes()).unwrap();
    assert!(log.contains("keeping the shares in force"), "{log}");
    // Readable again, alone: the whole cap, after the hold-off.
    write_members(&file, &[me()]);
    cap_becomes(&tether, 6).await;
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
}

#[tokio::test]
async fn a_replica_missing_from_the_list_opens_no_socket_and_says_so() {
    let (logs, _guard) = Captured::install();
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("members");
    write_members(&file, &[other()]);
    let mut cfg = cluster_config(&origin, me(), &file, 6);
    cfg.pool.queue_timeout = Duration::from_millis(200);
    let tether = start(cfg).await;
    assert_eq!(held(&tether).1, 0);
    assert_eq!(gauge(&tether, "tether_cluster_self_missing"), 1.0);
    let reply = route_get(tether.route_addrs[0], "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.tether_error(), Some("queue_timeout"));
    assert_eq!(origin.accepted(), 0, "no socket was opened");
    let log = String::from_utf8(logs.bytes()).unwrap();
    assert!(log.contains("not in the member list"), "{log}");
    assert_eq!(
        admin(&tether, "/healthz").await.status,
        200,
        "still running"
    );
    let page = admin(&tether, "/").await.text();
    assert!(page.contains("this replica is not listed"), "{page}");
    assert!(page.contains(r#"data-field="share">0<"#), "{page}");
    // Listed: it takes its share after the hold-off.
    write_members(&file, &[me(), other()]);
    cap_becomes(&tether, 3).await;
    assert_eq!(gauge(&tether, "tether_cluster_self_missing"), 0.0);
}

#[tokio::test]
async fn a_replica_without_self_takes_no_share_and_says_so() {
    let (logs, _guard) = Captured::install();
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("members");
    write_members(&file, &[me(), other()]);
    let mut cfg = cluster_config(&origin, me(), &file, 6);
    cfg.cluster.self_addr = None; // TETHER_CLUSTER__SELF forgotten
    let tether = start(cfg).await;
    assert_eq!(held(&tether).1, 0);
    assert_eq!(gauge(&tether, "tether_cluster_self_missing"), 1.0);
    let log = String::from_utf8(logs.bytes()).unwrap();
    assert!(log.contains("cluster.self is not set"), "{log}");
}
