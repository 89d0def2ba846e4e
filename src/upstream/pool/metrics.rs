//! The metric handles of one pool, registered once, and the typed label values
//! they are registered under: every value of [`ConnState`], [`CloseReason`],
//! [`Rejection`] and [`ErrorKind`] is named by its `as_str()`, never by a parallel
//! array of strings. Every label combination is registered when the pool is made,
//! so each series starts at zero and `rate()` sees its first increment.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Histogram};
use serde::Serialize;

use crate::error::ErrorKind;
use crate::telemetry::{self as t, Telemetry};

/// What a socket is doing. Tunnels count against the same cap as pooled sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Active,
    Idle,
    TunnelActive,
    TunnelIdle,
}

impl ConnState {
    /// Every state, in declaration order.
    pub const ALL: [ConnState; 5] = [
        ConnState::Connecting,
        ConnState::Active,
        ConnState::Idle,
        ConnState::TunnelActive,
        ConnState::TunnelIdle,
    ];

    /// The name `/debug/pools` gives the state.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Active => "active",
            ConnState::Idle => "idle",
            ConnState::TunnelActive => "tunnel_active",
            ConnState::TunnelIdle => "tunnel_idle",
        }
    }

    /// The gauge that counts sockets in this state, and its `state` label: tunnels
    /// have a gauge of their own.
    fn gauge(self) -> (&'static str, &'static str) {
        match self {
            ConnState::Connecting => (t::UPSTREAM_CONNECTIONS, "connecting"),
            ConnState::Active => (t::UPSTREAM_CONNECTIONS, "active"),
            ConnState::Idle => (t::UPSTREAM_CONNECTIONS, "idle"),
            ConnState::TunnelActive => (t::TUNNELS, "active"),
            ConnState::TunnelIdle => (t::TUNNELS, "idle"),
        }
    }
}

impl Serialize for ConnState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a socket was closed: the `reason` label of the closed counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    IdleTimeout,
    MaxLifetime,
    MaxRequests,
    MaxIdle,
    RemoteClosed,
    Error,
    Evicted,
    Shutdown,
    /// The request it carried failed on the client's side (a malformed or cut-off
    /// body) after its head may have gone out: the socket is closed, and it is not
    /// the upstream's error.
    RequestAborted,
}

impl CloseReason {
    /// Every reason, in declaration order.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::IdleTimeout,
        CloseReason::MaxLifetime,
        CloseReason::MaxRequests,
        CloseReason::MaxIdle,
        CloseReason::RemoteClosed,
        CloseReason::Error,
        CloseReason::Evicted,
        CloseReason::Shutdown,
        CloseReason::RequestAborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::MaxRequests => "max_requests",
            CloseReason::MaxIdle => "max_idle",
            CloseReason::RemoteClosed => "remote_closed",
            CloseReason::Error => "error",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
            CloseReason::RequestAborted => "request_aborted",
        }
    }
}

impl Serialize for CloseReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a request never reached the upstream: the `reason` label of the rejected counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    QueueFull,
    QueueTimeout,
    Denied,
}

impl Rejection {
    /// Every reason, in declaration order.
    pub const ALL: [Rejection; 3] = [
        Rejection::QueueFull,
        Rejection::QueueTimeout,
        Rejection::Denied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::Denied => "denied",
        }
    }
}

/// A label enum: its values, each with its place among them.
pub(super) trait Label: Copy + Eq + 'static {
    /// Position of `self` in the enum's `ALL`.
    fn position(self) -> usize;

    /// The label value.
    fn name(self) -> &'static str;
}

macro_rules! label {
    ($($label:ty),*) => {$(
        impl Label for $label {
            fn position(self) -> usize {
                // `ALL` lists the variants in declaration order (a test checks it).
                self as usize
            }

            fn name(self) -> &'static str {
                self.as_str()
            }
        }
    )*};
}
label!(ConnState, CloseReason, Rejection, ErrorKind);

/// The `code` label of a status class, 1 to 5.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The status class of `status` as an index into [`CLASSES`].
fn class_index(status: http::StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

/// One value (a metric handle, say) per value of a label enum, made by walking its
/// `ALL` and looked up by the label value itself.
pub(super) struct PerLabel<L, T, const N: usize> {
    values: [(L, T); N],
}

impl<L: Label, T, const N: usize> PerLabel<L, T, N> {
    pub(super) fn new(all: [L; N], mut value: impl FnMut(L) -> T) -> Self {
        PerLabel {
            values: all.map(|l| (l, value(l))),
        }
    }

    pub(super) fn map<U>(self, mut f: impl FnMut(T) -> U) -> PerLabel<L, U, N> {
        PerLabel {
            values: self.values.map(|(l, v)| (l, f(v))),
        }
    }

    pub(super) fn get(&self, label: L) -> &T {
        let (l, value) = &self.values[label.position()];
        debug_assert!(*l == label);
        value
    }

    pub(super) fn get_mut(&mut self, label: L) -> &mut T {
        let (l, value) = &mut self.values[label.position()];
        debug_assert!(*l == label);
        value
    }
}

impl<L: Label, const N: usize> PerLabel<L, Tallied, N> {
    /// Every label value with its count.
    fn totals(&self) -> BTreeMap<&'static str, u64> {
        self.values
            .iter()
            .map(|(l, t)| (l.name(), t.get()))
            .collect()
    }
}

/// A counter of the exposition, and the pool's own count of it for snapshots: the
/// exposition cannot be read back, and pools may share an `upstream` label.
pub(super) struct Tallied {
    counter: Counter,
    count: AtomicU64,
}

impl Tallied {
    fn new(counter: Counter) -> Tallied {
        Tallied {
            counter,
            count: AtomicU64::new(0),
        }
    }

    fn increment(&self) {
        self.counter.increment(1);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The `state` gauges of one pool's sockets, for its connection table.
pub(super) fn state_gauges(telemetry: &Telemetry, upstream: &str) -> PerLabel<ConnState, Gauge, 5> {
    PerLabel::new(ConnState::ALL, |s| {
        let (name, state) = s.gauge();
        telemetry.gauge(name, &[("upstream", upstream), ("state", state)])
    })
}

/// The metric handles of one pool, registered once. The `state` gauges belong to
/// the connection table, which moves them with the states they count.
pub struct PoolMetrics {
    pub(super) opened: Counter,
    closed: PerLabel<CloseReason, Tallied, 9>,
    /// `[status class 1xx..5xx][reused]`.
    requests: [[Counter; 2]; 5],
    pub duration: Histogram,
    pub(super) queue_depth: Gauge,
    queue_wait: Histogram,
    /// Queued requests and their total wait in microseconds, for the status page.
    queue_waits: [AtomicU64; 2],
    rejected: PerLabel<Rejection, Tallied, 3>,
    pub stale_retries: Counter,
    /// `[client→upstream, upstream→client]`.
    pub tunnel_bytes: [Counter; 2],
    /// Responses the upstream gave (`kind="none"`), by status class.
    answered: [Counter; 5],
    /// Responses tether gave itself for this upstream, by kind (each kind is
    /// answered with one status class, [`ErrorKind::status_class`]).
    failed: PerLabel<ErrorKind, Counter, 12>,
    /// Failed exchanges by kind: tether's own answers and bodies broken off.
    errors: PerLabel<ErrorKind, Tallied, 12>,
    /// Responses of either kind, for the status page's rates.
    responses: AtomicU64,
    /// The cap in force; set only by `Pool::set_limits`.
    pub(super) max_connections: Gauge,
}

impl PoolMetrics {
    pub fn new(telemetry: &Telemetry, upstream: &str) -> PoolMetrics {
        let up = ("upstream", upstream);
        let class = |c: usize, reused: &str| {
            let code = CLASSES[c];
            telemetry.counter(
                t::UPSTREAM_REQUESTS,
                &[up, ("code", code), ("reused", reused)],
            )
        };
        PoolMetrics {
            opened: telemetry.counter(t::UPSTREAM_OPENED, &[up]),
            closed: PerLabel::new(CloseReason::ALL, |r| {
                Tallied::new(telemetry.counter(t::UPSTREAM_CLOSED, &[up, ("reason", r.as_str())]))
            }),
            requests: std::array::from_fn(|c| [class(c, "false"), class(c, "true")]),
            duration: telemetry.histogram(t::UPSTREAM_REQUEST_DURATION, &[up]),
            queue_depth: telemetry.gauge(t::UPSTREAM_QUEUE_DEPTH, &[up]),
            queue_wait: telemetry.histogram(t::UPSTREAM_QUEUE_WAIT, &[up]),
            queue_waits: [AtomicU64::new(0), AtomicU64::new(0)],
            rejected: PerLabel::new(Rejection::ALL, |r| {
                Tallied::new(telemetry.counter(t::UPSTREAM_REJECTED, &[up, ("reason", r.as_str())]))
            }),
            stale_retries: telemetry.counter(t::UPSTREAM_STALE_RETRIES, &[up]),
            tunnel_bytes: ["upstream", "downstream"]
                .map(|d| telemetry.counter(t::TUNNEL_BYTES, &[up, ("direction", d)])),
            answered: CLASSES.map(|code| {
                telemetry.counter(
                    t::UPSTREAM_RESPONSES,
                    &[up, ("code", code), ("kind", "none")],
                )
            }),
            failed: PerLabel::new(ErrorKind::ALL, |k| {
                let code = CLASSES[k.status_class() - 1];
                telemetry.counter(
                    t::UPSTREAM_RESPONSES,
                    &[up, ("code", code), ("kind", k.as_str())],
                )
            }),
            errors: PerLabel::new(ErrorKind::ALL, |k| {
                Tallied::new(telemetry.counter(t::UPSTREAM_ERRORS, &[up, ("kind", k.as_str())]))
            }),
            responses: AtomicU64::new(0),
            max_connections: telemetry.gauge(t::UPSTREAM_MAX_CONNECTIONS, &[up]),
        }
    }

    /// A response went to a client for this upstream: the upstream's own (`None`),
    /// or tether's for a failure of `kind` (also counted as an error).
    pub fn responded(&self, status: http::StatusCode, kind: Option<ErrorKind>) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        match kind {
            None => self.answered[class_index(status)].increment(1),
            Some(kind) => {
                self.failed.get(kind).increment(1);
                self.error(kind);
            }
        }
    }

    /// An exchange with this upstream failed with `kind` (its response may have
    /// been under way already).
    pub fn error(&self, kind: ErrorKind) {
        self.errors.get(kind).increment();
    }

    /// A queued request waited `wait` (for a grant, or until it gave up).
    pub(super) fn queued_for(&self, wait: std::time::Duration) {
        self.queue_wait.record(wait.as_secs_f64());
        self.queue_waits[0].fetch_add(1, Ordering::Relaxed);
        self.queue_waits[1].fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
    }

    /// Queued requests so far, and their total wait in seconds.
    pub(super) fn queue_wait_totals(&self) -> (u64, f64) {
        let [n, micros] = &self.queue_waits;
        (
            n.load(Ordering::Relaxed),
            micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }

    /// Responses sent for this pool's upstream.
    pub(super) fn responses_total(&self) -> u64 {
        self.responses.load(Ordering::Relaxed)
    }

    /// Failed exchanges of this pool, by kind.
    pub(super) fn error_totals(&self) -> BTreeMap<&'static str, u64> {
        self.errors.totals()
    }

    pub fn request(&self, status: http::StatusCode, reused: bool) {
        self.requests[class_index(status)][reused as usize].increment(1);
    }

    pub fn reject(&self, why: Rejection) {
        self.rejected.get(why).increment();
    }

    pub(super) fn closed(&self, reason: CloseReason) {
        self.closed.get(reason).increment();
    }

    /// Sockets this pool closed, by reason.
    pub(super) fn closed_totals(&self) -> BTreeMap<&'static str, u64> {
        self.closed.totals()
    }

    /// Requests this pool refused, by reason.
    pub(super) fn rejected_totals(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.totals()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_enums_list_every_variant_at_its_position() {
        fn check<L: Label + std::fmt::Debug>(all: &[L]) {
            for (i, l) in all.iter().enumerate() {
                assert_eq!(l.position(), i, "{l:?}");
            }
        }
        check(&ConnState::ALL);
        check(&CloseReason::ALL);
        check(&Rejection::ALL);
        check(&ErrorKind::ALL);
    }
}
