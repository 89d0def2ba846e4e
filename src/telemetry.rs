//! Metrics: names, descriptions, and the recorder each tether instance owns.
//!
//! Every instance has its own Prometheus recorder rather than the process-global
//! one, so several instances (tests run many in one process) never mix their
//! gauges. Handles are registered once per label set and kept by their owners, so
//! the hot path touches only atomics.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio_util::sync::CancellationToken;

pub const UPSTREAM_CONNECTIONS: &str = "tether_upstream_connections";
pub const UPSTREAM_OPENED: &str = "tether_upstream_connections_opened_total";
pub const UPSTREAM_CLOSED: &str = "tether_upstream_connections_closed_total";
pub const UPSTREAM_REQUESTS: &str = "tether_upstream_requests_total";
pub const UPSTREAM_REQUEST_DURATION: &str = "tether_upstream_request_duration_seconds";
pub const UPSTREAM_QUEUE_DEPTH: &str = "tether_upstream_queue_depth";
pub const UPSTREAM_QUEUE_WAIT: &str = "tether_upstream_queue_wait_seconds";
pub const UPSTREAM_REJECTED: &str = "tether_upstream_rejected_total";
pub const UPSTREAM_RESPONSES: &str = "tether_upstream_responses_total";
pub const UPSTREAM_ERRORS: &str = "tether_upstream_errors_total";
pub const UPSTREAM_MAX_CONNECTIONS: &str = "tether_upstream_max_connections";
pub const UPSTREAM_STALE_RETRIES: &str = "tether_upstream_stale_retries_total";
pub const TUNNELS: &str = "tether_tunnels";
pub const TUNNEL_BYTES: &str = "tether_tunnel_bytes_total";
pub const DOWNSTREAM_CONNECTIONS: &str = "tether_downstream_connections";
pub const DOWNSTREAM_PARKED: &str = "tether_downstream_parked_connections";
pub const DOWNSTREAM_OPENED: &str = "tether_downstream_connections_opened_total";
pub const DOWNSTREAM_CLOSED: &str = "tether_downstream_connections_closed_total";
pub const DOWNSTREAM_REJECTED: &str = "tether_downstream_requests_rejected_total";
pub const SUSPECTED_LEAKS: &str = "tether_suspected_leaking_clients";
pub const CONFIG_RELOADS: &str = "tether_config_reloads_total";
pub const CONFIG_LAST_RELOAD_OK: &str = "tether_config_last_reload_successful";
pub const CONFIG_LAST_RELOAD_TIME: &str = "tether_config_last_reload_success_timestamp_seconds";
pub const BUDGET_CONNECTIONS: &str = "tether_budget_connections";
pub const BUDGET_MAX_CONNECTIONS: &str = "tether_budget_max_connections";
pub const BUILD_INFO: &str = "tether_build_info";
pub const START_TIME: &str = "tether_start_time_seconds";
pub const CLUSTER_MEMBERS: &str = "tether_cluster_members";
pub const CLUSTER_FALLBACK: &str = "tether_cluster_fallback";
pub const CLUSTER_SELF_MISSING: &str = "tether_cluster_self_missing";
pub const CLUSTER_READ_FAILURES: &str = "tether_cluster_read_failures_total";

/// Label value for traffic to origins matched by an allow pattern rather than a
/// listed upstream: labels stay bounded by the config, never raw hosts.
pub const UNLISTED: &str = "unlisted";

const DESCRIPTIONS: &[(&str, &str, Option<Unit>)] = &[
    (
        UPSTREAM_CONNECTIONS,
        "Sockets open to an upstream now, by state (connecting, active, idle); tunnels are in tether_tunnels.",
        None,
    ),
    (
        UPSTREAM_MAX_CONNECTIONS,
        "The cap in force on an upstream's sockets (connecting + active + idle + tunnels): max_connections, or less when a share lowers it.",
        None,
    ),
    (
        UPSTREAM_OPENED,
        "Upstream sockets opened (TCP established, and TLS when originated).",
        None,
    ),
    (
        UPSTREAM_CLOSED,
        "Upstream sockets closed, by the reason tether closed them or saw them close.",
        None,
    ),
    (
        UPSTREAM_REQUESTS,
        "Requests an upstream answered with a response head, by status class and whether the socket was reused.",
        None,
    ),
    (
        UPSTREAM_RESPONSES,
        "Responses sent to clients for an upstream, by status class and kind: kind=\"none\" when the upstream answered, else the failure tether answered itself (connect, tls, timeout, reset, queue_full, ...).",
        None,
    ),
    (
        UPSTREAM_ERRORS,
        "Failed exchanges with an upstream, by kind: those tether answered itself and responses that broke off after their head.",
        None,
    ),
    (
        UPSTREAM_REQUEST_DURATION,
        "Time from sending a request upstream to its response head.",
        Some(Unit::Seconds),
    ),
    (
        UPSTREAM_QUEUE_DEPTH,
        "Requests waiting now for an upstream socket.",
        None,
    ),
    (
        UPSTREAM_QUEUE_WAIT,
        "Time queued requests waited for an upstream socket (granted or timed out).",
        Some(Unit::Seconds),
    ),
    (
        UPSTREAM_REJECTED,
        "Requests for an upstream refused by its pool without reaching it, by reason.",
        None,
    ),
    (
        UPSTREAM_STALE_RETRIES,
        "Requests retried on a fresh socket because a pooled one had closed.",
        None,
    ),
    (
        TUNNELS,
        "CONNECT and intercepted tunnels open now, by state (active, idle); they count against the upstream's cap.",
        None,
    ),
    (
        TUNNEL_BYTES,
        "Bytes relayed through tunnels, by direction (upstream: client to origin; downstream: origin to client).",
        Some(Unit::Bytes),
    ),
    (
        DOWNSTREAM_CONNECTIONS,
        "Client connections open now, by state (active: a request or tunnel in flight; idle).",
        None,
    ),
    (
        DOWNSTREAM_PARKED,
        "Idle client connections held as bare sockets, without HTTP state (a subset of state=idle).",
        None,
    ),
    (DOWNSTREAM_OPENED, "Client connections accepted.", None),
    (
        SUSPECTED_LEAKS,
        "Clients among the top diagnosis.top_clients that look like they leak connections (many opened, about one request each); /debug/clients names them.",
        None,
    ),
    (
        DOWNSTREAM_CLOSED,
        "Client connections closed, by reason.",
        None,
    ),
    (
        DOWNSTREAM_REJECTED,
        "Requests tether answered with an error of its own, by x-tether-error code, whether refused before routing (denied, bad_target) or failed at a known upstream (which tether_upstream_responses_total also counts, by upstream).",
        None,
    ),
    (
        CONFIG_RELOADS,
        "Configuration reloads attempted, by result.",
        None,
    ),
    (
        CONFIG_LAST_RELOAD_OK,
        "Whether the last configuration reload succeeded (1) or was refused (0); 1 at start.",
        None,
    ),
    (
        CONFIG_LAST_RELOAD_TIME,
        "When the configuration in force was loaded: the start, or the last successful reload (Unix time).",
        Some(Unit::Seconds),
    ),
    (
        BUDGET_CONNECTIONS,
        "Sockets open now across every upstream sharing the [budget].",
        None,
    ),
    (
        BUDGET_MAX_CONNECTIONS,
        "The [budget] max_connections in force: the most sockets all upstreams together may open.",
        None,
    ),
    (
        BUILD_INFO,
        "Always 1; its labels say which tether this is (version, commit).",
        None,
    ),
    (
        START_TIME,
        "When this tether instance started (Unix time).",
        Some(Unit::Seconds),
    ),
    (
        CLUSTER_MEMBERS,
        "Members in the last [cluster] member list read.",
        None,
    ),
    (
        CLUSTER_FALLBACK,
        "1 while the [cluster] member list has never been read: each upstream's own max_connections stands in for the cluster cap.",
        None,
    ),
    (
        CLUSTER_SELF_MISSING,
        "1 while this replica's [cluster] self address is not in the member list: its share is 0.",
        None,
    ),
    (
        CLUSTER_READ_FAILURES,
        "Reads of the [cluster] member list that failed (the share in force was kept).",
        None,
    ),
];

/// Buckets from 0.5 ms to 60 s: a pooled loopback hop sits at the bottom, a
/// queue timeout or slow upstream at the top.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// One instance's metrics registry and exporter.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The `process_*` series (open and max fds, RSS, CPU seconds, start time),
    /// read from the OS at each render.
    process: metrics_process::Collector,
    started: SystemTime,
    reload: parking_lot::Mutex<ReloadStatus>,
    reload_ok: Gauge,
    reload_time: Gauge,
    /// What sets gauges from its own state at each render ([`Collect`]).
    collectors: parking_lot::Mutex<Vec<Weak<dyn Collect>>>,
    /// Held from the collectors' pass to the end of the render: two scrapes at once
    /// would otherwise each render some gauges of the other's pass.
    rendering: parking_lot::Mutex<()>,
}

/// Something that sets its gauges from its own state when a scrape renders them,
/// rather than moving them as the state changes: a set of gauges read together
/// (one pool's connections by state, which a dashboard sums) is then one consistent
/// picture. Moved live, a scrape that read one state before a socket left it and the
/// next after the socket entered it would count the socket twice, and show a pool
/// over its cap that never was.
pub trait Collect: Send + Sync {
    fn collect(&self);
}

/// The version and commit of this build (the commit from `build.rs`, as
/// `tether --version` shows it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("BUILD_COMMIT_OF_TETHER");

/// How the last configuration reload went, for the status page.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ReloadStatus {
    /// The last reload succeeded (true at start, before any).
    pub last_successful: bool,
    /// When the configuration in force was loaded (Unix seconds).
    pub last_success_unix: f64,
    /// Reloads refused since start.
    pub failures: u64,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Telemetry {
    pub fn new() -> Arc<Telemetry> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("buckets are not empty")
            .build_recorder();
        for (name, help, unit) in DESCRIPTIONS {
            let key = KeyName::from_const_str(name);
            let help = SharedString::const_str(help);
            // Describing every kind is harmless: the exporter keys help text by name.
            recorder.describe_gauge(key, *unit, help);
        }
        let handle = recorder.handle();
        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(&recorder, || process.describe());
        let started = SystemTime::now();
        let gauge = |name, labels: &[(&'static str, &str)]| {
            recorder.register_gauge(&key(name, labels), &METADATA)
        };
        gauge(BUILD_INFO, &[("version", VERSION), ("commit", COMMIT)]).set(1.0);
        gauge(START_TIME, &[]).set(unix(started));
        let reload_ok = gauge(CONFIG_LAST_RELOAD_OK, &[]);
        let reload_time = gauge(CONFIG_LAST_RELOAD_TIME, &[]);
        reload_ok.set(1.0);
        reload_time.set(unix(started));
        Arc::new(Telemetry {
            recorder,
            handle,
            process,
            started,
            reload: parking_lot::Mutex::new(ReloadStatus {
                last_successful: true,
                last_success_unix: unix(started),
                failures: 0,
            }),
            reload_ok,
            reload_time,
            collectors: Default::default(),
            rendering: Default::default(),
        })
    }

    /// Has `collector` set its gauges before each render while it lives.
    pub fn collect_on_render(&self, collector: Weak<dyn Collect>) {
        let mut collectors = self.collectors.lock();
        collectors.retain(|c| c.strong_count() > 0);
        collectors.push(collector);
    }

    /// A configuration reload finished: `ok` if it is now in force.
    pub fn reload_finished(&self, ok: bool) {
        let mut status = self.reload.lock();
        status.last_successful = ok;
        self.reload_ok.set(if ok { 1.0 } else { 0.0 });
        if ok {
            status.last_success_unix = unix(SystemTime::now());
            self.reload_time.set(status.last_success_unix);
        } else {
            status.failures += 1;
        }
    }

    /// How the last reload went.
    pub fn reload_status(&self) -> ReloadStatus {
        *self.reload.lock()
    }

    /// How long this instance has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed().unwrap_or_default()
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    /// The Prometheus text exposition of every metric, the process's own read now.
    pub fn render(&self) -> String {
        let _rendering = self.rendering.lock();
        // Upgraded under the lock, collected after it: a collector takes locks of its own.
        let live: Vec<Arc<dyn Collect>> = self
            .collectors
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for collector in live {
            collector.collect();
        }
        metrics::with_local_recorder(&self.recorder, || self.process.collect());
        self.handle.render()
    }

    /// Folds buffered histogram observations into their buckets. The exporter keeps
    /// every observation (about 8 bytes each, two per request) until a scrape or an
    /// upkeep drains it; `build_recorder` does not spawn the upkeep task `install`
    /// would, so [`upkeep`] runs this.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// How often [`upkeep`] drains histogram observations: a tether nobody scrapes at
/// 10,000 requests/s buffers about 1 MiB in this time, then reuses it.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Drains histogram observations every [`UPKEEP_INTERVAL`] until `stop` fires or the
/// telemetry is dropped. Without it a tether that is never scraped grows by ~20
/// bytes per request, without bound (benches/SOAK.md).
pub async fn upkeep(telemetry: Weak<Telemetry>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => match telemetry.upgrade() {
                Some(telemetry) => telemetry.run_upkeep(),
                None => return,
            },
        }
    }
}

/// A duration in milliseconds rounded to microseconds, for log fields: `2020.744`,
/// not `2020.7442219999998`.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn upkeep_runs_until_stopped_or_its_telemetry_is_gone() {
        let telemetry = Telemetry::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(upkeep(Arc::downgrade(&telemetry), stop.clone()));
        let histogram = telemetry.histogram(UPSTREAM_REQUEST_DURATION, &[("upstream", "a")]);
        histogram.record(0.1);
        tokio::time::sleep(UPKEEP_INTERVAL * 3).await;
        assert!(!task.is_finished(), "upkeep keeps running");
        assert!(telemetry
            .render()
            .contains(r#"tether_upstream_request_duration_seconds_count{upstream="a"} 1"#));
        stop.cancel();
        task.await.unwrap();

        let task = tokio::spawn(upkeep(Arc::downgrade(&telemetry), CancellationToken::new()));
        drop(telemetry);
        tokio::time::sleep(UPKEEP_INTERVAL * 2).await;
        assert!(task.is_finished(), "a dropped telemetry ends its upkeep");
    }
}

/// A log line that anyone who can open a connection can trigger: written at most once
/// per `interval`, the next one saying how many were left out meanwhile, so a flood
/// of such connections cannot flood the log.
pub struct Throttle {
    interval: Duration,
    /// When the last line was written, and how many were left out since.
    state: parking_lot::Mutex<(Option<tokio::time::Instant>, u64)>,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            state: parking_lot::const_mutex((None, 0)),
        }
    }

    /// `Some(left out since the last line)` when a line may be written now; `None`
    /// (counted) when it is left out.
    pub fn admit(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock();
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let left_out = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(left_out)
            }
        }
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_throttled_line_is_written_once_per_interval_with_the_count_left_out() {
        let throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.admit(), Some(0), "the first line is written");
        for _ in 0..99 {
            assert_eq!(throttle.admit(), None);
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(throttle.admit(), None, "still within the interval");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            throttle.admit(),
            Some(100),
            "the next line counts what was left out"
        );
        assert_eq!(throttle.admit(), None);
    }
}
