//! Fair shares for the gateway's clients: one leaky client must not crowd out the
//! others (issue #22). Clients are real loopback sockets bound to their own source
//! addresses, so tether tells them apart by peer IP as it does in a gateway.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use support::*;
use tether::server::Downstream;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

const LEAKY: &str = "127.0.0.2";
const POLITE: &str = "127.0.0.3";
const BUSY: &str = "127.0.0.4";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One keep-alive client connection from `source`; `closed()` once tether closed it.
struct Conn {
    send: SendRequest<Empty<Bytes>>,
    task: JoinHandle<()>,
}

impl Conn {
    async fn open(source: IpAddr, to: SocketAddr) -> Conn {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let stream = socket.connect(to).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { send, task }
    }

    /// One request on this connection: its status, or `None` if it failed.
    async fn get(&mut self, path: &str) -> Option<u16> {
        self.send.ready().await.ok()?;
        let req = http::Request::get(path)
            .header("host", "x")
            .body(Empty::new())
            .unwrap();
        let resp = self.send.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    }

    fn closed(&self) -> bool {
        self.task.is_finished()
    }
}

/// Samples tether's per-client counts every few milliseconds until stopped: the
/// peak each client held and the peak of all client connections.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<usize>>,
}

impl Sampler {
    fn start(downstream: Arc<Downstream>, clients: &[IpAddr]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = clients.to_vec();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peaks = vec![0; clients.len() + 1];
                loop {
                    for (i, c) in clients.iter().enumerate() {
                        peaks[i] = peaks[i].max(downstream.open_from(*c));
                    }
                    let last = peaks.len() - 1;
                    peaks[last] = peaks[last].max(downstream.open());
                    if stop.load(Ordering::Relaxed) {
                        return peaks;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        });
        Sampler { stop, task }
    }

    async fn peaks(self) -> Vec<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

fn closed(tether: &tether::Running, reason: &str) -> f64 {
    metric(
        &tether.metrics(),
        "tether_downstream_connections_closed_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

async fn routed(origin: &Origin, f: impl FnOnce(&mut tether::config::Config)) -> tether::Running {
    let mut cfg = config(&[("up", origin)]);
    route(&mut cfg, "up");
    f(&mut cfg);
    start(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaky_client_at_max_client_connections_loses_its_own_connections_not_the_polite_clients()
{
    const LIMIT: usize = 100;
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| cfg.proxy.max_client_connections = LIMIT).await;
    let route = tether.route_addrs[0];
    let sampler = Sampler::start(tether.shared.downstream().clone(), &[ip(LEAKY), ip(POLITE)]);

    // The polite client: 10 keep-alive connections, a request on each every 100 ms
    // for as long as the leaky client is at it.
    let mut polite = Vec::new();
    for _ in 0..10 {
        let mut c = Conn::open(ip(POLITE), route).await;
        assert_eq!(c.get("/").await, Some(200));
        polite.push(c);
    }
    let leaking = Arc::new(AtomicBool::new(true));
    let served = Arc::new(AtomicUsize::new(0));
    let polite = tokio::spawn({
        let (leaking, served) = (leaking.clone(), served.clone());
        async move {
            let mut failed = 0;
            let mut rounds = 0;
            // At least three rounds after the leak is over: idle the longest then.
            let mut after = 0;
            while after < 3 {
                if !leaking.load(Ordering::Relaxed) {
                    after += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                for c in polite.iter_mut() {
                    match c.get("/").await {
                        Some(200) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => failed += 1,
                    }
                }
                rounds += 1;
            }
            let evicted = polite.iter().filter(|c| c.closed()).count();
            (rounds, failed, evicted)
        }
    });

    // The leaky client: 500 keep-alive connections, one request each, then idle.
    let mut leaky = Vec::new();
    let mut leaky_ok = 0;
    for _ in 0..500 {
        let mut c = Conn::open(ip(LEAKY), route).await;
        if c.get("/").await == Some(200) {
            leaky_ok += 1;
        }
        leaky.push(c);
    }
    leaking.store(false, Ordering::Relaxed);
    let (rounds, failed, evicted) = polite.await.unwrap();
    let peaks = sampler.peaks().await;
    println!(
        "max_client_connections = {LIMIT}: peak connections held: leaky {LEAKY} {}, polite {POLITE} {}, all {}; \
         polite: {} requests in {rounds} rounds, {failed} failed, {evicted} connections evicted; \
         leaky: {leaky_ok}/500 served, evicted (all clients) {}",
        peaks[0],
        peaks[1],
        peaks[2],
        served.load(Ordering::Relaxed),
        closed(&tether, "evicted"),
    );
    assert_eq!(failed, 0, "every polite request succeeds");
    assert_eq!(evicted, 0, "none of the polite connections is evicted");
    assert!(peaks[2] <= LIMIT, "all clients together: {}", peaks[2]);
    assert!(
        peaks[0] <= LIMIT - 10,
        "the leaky client holds at most what the polite one leaves: {}",
        peaks[0]
    );
    assert_eq!(peaks[1], 10);
    assert!(closed(&tether, "evicted") >= 400.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_per_client_a_client_evicts_its_own_oldest_idle_then_is_refused() {
    const PER_CLIENT: usize = 20;
    const OPENED: usize = 100;
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| {
        cfg.proxy.max_connections_per_client = Some(PER_CLIENT)
    })
    .await;
    let route = tether.route_addrs[0];
    let downstream = tether.shared.downstream().clone();
    let sampler = Sampler::start(downstream.clone(), &[ip(LEAKY), ip(POLITE), ip(BUSY)]);

    // A polite client's connections are not touched by the leaky one's.
    let mut polite = Vec::new();
    for _ in 0..5 {
        let mut c = Conn::open(ip(POLITE), route).await;
        assert_eq!(c.get("/").await, Some(200));
        polite.push(c);
    }

    // The leaky client: each connection past its 20th evicts its own oldest idle one.
    let mut leaky = Vec::new();
    for i in 0..OPENED {
        let mut c = Conn::open(ip(LEAKY), route).await;
        assert_eq!(c.get("/").await, Some(200), "leaky connection {i}");
        leaky.push(c);
        let held = downstream.open_from(ip(LEAKY));
        assert!(held <= PER_CLIENT, "after connection {i}: {held}");
    }
    let evictions = (OPENED - PER_CLIENT) as f64;
    assert!(eventually(WAIT, || async { closed(&tether, "evicted") == evictions }).await);
    assert!(
        eventually(WAIT, || async {
            leaky[..OPENED - PER_CLIENT].iter().all(Conn::closed)
        })
        .await,
        "the oldest were evicted"
    );
    assert!(
        leaky[OPENED - PER_CLIENT..].iter().all(|c| !c.closed()),
        "the newest 20 stay"
    );
    assert!(polite.iter().all(|c| !c.closed()));
    assert_eq!(closed(&tether, "client_limit"), 0.0);

    // A client whose 20 connections are all busy: its 21st is refused, counted.
    let before = origin.requests();
    let busy: Vec<_> = (0..PER_CLIENT)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Conn::open(ip(BUSY), route).await;
                c.get("/delay/1500").await
            })
        })
        .collect();
    assert!(eventually(WAIT, || async { origin.requests() == before + PER_CLIENT }).await);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(BUSY), 0)).unwrap();
    let mut refused = socket.connect(route).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, refused.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the 21st is closed: {read:?}"
    );
    assert_eq!(closed(&tether, "client_limit"), 1.0);
    assert_eq!(closed(&tether, "evicted"), evictions, "no busy one evicted");
    for b in busy {
        assert_eq!(b.await.unwrap(), Some(200));
    }

    let peaks = sampler.peaks().await;
    println!(
        "max_connections_per_client = {PER_CLIENT}: peak connections held: leaky {LEAKY} {}, \
         polite {POLITE} {}, busy {BUSY} {}, all {}; evicted {}, client_limit {}",
        peaks[0],
        peaks[1],
        peaks[2],
        peaks[3],
        closed(&tether, "evicted"),
        closed(&tether, "client_limit"),
    );
    assert!(
        peaks[0] <= PER_CLIENT && peaks[2] <= PER_CLIENT,
        "{peaks:?}"
    );
    assert_eq!(peaks[0], PER_CLIENT);
    let top = admin(&tether, "/debug/clients").await.text();
    assert!(top.contains("\"by_connections\""), "{top}");
}

#[tokio::test]
async fn max_connections_per_client_is_reloadable() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |_| {}).await;
    let route = tether.route_addrs[0];
    let downstream = tether.shared.downstream().clone();
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut c = Conn::open(ip(LEAKY), route).await;
        assert_eq!(c.get("/").await, Some(200));
        held.push(c);
    }
    assert_eq!(downstream.open_from(ip(LEAKY)), 5, "no per-client limit");

    let mut cfg = tether.shared.table().config.as_ref().clone();
    cfg.proxy.max_connections_per_client = Some(2);
    tether.reload(cfg).await.unwrap();
    // The next connection is admitted under the new limit: it evicts its own
    // idle connections until the client holds 2.
    let mut c = Conn::open(ip(LEAKY), route).await;
    assert_eq!(c.get("/").await, Some(200));
    held.push(c);
    assert!(downstream.open_from(ip(LEAKY)) <= 2);
    assert!(
        eventually(WAIT, || async {
            held.iter().filter(|c| !c.closed()).count() <= 2
        })
        .await
    );
    let clients = admin(&tether, "/debug/clients").await.text();
    let clients: serde_json::Value = serde_json::from_str(&clients).unwrap();
    let top = &clients["by_connections"][0];
    assert_eq!(top["address"], LEAKY, "{clients}");
    assert_eq!(top["limit"], 2, "{clients}");
    assert!(top["evicted"].as_u64().unwrap() >= 1, "{clients}");
}
