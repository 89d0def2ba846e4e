//! Reaping: the timer task and its passes over idle sockets, the warm floor
//! (`min_idle` sockets kept ready through quiet periods), and adaptive keep-alive
//! (an upstream's advertised `Keep-Alive` limits, applied per connection).
//!
//! The reaper holds only a weak reference to the pool: a pool nobody uses goes away,
//! and its reaper with it. What closes an idle socket is decided by
//! [`close_when_idle`]; a pass applies it under the pool's lock and drops the
//! closed connections after it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::expire::close_when_idle;
use super::h2;
use super::inner::{Inner, Slot};
use super::metrics::{CloseReason, ConnState};
use super::table::Keepalive;
use crate::config::PoolConfig;

/// Runs a pass every `reap_interval` (read again after each pass, so a reload
/// changes it) until the pool is gone, expires the queue's waiters at their
/// deadlines, and fires the HTTP/1.1 response-head deadlines (`head`): the pool's one
/// timer, so that a request sets none of its own.
pub(super) fn spawn(weak: Weak<Inner>) {
    let Some(inner) = weak.upgrade() else { return };
    let mut period = inner.limits.read().reap_interval;
    let due = inner.due.clone();
    drop(inner);
    tokio::spawn(async move {
        let mut next = Instant::now() + period;
        let mut queue_at = None;
        let mut heads_at = None;
        loop {
            let wake = [queue_at, heads_at]
                .into_iter()
                .flatten()
                .fold(next, Instant::min);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                // An earlier deadline: a waiter's, or a response head's.
                () = due.notified() => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            let now = Instant::now();
            // The queue's deadlines are kept by this task alone: a pass that panics
            // is logged and the task goes on (the pool's locks do not poison).
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                queue_at = inner.expire_waiters(now);
                heads_at = inner.expire_heads(now);
                if now >= next {
                    pass(&inner, now);
                }
            }));
            if ran.is_err() {
                tracing::error!(upstream = %inner.name, "the pool's reaper panicked; it carries on");
                let soon = now + Duration::from_millis(10);
                queue_at = Some(soon);
                heads_at = Some(heads_at.map_or(soon, |at| at.min(soon)));
            }
            if now >= next {
                period = inner.limits.read().reap_interval;
                next = Instant::now() + period.max(Duration::from_millis(10));
            }
        }
    });
}

/// One pass: closes idle sockets past their idle timeout or `max_lifetime`, HTTP/2
/// connections with no stream open included. Returns how many it closed.
pub(super) fn pass(inner: &Inner, now: Instant) -> usize {
    let limits = inner.limits();
    let (victims, h2_victims) = {
        let mut st = inner.state.lock();
        // The warm floor: the `min_idle` most recently used idle sockets are
        // exempt from the idle timeout (max_lifetime still renews those idle for
        // less than it; see `close_when_idle`).
        let floor_from = st.table.idle_len().saturating_sub(limits.min_idle);
        let victims = st
            .table
            .expire_idle(|entry, place| close_when_idle(entry, &limits, now, place >= floor_from));
        let h2_expired: Vec<(u64, CloseReason)> = h2::unused(&st.table)
            .into_iter()
            .filter_map(|id| {
                let entry = st.table.get(id)?;
                close_when_idle(entry, &limits, now, false).map(|r| (id, r))
            })
            .collect();
        let h2_victims: Vec<_> = h2_expired
            .into_iter()
            .filter_map(|(id, reason)| st.table.unshare(id, reason))
            .collect();
        (victims, h2_victims)
    };
    let n = victims.len() + h2_victims.len();
    drop(victims);
    drop(h2_victims);
    n
}

/// Slots for the connections the warm floor lacks: enough to bring idle plus
/// connecting sockets up to `min_idle`, within the cap. None while draining.
pub(super) fn warm_slots(inner: &Arc<Inner>) -> Vec<Slot> {
    let limits = inner.limits();
    let mut st = inner.state.lock();
    if limits.min_idle == 0 || st.draining {
        return Vec::new();
    }
    let connecting = st.table.count(ConnState::Connecting);
    let lacking = limits
        .min_idle
        .saturating_sub(st.table.idle_len() + connecting);
    (0..lacking.min(st.table.room(&limits)))
        .map_while(|_| inner.new_slot(&mut st, ConnState::Connecting))
        .collect()
}

/// The limits an upstream's `Keep-Alive: timeout=N[, max=M]` sets for one
/// connection, when `adaptive_keepalive` is on: idle timeout `min(idle_timeout,
/// N - keepalive_margin)` (zero: not kept at all) and request budget
/// `min(max_requests_per_connection, M)`.
pub(super) fn advertised(
    config: &PoolConfig,
    timeout: Option<Duration>,
    max: Option<u64>,
) -> Option<Keepalive> {
    if !config.adaptive_keepalive || (timeout.is_none() && max.is_none()) {
        return None;
    }
    let idle_timeout = timeout
        .map(|t| {
            t.saturating_sub(config.keepalive_margin)
                .min(config.idle_timeout)
        })
        .unwrap_or(config.idle_timeout);
    let max_requests = max
        .map(|m| m.min(config.max_requests_per_connection))
        .unwrap_or(config.max_requests_per_connection);
    Some(Keepalive {
        idle_timeout,
        max_requests,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{closed, pool, settle};
    use super::advertised;
    use crate::config::PoolConfig;
    use crate::testkit::memory::fill_idle;

    #[test]
    fn an_advertised_keepalive_is_shortened_by_the_margin_and_capped_by_tethers_limits() {
        let config = PoolConfig {
            idle_timeout: Duration::from_secs(30),
            keepalive_margin: Duration::from_secs(1),
            max_requests_per_connection: 1000,
            ..PoolConfig::default()
        };
        let secs = Duration::from_secs;
        let short = advertised(&config, Some(secs(5)), Some(100)).unwrap();
        assert_eq!((short.idle_timeout, short.max_requests), (secs(4), 100));
        let long = advertised(&config, Some(secs(300)), Some(5000)).unwrap();
        assert_eq!((long.idle_timeout, long.max_requests), (secs(30), 1000));
        let tight = advertised(&config, Some(secs(1)), None).unwrap();
        assert_eq!(
            tight.idle_timeout,
            Duration::ZERO,
            "no safe time to reuse it"
        );
        assert_eq!(advertised(&config, None, None), None);
        let off = PoolConfig {
            adaptive_keepalive: false,
            ..config
        };
        assert_eq!(advertised(&off, Some(secs(5)), None), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_warm_floor_keeps_the_most_recently_used_sockets_through_the_idle_timeout() {
        let (pool, telemetry) = pool(|c| {
            c.idle_timeout = Duration::from_secs(30);
            c.min_idle = 2;
        });
        let _held = fill_idle(&pool, 3).await;
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(pool.reap(), 1);
        settle().await;
        assert_eq!(pool.counts().idle, 2);
        assert_eq!(closed(&telemetry, "idle_timeout"), 1.0);
        assert!(pool.warm_slots().is_empty(), "the floor is full");
    }
}
