//! Cluster-wide connection caps: the gateway replicas listed in `[cluster] members`
//! split each upstream's `cluster_max_connections` between them, and each enforces
//! its share as its cap in force.
//!
//! A refresh task reads the list every `refresh` ([`source`]) and feeds each read
//! to the hold-off state machine ([`share::Tracker`]), which decides the
//! [`Standing`] in force; [`Cluster`] publishes it to whoever applies it to the
//! pools (`Pool::set_share`). This module knows nothing of pools: it depends on the
//! config and telemetry only.
//!
//! Guarantee, with the bound it rests on (see `ClusterConfig::hold_off`): the sum
//! of the members' caps stays within the cluster cap while the list changes,
//! because a smaller share is in force at the read that shows it, and a larger
//! one only after a hold-off long enough for every other member to have read the
//! change and for sockets above their lowered caps to have drained.

pub mod share;
pub mod source;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Members};
use crate::telemetry::{self as t, Telemetry};
pub use share::{Membership, Standing};

/// What the cluster looks like from this replica, as `/debug/pools` and the status
/// page show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// The source, as configured (`dns:NAME` or `file:PATH`).
    pub members_source: String,
    /// Members in the last list read; `None` if it was never read.
    pub members: Option<usize>,
    /// This replica's place in the sorted list (from 0); `None` if not listed.
    pub self_index: Option<usize>,
    /// The list was never read: each pool falls back to its own `max_connections`.
    pub fallback: bool,
    /// Listed, but not yet past the hold-off since a view without this replica
    /// (its first read counts as one): its shares are still 0, so it reports
    /// not ready and the Service sends it no clients yet.
    pub joining: bool,
    /// Successful reads so far.
    pub reads: u64,
    #[serde(with = "humantime_serde")]
    pub hold_off: Duration,
    /// What the shares are computed from.
    #[serde(skip)]
    pub standing: Standing,
}

impl ClusterStatus {
    /// Whether both give every pool the same share (reads aside).
    fn same_shares(&self, other: &ClusterStatus) -> bool {
        (&self.standing, self.members, self.self_index, self.fallback)
            == (
                &other.standing,
                other.members,
                other.self_index,
                other.fallback,
            )
    }
}

/// A running member-list refresh: cheap to clone; the task stops with `stop`.
#[derive(Clone)]
pub struct Cluster {
    rx: watch::Receiver<Arc<ClusterStatus>>,
}

impl Cluster {
    /// Reads the list once (so the first pools are built under the first share)
    /// and starts the refresh task. `None` when `[cluster]` lists no members.
    pub async fn start(
        config: &Config,
        telemetry: &Telemetry,
        stop: CancellationToken,
    ) -> Option<Cluster> {
        let c = &config.cluster;
        let members = c.members.clone()?;
        let me = c.self_addr;
        if me.is_none() {
            tracing::warn!(
                "cluster.self is not set (TETHER_CLUSTER__SELF): this replica cannot find \
                 itself in the member list, so its share of every cluster cap is 0"
            );
        }
        let hold_off = c.hold_off(config);
        let mut refresh = Refresh {
            members,
            me,
            tracker: share::Tracker::new(hold_off),
            hold_off,
            metrics: ClusterMetrics::new(telemetry),
            failing: false,
            missing: false,
        };
        let first = refresh.read().await;
        let (tx, rx) = watch::channel(Arc::new(first));
        let period = c.refresh;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + period, period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let status = refresh.read().await;
                tx.send_if_modified(|current| {
                    let changed = !current.same_shares(&status);
                    if changed {
                        *current = Arc::new(status);
                    }
                    changed
                });
            }
        });
        Some(Cluster { rx })
    }

    /// What is in force now.
    pub fn status(&self) -> Arc<ClusterStatus> {
        self.rx.borrow().clone()
    }

    /// This replica's cap for an upstream with cluster cap `total` and its own cap
    /// `max_connections`.
    pub fn cap(&self, total: usize, max_connections: usize) -> usize {
        self.rx.borrow().standing.cap(total, max_connections)
    }

    /// Waits until what is in force changes; `false` once the refresh task ended.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

struct ClusterMetrics {
    members: Gauge,
    fallback: Gauge,
    self_missing: Gauge,
    read_failures: Counter,
}

impl ClusterMetrics {
    fn new(telemetry: &Telemetry) -> ClusterMetrics {
        let metrics = ClusterMetrics {
            members: telemetry.gauge(t::CLUSTER_MEMBERS, &[]),
            fallback: telemetry.gauge(t::CLUSTER_FALLBACK, &[]),
            self_missing: telemetry.gauge(t::CLUSTER_SELF_MISSING, &[]),
            read_failures: telemetry.counter(t::CLUSTER_READ_FAILURES, &[]),
        };
        metrics.read_failures.increment(0);
        metrics
    }
}

/// The refresh task's state.
struct Refresh {
    members: Members,
    me: Option<IpAddr>,
    tracker: share::Tracker,
    hold_off: Duration,
    metrics: ClusterMetrics,
    /// The last read failed (log the change, not every failure).
    failing: bool,
    /// `self` was missing from the last list read.
    missing: bool,
}

impl Refresh {
    /// One read, fed to the tracker; logs and metrics for what changed.
    async fn read(&mut self) -> ClusterStatus {
        let source = &self.members;
        let read = match source::read(source).await {
            Ok(addrs) => {
                if self.failing {
                    tracing::info!(%source, "the cluster member list can be read again");
                }
                self.failing = false;
                Some(Membership::new(addrs, self.me))
            }
            Err(e) => {
                self.metrics.read_failures.increment(1);
                if !self.failing && self.tracker.reads() == 0 {
                    tracing::warn!(
                        %source,
                        error = %e,
                        "the cluster member list cannot be read and never could: falling back to \
                         each upstream's own max_connections as the whole cluster cap \
                         (tether_cluster_fallback = 1)"
                    );
                } else if !self.failing {
                    tracing::warn!(%source, error = %e, "the cluster member list cannot be read: keeping the shares in force");
                }
                self.failing = true;
                None
            }
        };
        if let Some(m) = &read {
            let before = self.tracker.last().map(|l| l.members.clone());
            if before.as_ref() != Some(&m.members) {
                tracing::info!(%source, members = m.members.len(), self_index = ?m.self_index, "cluster members changed");
            }
            let missing = m.self_index.is_none();
            if missing && !self.missing {
                tracing::warn!(
                    %source,
                    self_addr = ?self.me,
                    members = ?m.members,
                    "this replica's cluster.self is not in the member list: its share of every \
                     cluster cap is 0 until it is listed (tether_cluster_self_missing = 1)"
                );
            } else if !missing && self.missing {
                tracing::info!(self_addr = ?self.me, "this replica is in the cluster member list again");
            }
            self.missing = missing;
            self.metrics.members.set(m.members.len() as f64);
            self.metrics.self_missing.set(f64::from(u8::from(missing)));
        }
        let standing = self.tracker.observe(Instant::now(), read);
        let fallback = standing == Standing::Fallback;
        self.metrics.fallback.set(f64::from(u8::from(fallback)));
        let last = self.tracker.last();
        ClusterStatus {
            members_source: source.to_string(),
            members: last.map(|m| m.members.len()),
            self_index: last.and_then(|m| m.self_index),
            fallback,
            joining: last.is_some_and(|m| m.self_index.is_some()) && standing.holds_nothing(),
            reads: self.tracker.reads(),
            hold_off: self.hold_off,
            standing,
        }
    }
}
