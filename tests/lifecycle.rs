//! Lifecycle: graceful drain on SIGTERM/SIGINT, live reload on SIGHUP (and through
//! `Running::reload`), with real sockets and the real binary.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;
use tether::config::Config;

fn reloads(tether: &tether::Running, result: &str) -> f64 {
    metric(
        &tether.metrics(),
        "tether_config_reloads_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_reload_lowering_the_cap_closes_idle_sockets_down_to_it() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.pool.max_connections = 4;
    let tether = start(cfg.clone()).await;
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { route_get(route, "/delay/200").await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_sockets(&tether, &origin, "up", 4).await;

    cfg.pool.max_connections = 2;
    tether.reload(cfg).await.unwrap();
    assert_sockets(&tether, &origin, "up", 2).await;
    assert_eq!(reloads(&tether, "success"), 1.0);
    let peak_before = origin.accepted();
    let tasks: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { route_get(route, "/delay/100").await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        origin.accepted(),
        peak_before,
        "the two kept sockets served everything"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    assert_eq!(json["pools"][0]["limits"]["max_connections"], 2);
}

#[tokio::test]
async fn a_reload_raising_the_cap_admits_waiters() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.pool.max_connections = 1;
    let tether = start(cfg.clone()).await;
    let route = tether.route_addrs[0];
    let slow = tokio::spawn(async move { route_get(route, "/delay/3000").await.status });
    assert!(eventually(WAIT, || async { origin.requests() == 1 }).await);
    let waiting = tokio::spawn(async move { route_get(route, "/").await.status });
    let depth = || {
        metric(
            &tether.metrics(),
            "tether_upstream_queue_depth",
            &[("upstream", "up")],
        )
    };
    assert!(eventually(WAIT, || async { depth() == Some(1.0) }).await);
    cfg.pool.max_connections = 2;
    tether.reload(cfg).await.unwrap();
    // The waiter is served on a second socket while the slow request still runs.
    assert_eq!(waiting.await.unwrap(), 200);
    assert!(!slow.is_finished());
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn a_reload_adds_and_removes_upstreams_and_routes() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let mut cfg = config(&[("a", &a)]);
    route(&mut cfg, "a");
    let tether = start(cfg).await;
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    assert_eq!(a.open(), 1);

    let mut cfg = config(&[("b", &b)]);
    let b_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b_addr = b_listener.local_addr().unwrap();
    drop(b_listener);
    cfg.route.push(tether::config::RouteConfig {
        listen: b_addr,
        upstream: "b".into(),
    });
    tether.reload(cfg).await.unwrap();

    assert_eq!(
        route_get(b_addr, "/").await.status,
        200,
        "the added route serves"
    );
    assert_eq!(b.accepted(), 1);
    assert!(
        eventually(WAIT, || async { a.open() == 0 }).await,
        "the removed upstream drained"
    );
    let old_route = tether.route_addrs[0];
    assert!(
        eventually(WAIT, || async {
            tokio::net::TcpStream::connect(old_route).await.is_err()
        })
        .await,
        "the removed route stopped listening"
    );
    let reply = proxy_get(tether.proxy_addr, &format!("http://{}/", a.authority())).await;
    assert_eq!(reply.status, 403, "a removed upstream is no longer allowed");
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_running_configuration() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    let tether = start(cfg.clone()).await;
    let mut bad = cfg.clone();
    bad.pool.max_connections = 0;
    bad.route[0].upstream = "missing".into();
    let err = tether.reload(bad).await.unwrap_err();
    assert!(err.to_string().contains("max_connections"), "{err}");
    assert_eq!(reloads(&tether, "failure"), 1.0);
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_closes_idle_sockets_at_once() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    let tether = start(cfg).await;
    let route = tether.route_addrs[0];
    // Two sockets: one stays idle, one carries a slow request.
    let (a, b) = tokio::join!(
        route_get(route, "/delay/100"),
        route_get(route, "/delay/100")
    );
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    let slow = tokio::spawn(async move { route_get(route, "/delay/1000").await });
    assert!(
        eventually(WAIT, || async {
            origin.requests() == 3 && origin.open() == 2
        })
        .await
    );
    let shared = tether.shared.clone();
    let shutdown = tokio::spawn(tether.shutdown());
    assert!(
        eventually(WAIT, || async { origin.open() == 1 }).await,
        "the idle socket closed at once"
    );
    assert!(!shared.is_ready());
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request completed");
    assert_eq!(shutdown.await.unwrap(), 0, "nothing had to be cut");
    assert!(eventually(WAIT, || async { origin.open() == 0 }).await);
}

#[tokio::test]
async fn a_request_still_running_at_drain_timeout_is_cut_and_counted() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.proxy.drain_timeout = Duration::from_millis(300);
    let tether = start(cfg).await;
    let route = tether.route_addrs[0];
    let _slow = tokio::spawn(async move { route_get(route, "/delay/5000").await });
    assert!(eventually(WAIT, || async { origin.requests() == 1 }).await);
    assert_eq!(tether.shutdown().await, 1);
}

/// The tether binary running with `config`, its listeners read from its log.
struct Binary {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// The runtime threads its ready line names.
    threads: usize,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn start(config: &Config) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TETHER_")) {
            cmd.env_remove(k);
        }
        // The config file is the whole config: tokio's own thread-count variable
        // would stand in for `worker_threads = 0`.
        cmd.env_remove("TOKIO_WORKER_THREADS");
        let mut child = cmd
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let ready = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.contains("tether is ready"))
            .expect("tether logs that it is ready");
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let field = |name: &str| -> &str {
            let start = ready.find(&format!(" {name}=")).unwrap() + name.len() + 2;
            ready[start..].split_whitespace().next().unwrap()
        };
        Binary {
            proxy: field("proxy_addr").parse().unwrap(),
            admin: field("admin_addr").parse().unwrap(),
            threads: field("threads").parse().unwrap(),
            child,
            path,
            _dir: dir,
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; its exit code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    cfg.proxy.drain_timeout = Duration::from_secs(10);
    let mut tether = Binary::start(&cfg);
    let url = format!("http://{}/stream/50000000", origin.authority());
    let proxy = tether.proxy;
    // A slow-to-read streamed response is in flight when the signal arrives.
    let in_flight = tokio::spawn(async move { proxy_get(proxy, &format!("{url}?slow")).await });
    assert!(eventually(WAIT, || async { origin.requests() == 1 }).await);
    tether.signal("TERM");
    assert!(
        eventually(WAIT, || async {
            route_get(tether.admin, "/readyz").await.status == 503
        })
        .await,
        "/readyz turns 503 while draining"
    );
    assert!(
        eventually(WAIT, || async {
            tokio::net::TcpStream::connect(proxy).await.is_err()
        })
        .await,
        "the proxy listener stops accepting"
    );
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body.len(),
        50_000_000,
        "the in-flight response completed"
    );
    assert_eq!(tether.wait_exit(WAIT), Some(0));
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_a_bad_file_keeps_the_old_one() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    cfg.pool.max_connections = 2;
    let tether = Binary::start(&cfg);
    let limit = || async {
        let json: serde_json::Value =
            serde_json::from_slice(&route_get(tether.admin, "/debug/pools").await.body).unwrap();
        json["pools"][0]["limits"]["max_connections"].as_u64()
    };
    assert_eq!(limit().await, Some(2));
    cfg.pool.max_connections = 5;
    // The same listener addresses (port 0: kept as bound); only the limits change.
    std::fs::write(&tether.path, cfg.to_toml()).unwrap();
    tether.signal("HUP");
    assert!(
        eventually(WAIT, || async { limit().await == Some(5) }).await,
        "SIGHUP applied the new cap"
    );

    std::fs::write(&tether.path, "[pool]\nmax_connections = 0\n").unwrap();
    tether.signal("HUP");
    let failures = || async {
        metric(
            &route_get(tether.admin, "/metrics").await.text(),
            "tether_config_reloads_total",
            &[("result", "failure")],
        )
    };
    assert!(eventually(WAIT, || async { failures().await == Some(1.0) }).await);
    assert_eq!(limit().await, Some(5), "the bad file changed nothing");
    let reply = proxy_get(tether.proxy, &format!("http://{}/", origin.authority())).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_second_sigterm_during_the_drain_exits_at_once() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    cfg.proxy.drain_timeout = Duration::from_secs(60);
    let mut tether = Binary::start(&cfg);
    let url = format!("http://{}/delay/60000", origin.authority());
    let proxy = tether.proxy;
    // A request that would hold the drain for its whole timeout.
    let _in_flight = tokio::spawn(async move { proxy_get(proxy, &url).await });
    assert!(eventually(WAIT, || async { origin.requests() == 1 }).await);
    tether.signal("TERM");
    assert!(
        eventually(WAIT, || async {
            route_get(tether.admin, "/readyz").await.status == 503
        })
        .await,
        "draining"
    );
    assert_eq!(
        tether.wait_exit(Duration::from_millis(300)),
        None,
        "still draining"
    );
    tether.signal("TERM");
    assert_eq!(
        tether.wait_exit(WAIT),
        Some(128 + 15),
        "the second SIGTERM ends the drain at once"
    );
}

/// `POST /admin/drain` on a loopback admin listener does what SIGTERM does: not
/// ready, the in-flight request finishes, the process exits 0.
#[tokio::test]
async fn a_drain_asked_for_on_the_admin_listener_finishes_in_flight_requests_and_exits_0() {
    let origin = Origin::start().await;
    let mut tether = Binary::start(&config(&[("up", &origin)]));
    // Long enough that the admin listener (up until the drain ends) answers below.
    let url = format!("http://{}/delay/3000", origin.authority());
    let proxy = tether.proxy;
    let in_flight = tokio::spawn(async move { proxy_get(proxy, &url).await.status });
    assert!(eventually(WAIT, || async { origin.requests() == 1 }).await);
    let req = http::Request::post("/admin/drain")
        .header(http::header::HOST, tether.admin.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(tether.admin, req).await.status, 202);
    assert_eq!(route_get(tether.admin, "/readyz").await.status, 503);
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request finished"
    );
    assert_eq!(tether.wait_exit(WAIT), Some(0));
}

/// The runtime's worker threads of a running tether process (tokio names them;
/// the current-thread scheduler has none).
fn runtime_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with("tokio-r"))
        .count()
}

#[tokio::test]
async fn worker_threads_sets_the_runtime_threads_the_binary_serves_on() {
    let origin = Origin::start().await;
    let url = format!("http://{}/bytes/10", origin.authority());
    let serving = |threads: usize| {
        let mut cfg = config(&[("up", &origin)]);
        cfg.proxy.worker_threads = threads;
        Binary::start(&cfg)
    };
    // One thread is the current-thread scheduler: the main thread serves, and
    // there are no worker threads.
    let tether = serving(1);
    assert_eq!(proxy_get(tether.proxy, &url).await.status, 200);
    assert_eq!(runtime_threads(tether.child.id()), 0, "worker_threads = 1");
    assert_eq!(tether.threads, 1, "the ready line says so");

    let tether = serving(3);
    assert_eq!(proxy_get(tether.proxy, &url).await.status, 200);
    assert!(
        runtime_threads(tether.child.id()) >= 3,
        "worker_threads = 3"
    );
    assert_eq!(tether.threads, 3);

    // 0 (the default) is one per CPU core, and one core is the one-thread shape.
    let cores = std::thread::available_parallelism().unwrap().get();
    let tether = serving(0);
    assert_eq!(proxy_get(tether.proxy, &url).await.status, 200);
    let threads = runtime_threads(tether.child.id());
    assert_eq!(tether.threads, cores, "the ready line names what 0 came to");
    match cores {
        1 => assert_eq!(threads, 0, "one core: the current-thread scheduler"),
        _ => assert!(threads >= cores, "one worker per core by default"),
    }
}
