//! `tether demo`: the leak and the fix side by side, in one process, on loopback only.
//!
//! A fake registry and its token server ([`FakeRegistry`], which counts its sockets
//! from its own side, as `ss` would) are preheated by a [`LeakyClient`] that imitates
//! the Dragonfly manager: a new client per preheat, every request on a new connection,
//! nothing ever closed. A preheat is the manager's: `GET /v2/` (401 with a Bearer
//! challenge), a token from the challenge's realm, the manifest by tag, then each
//! platform manifest by digest. The same preheats run twice: straight at the registry,
//! then through tether's route listener for it, where tether rewrites the realm so the
//! token requests go through its auth route too. Each run gets a fresh registry, so
//! its peaks are exact (taken at every accept, not sampled). The demo passes when the
//! tether run stayed within the cap, every preheat through it succeeded, and the
//! sockets on both sides of tether were reaped to zero within `duration`.

mod peers;
mod view;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Config, RouteConfig, UpstreamConfig};
use crate::telemetry::UPSTREAM_CONNECTIONS;
use crate::testkit::{eventually, metric};
use crate::Running;
use peers::{Preheats, Servers};

pub use view::View;

/// How often the view samples the socket counts.
const TICK: Duration = Duration::from_millis(250);
/// tether's reaper period in the demo: short, so the fall to zero is visible.
const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// File descriptors one preheat costs in the run without tether: five requests, each
/// a leaked socket whose both ends live in this process.
const FDS_PER_PREHEAT: usize = 10;
/// File descriptors kept free for everything else.
const FD_RESERVE: usize = 256;

/// What the demo runs (the CLI's `tether demo` flags hold the defaults).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Preheats per run.
    pub preheats: usize,
    /// Each run spreads its preheats over this long; after the tether run, the demo
    /// waits at most this long again for tether to reap every socket.
    pub duration: Duration,
    /// tether's `max_connections` for the registry and for the auth server.
    pub cap: usize,
    /// tether's upstream `idle_timeout`; the client side gets half of it. By default
    /// a quarter of `duration`, between 200 ms and 2 s, so reaping fits the wait.
    pub idle_timeout: Option<Duration>,
    /// Preheats started at once: they come in bursts of this many, as a preheat job
    /// for several images does, and no more than this many are in flight.
    pub concurrency: usize,
}

impl DemoOptions {
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or_else(|| {
            (self.duration / 4).clamp(Duration::from_millis(200), Duration::from_secs(2))
        })
    }

    pub fn client_idle_timeout(&self) -> Duration {
        (self.idle_timeout() / 2).max(Duration::from_millis(50))
    }
}

/// The two fake servers a preheat talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Registry,
    Auth,
}

impl Server {
    pub const BOTH: [Server; 2] = [Server::Registry, Server::Auth];

    pub fn name(self) -> &'static str {
        match self {
            Server::Registry => "registry",
            Server::Auth => "auth",
        }
    }
}

/// One moment of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub at: Duration,
    /// Sockets open at the registry and at the auth server, by their own count.
    pub servers: [usize; 2],
    /// tether's `tether_upstream_connections` for each, summed over states.
    pub gauges: Option<[usize; 2]>,
    /// The leaky client's sockets still open (to the servers, or to tether).
    pub client: usize,
    pub done: usize,
    pub succeeded: usize,
}

/// One run, as it goes and as it ended.
#[derive(Debug)]
pub struct Trace {
    pub label: &'static str,
    pub through_tether: bool,
    pub preheats: usize,
    pub samples: Vec<Sample>,
    /// The most sockets each server had open at once.
    pub peak: [usize; 2],
    pub peak_gauge: Option<[usize; 2]>,
    /// Requests each server got that did not come through tether (no `Via`).
    pub unproxied: [usize; 2],
    /// `ss`'s count of established sockets to each server at the end, where `ss` exists.
    pub final_ss: Option<[usize; 2]>,
    /// Why the first failed preheat failed.
    pub first_error: Option<String>,
    /// tether's leak diagnosis of the client, as of the last sample once it named
    /// it (the tether run).
    pub diagnosis: Option<String>,
    pub finished: bool,
}

impl Trace {
    fn new(label: &'static str, through_tether: bool, preheats: usize) -> Trace {
        Trace {
            label,
            through_tether,
            preheats,
            samples: Vec::new(),
            peak: [0; 2],
            peak_gauge: through_tether.then_some([0; 2]),
            unproxied: [0; 2],
            final_ss: None,
            first_error: None,
            diagnosis: None,
            finished: false,
        }
    }

    /// The latest sample.
    pub fn last(&self) -> Sample {
        self.samples.last().copied().unwrap_or_default()
    }

    fn push(&mut self, sample: Sample) {
        if let (Some(peak), Some(g)) = (self.peak_gauge.as_mut(), sample.gauges) {
            for i in 0..2 {
                peak[i] = peak[i].max(g[i]);
            }
        }
        self.samples.push(sample);
    }

    /// Every socket of the run, on both sides of tether, is closed.
    pub fn reaped(&self) -> bool {
        let last = self.last();
        last.servers == [0, 0] && last.gauges.unwrap_or([0, 0]) == [0, 0] && last.client == 0
    }
}

/// Both runs and the verdict.
#[derive(Debug)]
pub struct DemoReport {
    pub options: DemoOptions,
    pub direct: Trace,
    pub tethered: Trace,
}

impl DemoReport {
    /// Held at the cap: neither server ever saw more than `cap` sockets from tether,
    /// and tether's gauges never said more either.
    pub fn within_cap(&self) -> bool {
        let cap = self.options.cap;
        let t = &self.tethered;
        t.peak.iter().all(|&p| p <= cap) && t.peak_gauge.unwrap_or([0, 0]).iter().all(|&p| p <= cap)
    }

    pub fn passed(&self) -> bool {
        let t = &self.tethered;
        self.within_cap() && t.reaped() && t.last().succeeded == t.preheats
    }
}

/// Runs the demo, drawing on `out` (in place when `live`, else a line a second), and
/// returns what both runs saw. `out` gets the summary too.
pub async fn run(
    mut options: DemoOptions,
    out: &mut dyn Write,
    live: bool,
) -> io::Result<DemoReport> {
    let mut view = View::new(out, live);
    if let Some(limit) = open_files_limit() {
        let fit = limit.saturating_sub(FD_RESERVE) / FDS_PER_PREHEAT;
        if options.preheats > fit {
            view.note(&format!(
                "note: the open-files limit ({limit}) leaves room for {fit} preheats without \
                 tether; running {fit} (raise it with `ulimit -n` for more)"
            ))?;
            options.preheats = fit;
        }
    }
    view.header(&options)?;

    // Run 1: straight at the registry. Nothing ever closes these sockets; after the
    // work stops the demo watches as long as tether would need to reap, to show it.
    let servers = Servers::start().await;
    let registry = servers.fake.registry.addr;
    let mut direct = Pass::start(&options, "without tether", servers, None, registry);
    direct.watch(&mut view, &[], Until::PreheatsDone).await?;
    let linger = options.idle_timeout() + options.client_idle_timeout() + 2 * REAP_INTERVAL;
    direct
        .watch(
            &mut view,
            &[],
            Until::Deadline(linger.min(options.duration)),
        )
        .await?;
    let (direct, servers) = direct.finish();
    view.frame(&[&direct])?;
    // The leaked sockets closed with their clients; let the servers see it before
    // the second run, so its counts are its own.
    eventually(Duration::from_secs(10), || async {
        servers.open() == [0, 0]
    })
    .await;
    drop(servers);

    // Run 2: the same preheats through tether's route listener for the registry.
    let servers = Servers::start().await;
    let tether = crate::start(demo_config(&options, &servers))
        .await
        .map_err(io::Error::other)?;
    let route = tether.route_addrs[0];
    let mut tethered = Pass::start(&options, "with tether", servers, Some(&tether), route);
    tethered
        .watch(&mut view, &[&direct], Until::PreheatsDone)
        .await?;
    tethered
        .watch(&mut view, &[&direct], Until::Reaped(options.duration))
        .await?;
    let (tethered, _servers) = tethered.finish();
    view.frame(&[&direct, &tethered])?;
    tether.shutdown().await;

    let report = DemoReport {
        options,
        direct,
        tethered,
    };
    view.summary(&report)?;
    Ok(report)
}

/// When [`Pass::watch`] stops.
enum Until {
    PreheatsDone,
    /// This long from now.
    Deadline(Duration),
    /// Every socket on both sides of tether is closed, or this long from now.
    Reaped(Duration),
}

/// One run: its servers, its preheats, tether if it goes through it, what it saw.
struct Pass<'t> {
    servers: Servers,
    preheats: Preheats,
    tether: Option<&'t Running>,
    trace: Trace,
}

impl<'t> Pass<'t> {
    fn start(
        options: &DemoOptions,
        label: &'static str,
        servers: Servers,
        tether: Option<&'t Running>,
        registry: SocketAddr,
    ) -> Pass<'t> {
        Pass {
            preheats: Preheats::start(options, registry),
            trace: Trace::new(label, tether.is_some(), options.preheats),
            servers,
            tether,
        }
    }

    fn sample(&self) -> Sample {
        let p = &self.preheats;
        Sample {
            at: p.started.elapsed(),
            servers: self.servers.open(),
            gauges: self.tether.map(gauges),
            client: p.open(),
            done: p.done.load(Ordering::SeqCst),
            succeeded: p.succeeded.load(Ordering::SeqCst),
        }
    }

    /// Samples every [`TICK`] and shows the runs so far, until `until`.
    async fn watch(
        &mut self,
        view: &mut View<'_>,
        earlier: &[&Trace],
        until: Until,
    ) -> io::Result<()> {
        let started = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.trace.push(self.sample());
            // The latest word on the client, once tether has named it.
            if let Some(d) = self.tether.and_then(diagnosis) {
                self.trace.diagnosis = Some(d);
            }
            let mut all = earlier.to_vec();
            all.push(&self.trace);
            view.frame(&all)?;
            let stop = match until {
                Until::PreheatsDone => self.preheats.finished(),
                Until::Deadline(d) => started.elapsed() >= d,
                Until::Reaped(d) => self.trace.reaped() || started.elapsed() >= d,
            };
            if stop {
                return Ok(());
            }
        }
    }

    /// The run's trace, completed with the servers' own figures. The preheats, and
    /// with them the leaked clients and their sockets, are dropped.
    fn finish(mut self) -> (Trace, Servers) {
        let t = &mut self.trace;
        t.peak = self.servers.peaks();
        t.unproxied = self.servers.unproxied();
        t.final_ss = self.servers.ss();
        t.first_error = self.preheats.first_error.lock().clone();
        t.finished = true;
        (self.trace, self.servers)
    }
}

/// What tether's leak diagnosis (`/debug/clients`, and its log warning) says of the
/// client it suspects, if any.
fn diagnosis(tether: &Running) -> Option<String> {
    let config = &tether.shared.table().config.diagnosis;
    let suspect = tether
        .shared
        .downstream()
        .clients
        .top(config)
        .into_iter()
        .find(|c| c.suspected_leak)?;
    Some(format!(
        "tether names client {}: {} connections in {}, {:.1} requests each: \
         a new HTTP client per job",
        suspect.address,
        suspect.opened_in_window,
        humantime::format_duration(config.leak_window),
        suspect.requests_per_connection,
    ))
}

/// `tether_upstream_connections` of the registry and the auth upstream.
fn gauges(tether: &Running) -> [usize; 2] {
    let text = tether.metrics();
    Server::BOTH.map(|s| {
        ["connecting", "active", "idle"]
            .iter()
            .filter_map(|state| {
                metric(
                    &text,
                    UPSTREAM_CONNECTIONS,
                    &[("upstream", s.name()), ("state", state)],
                )
            })
            .sum::<f64>() as usize
    })
}

/// tether in front of `servers`: one upstream and one route listener each, all on
/// loopback port 0, with the demo's cap and short timers. The auth route is what the
/// rewritten realm points the client at.
fn demo_config(options: &DemoOptions, servers: &Servers) -> Config {
    let mut config = Config::default();
    let any = "127.0.0.1:0".parse().expect("valid address");
    config.proxy.listen = any;
    config.admin.listen = any;
    config.proxy.client_idle_timeout = options.client_idle_timeout();
    config.pool.max_connections = options.cap;
    config.pool.idle_timeout = options.idle_timeout();
    config.pool.reap_interval = REAP_INTERVAL;
    for (server, listening) in Server::BOTH.iter().zip(servers.both()) {
        config
            .upstream
            .push(UpstreamConfig::new(server.name(), listening.authority()));
        config.route.push(RouteConfig {
            listen: any,
            upstream: server.name().into(),
        });
    }
    config
}

/// The soft limit on open files, from `/proc/self/limits` (Linux); `None` elsewhere
/// or when unlimited.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
