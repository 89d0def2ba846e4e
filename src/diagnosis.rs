//! Leak diagnosis: which client is leaking connections.
//!
//! Per client address tether counts connections opened, connections used (that sent
//! a first request) and requests served over a sliding window (six buckets). A
//! client whose many used connections carried about one request each is creating a
//! new HTTP client per job; tether names it in a rate-limited warning and at
//! `/debug/clients`. Requests per connection are counted over the used connections
//! only: a client that opens its whole pool at once (a load generator, a pooled
//! client warming up) has sent nothing on it yet, and is judged once it has.
//! Memory stays bounded: clients with no open connection are forgotten,
//! fewest-opened first, past a fixed bound.

use foldhash::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use crate::config::DiagnosisConfig;

const BUCKETS: usize = 6;

/// Per-client counters of a running instance.
#[derive(Default)]
pub struct Clients {
    /// Looked up on every request. foldhash, seeded per process, not SipHash: the
    /// map is bounded (`prune`), so even chosen addresses cannot grow a chain past it.
    map: Mutex<HashMap<IpAddr, Stats>>,
}

struct Stats {
    open: usize,
    opened: Window,
    /// Connections that sent their first request.
    used: Window,
    requests: Window,
    warned_at: Option<Instant>,
}

/// A count over the last `BUCKETS` buckets of `width`.
struct Window {
    base: Instant,
    width: Duration,
    /// Index (since `base`) of the newest bucket written.
    head: u64,
    counts: [u64; BUCKETS],
}

impl Window {
    fn new(now: Instant, window: Duration) -> Window {
        Window {
            base: now,
            width: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            head: 0,
            counts: [0; BUCKETS],
        }
    }

    fn advance(&mut self, now: Instant) -> usize {
        let idx =
            (now.saturating_duration_since(self.base).as_nanos() / self.width.as_nanos()) as u64;
        for i in (self.head + 1)..=idx.min(self.head + BUCKETS as u64) {
            self.counts[(i % BUCKETS as u64) as usize] = 0;
        }
        self.head = self.head.max(idx);
        (idx % BUCKETS as u64) as usize
    }

    fn add(&mut self, now: Instant) {
        let i = self.advance(now);
        self.counts[i] += 1;
    }

    fn total(&mut self, now: Instant) -> u64 {
        self.advance(now);
        self.counts.iter().sum()
    }
}

/// One client, as `/debug/clients` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    pub address: String,
    pub connections_open: usize,
    pub opened_in_window: u64,
    /// Connections whose first request came in the window.
    pub used_in_window: u64,
    pub requests_in_window: u64,
    /// Requests in the window per connection used in it.
    pub requests_per_connection: f64,
    /// Many connections, about one request each: a new HTTP client per job.
    pub suspected_leak: bool,
}

impl Clients {
    /// A connection from `ip` opened. Warns (at most once a window per client) when
    /// the client looks like it leaks.
    pub fn opened(&self, ip: IpAddr, config: &DiagnosisConfig) {
        let now = Instant::now();
        let mut map = self.map.lock();
        let stats = map.entry(ip).or_insert_with(|| Stats {
            open: 0,
            opened: Window::new(now, config.leak_window),
            used: Window::new(now, config.leak_window),
            requests: Window::new(now, config.leak_window),
            warned_at: None,
        });
        stats.open += 1;
        stats.opened.add(now);
        let report = report(ip, stats, now, config);
        if report.suspected_leak
            && stats
                .warned_at
                .is_none_or(|t| now.saturating_duration_since(t) >= config.leak_window)
        {
            stats.warned_at = Some(now);
            tracing::warn!(
                client = %ip,
                opened = report.opened_in_window,
                requests_per_connection = report.requests_per_connection,
                "client {ip} opened {} connections in {}, {:.1} requests per connection: it is probably creating a new HTTP client per job",
                report.opened_in_window,
                humantime::format_duration(config.leak_window),
                report.requests_per_connection,
            );
        }
        let bound = config.top_clients * 8 + 256;
        if map.len() > 2 * bound {
            prune(&mut map, bound, now);
        }
    }

    /// A connection from `ip` closed.
    pub fn closed(&self, ip: IpAddr) {
        if let Some(stats) = self.map.lock().get_mut(&ip) {
            stats.open = stats.open.saturating_sub(1);
        }
    }

    /// A request from `ip` began, `now`; `first` on its connection.
    pub fn request(&self, ip: IpAddr, now: Instant, first: bool) {
        if let Some(stats) = self.map.lock().get_mut(&ip) {
            stats.requests.add(now);
            if first {
                stats.used.add(now);
            }
        }
    }

    /// The `top_clients` clients that opened most connections in the window.
    pub fn top(&self, config: &DiagnosisConfig) -> Vec<ClientReport> {
        let now = Instant::now();
        let mut map = self.map.lock();
        let mut all: Vec<ClientReport> = map
            .iter_mut()
            .map(|(ip, s)| report(*ip, s, now, config))
            .collect();
        all.sort_by(|a, b| {
            b.opened_in_window
                .cmp(&a.opened_in_window)
                .then(b.connections_open.cmp(&a.connections_open))
        });
        all.truncate(config.top_clients);
        all
    }
}

fn report(ip: IpAddr, stats: &mut Stats, now: Instant, config: &DiagnosisConfig) -> ClientReport {
    let opened = stats.opened.total(now);
    let used = stats.used.total(now);
    let requests = stats.requests.total(now);
    let ratio = if used == 0 {
        0.0
    } else {
        requests as f64 / used as f64
    };
    ClientReport {
        address: ip.to_string(),
        connections_open: stats.open,
        opened_in_window: opened,
        used_in_window: used,
        requests_in_window: requests,
        requests_per_connection: (ratio * 10.0).round() / 10.0,
        suspected_leak: used >= config.leak_min_connections && ratio < config.leak_reuse_below,
    }
}

/// Forgets clients with nothing open, fewest connections opened first, down to `bound`.
fn prune(map: &mut HashMap<IpAddr, Stats>, bound: usize, now: Instant) {
    let mut idle: Vec<(u64, IpAddr)> = map
        .iter_mut()
        .filter(|(_, s)| s.open == 0)
        .map(|(ip, s)| (s.opened.total(now), *ip))
        .collect();
    idle.sort();
    let excess = map.len().saturating_sub(bound);
    for (_, ip) in idle.into_iter().take(excess) {
        map.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_old_buckets() {
        let now = Instant::now();
        let mut w = Window::new(now, Duration::from_secs(60));
        for _ in 0..5 {
            w.add(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        w.add(Instant::now());
        assert_eq!(w.total(Instant::now()), 6);
        tokio::time::advance(Duration::from_secs(35)).await;
        assert_eq!(
            w.total(Instant::now()),
            1,
            "the first five fell out of the window"
        );
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(w.total(Instant::now()), 0);
    }

    /// Suspects a client from `n` used connections on.
    fn judging_at(n: u64) -> DiagnosisConfig {
        DiagnosisConfig {
            leak_min_connections: n,
            ..DiagnosisConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_with_one_request_per_connection_is_suspected() {
        let (config, clients) = (judging_at(10), Clients::default());
        let leaky: IpAddr = "10.0.3.7".parse().unwrap();
        let good: IpAddr = "10.0.3.8".parse().unwrap();
        for _ in 0..20 {
            clients.opened(leaky, &config);
            clients.request(leaky, Instant::now(), true);
        }
        clients.opened(good, &config);
        for i in 0..200 {
            clients.request(good, Instant::now(), i == 0);
        }
        let top = clients.top(&config);
        assert_eq!(top[0].address, "10.0.3.7");
        assert!(top[0].suspected_leak);
        assert_eq!(top[0].requests_per_connection, 1.0);
        assert!(!top[1].suspected_leak);
    }

    /// Connections opened all at once, before any request, are not judged on
    /// requests they have not had the chance to carry; once used, on what they
    /// carried.
    #[tokio::test(start_paused = true)]
    async fn a_pool_opened_at_once_is_judged_only_once_its_connections_are_used() {
        let (config, clients) = (judging_at(10), Clients::default());
        let pooled: IpAddr = "10.0.3.9".parse().unwrap();
        for _ in 0..30 {
            clients.opened(pooled, &config);
        }
        let first = |clients: &Clients| clients.top(&config)[0].clone();
        assert!(!first(&clients).suspected_leak, "nothing sent yet");
        // Three requests on each: the first round is each connection's first.
        for round in 0..3 {
            for _ in 0..30 {
                clients.request(pooled, Instant::now(), round == 0);
            }
        }
        let r = first(&clients);
        assert_eq!((r.opened_in_window, r.used_in_window), (30, 30));
        assert!(!r.suspected_leak, "{r:?}");
    }
}
