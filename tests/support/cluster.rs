//! Helpers for the cluster tests: tether instances that share one cluster cap
//! through a member file, steady load through them, and samples of what each
//! instance and the origin hold.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tether::config::{Config, Members};
use tether::Running;
use tokio::net::TcpStream;

use super::{config, route, start, Origin};

/// The upstream every instance sends to.
pub const UPSTREAM: &str = "origin";

/// Writes the member file atomically (a rename), as a ConfigMap update lands.
pub fn write_members(path: &Path, members: &[IpAddr]) {
    let text: String = std::iter::once("# tether gateway replicas\n".to_string())
        .chain(members.iter().map(|m| format!("{m}\n")))
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the member file");
    std::fs::rename(&tmp, path).expect("replace the member file");
}

/// A config for the instance at `me`: its listeners on `me`, port 0, one route to
/// `origin` under a cluster cap of `total`, the members read from `members` every
/// 100 ms. Exchanges are short (the origin answers in milliseconds), so a
/// hold-off of 10 refreshes covers the others' reads and their drain with room
/// for a loaded machine's scheduling (the derived
/// one would add `request_timeout`, which here must outlast the queueing while a
/// member's share is 0).
pub fn cluster_config(origin: &Origin, me: IpAddr, members: &Path, total: usize) -> Config {
    let mut c = config(&[(UPSTREAM, origin)]);
    c.proxy.listen = SocketAddr::new(me, 0);
    c.admin.listen = SocketAddr::new(me, 0);
    route(&mut c, UPSTREAM);
    c.route[0].listen = SocketAddr::new(me, 0);
    c.cluster.members = Some(Members::File(members.to_path_buf()));
    c.cluster.self_addr = Some(me);
    c.cluster.refresh = Duration::from_millis(100);
    c.cluster.hold_off = Some(Duration::from_secs(1));
    c.pool.cluster_max_connections = Some(total);
    c.pool.queue_timeout = Duration::from_secs(5);
    c
}

pub async fn start_member(config: Config) -> Arc<Running> {
    Arc::new(start(config).await)
}

/// What one instance holds now: sockets open to the upstream and the cap in force.
pub fn held(running: &Running) -> (usize, usize) {
    let table = running.shared.table();
    let up = table
        .listed
        .iter()
        .find(|u| &*u.name == UPSTREAM)
        .expect("the upstream is listed");
    let snapshot = up.pool.snapshot();
    (snapshot.open, snapshot.cap)
}

/// Clients sending requests in a loop, each on its own keep-alive connection,
/// until stopped. Counts answers by whether they were 200.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` clients on each of `routes`, each sending `path` back to back.
    pub fn start(routes: &[SocketAddr], clients: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for &addr in routes {
            for _ in 0..clients {
                let (stop, ok, refused) = (stop.clone(), ok.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(stream) = TcpStream::connect(addr).await else {
                            return;
                        };
                        let Ok((mut sender, conn)) = http1::handshake(TokioIo::new(stream)).await
                        else {
                            continue;
                        };
                        tokio::spawn(conn);
                        while !stop.load(Ordering::Relaxed) {
                            let req = Request::get(path)
                                .header(http::header::HOST, addr.to_string())
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            let Ok(resp) = sender.send_request(req).await else {
                                break; // tether closed the connection: open another
                            };
                            let good = resp.status().is_success();
                            let _ = resp.into_body().collect().await;
                            let counter = if good { &ok } else { &refused };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        Load {
            stop,
            ok,
            refused,
            tasks,
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// One sample: per instance `(open, cap)`, and the sockets the origin holds.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: u128,
    pub phase: &'static str,
    pub members: Vec<(usize, usize)>,
    pub origin: usize,
}

/// Samples every instance and the origin every 2 ms until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    phase: Arc<parking_lot::Mutex<&'static str>>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    pub fn start(members: Vec<Arc<Running>>, origin: Origin) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(parking_lot::Mutex::new("start"));
        let task = tokio::spawn({
            let (stop, phase) = (stop.clone(), phase.clone());
            async move {
                let started = std::time::Instant::now();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push(Sample {
                        at_ms: started.elapsed().as_millis(),
                        phase: *phase.lock(),
                        members: members.iter().map(|m| held(m)).collect(),
                        origin: origin.open(),
                    });
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                samples
            }
        });
        Sampler { stop, phase, task }
    }

    /// Labels the samples taken from now on.
    pub fn phase(&self, phase: &'static str) {
        *self.phase.lock() = phase;
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the sampler ran")
    }
}

/// The samples as a markdown table, one row per change of what they show.
pub fn table(samples: &[Sample]) -> String {
    let n = samples.first().map_or(0, |s| s.members.len());
    let mut out = String::from("| t (ms) | phase |");
    for i in 0..n {
        out.push_str(&format!(" member {} open / cap |", i + 1));
    }
    out.push_str(" origin open |\n|---|---|");
    out.push_str(&"---|".repeat(n + 1));
    out.push('\n');
    let mut last: Option<(&Vec<(usize, usize)>, usize)> = None;
    for s in samples {
        if last == Some((&s.members, s.origin)) {
            continue;
        }
        last = Some((&s.members, s.origin));
        out.push_str(&format!("| {} | {} |", s.at_ms, s.phase));
        for (open, cap) in &s.members {
            out.push_str(&format!(" {open} / {cap} |"));
        }
        out.push_str(&format!(" {} |\n", s.origin));
    }
    out
}
