//! When a socket must close, as pure functions of its entry, the limits and the
//! time (in the spirit of hyper-util's `Expiration`): the pool applies them under its
//! lock, the tests below state them without a socket.
//!
//! - At check-in, [`close_at_check_in`]: the first reason that applies, in the order
//!   of its `if` chain, wins.
//! - While idle, [`close_when_idle`]: what the reaper applies on each pass.

use tokio::time::Instant;

use super::metrics::CloseReason;
use super::table::{Entry, Limits};

/// What a check-in depends on beyond the entry: the connection's handle and the pool.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct AtCheckIn {
    /// The upstream closed the connection (its handle says so).
    pub(super) remote_closed: bool,
    /// The pool is shutting down or its upstream was removed.
    pub(super) draining: bool,
    /// More sockets are open than the cap in force (it was lowered).
    pub(super) over_cap: bool,
    /// Another upstream waits below its budget floor for a unit this socket holds.
    pub(super) yield_budget: bool,
}

/// Whether a connection coming back from a complete exchange must close, and why.
/// `None` means it may serve again: a waiter, else the idle list.
pub(super) fn close_at_check_in(
    entry: &Entry,
    limits: &Limits,
    now: Instant,
    at: AtCheckIn,
) -> Option<CloseReason> {
    let max_requests = entry
        .keepalive
        .map_or(limits.max_requests_per_connection, |k| k.max_requests);
    if at.remote_closed {
        Some(CloseReason::RemoteClosed)
    } else if entry.requests >= max_requests {
        Some(CloseReason::MaxRequests)
    } else if now.saturating_duration_since(entry.created) >= limits.max_lifetime {
        Some(CloseReason::MaxLifetime)
    } else if at.draining {
        Some(CloseReason::Shutdown)
    } else if at.over_cap {
        Some(CloseReason::MaxIdle)
    } else if at.yield_budget {
        Some(CloseReason::Evicted)
    } else if entry.keepalive.is_some_and(|k| k.idle_timeout.is_zero()) {
        // The upstream's own timeout leaves no safe time to reuse it.
        Some(CloseReason::IdleTimeout)
    } else {
        None
    }
}

/// Whether an idle socket must close now: idle past its idle timeout (the upstream's,
/// when it advertised one), or older than `max_lifetime`. A `warm` socket (one of
/// the `min_idle` most recently used) is kept through tether's own idle timeout, but
/// not through one the upstream advertised. The idle timeout is judged first, so a
/// warm socket idle past it is kept whatever its age.
pub(super) fn close_when_idle(
    entry: &Entry,
    limits: &Limits,
    now: Instant,
    warm: bool,
) -> Option<CloseReason> {
    let idle_timeout = entry
        .keepalive
        .map_or(limits.idle_timeout, |k| k.idle_timeout);
    if now.saturating_duration_since(entry.idle_at) >= idle_timeout {
        (!warm || entry.keepalive.is_some()).then_some(CloseReason::IdleTimeout)
    } else if now.saturating_duration_since(entry.created) >= limits.max_lifetime {
        Some(CloseReason::MaxLifetime)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::PoolConfig;
    use crate::upstream::pool::metrics::ConnState;
    use crate::upstream::pool::table::Keepalive;

    fn limits() -> Limits {
        Limits::new(
            PoolConfig {
                max_requests_per_connection: 10,
                max_lifetime: Duration::from_secs(600),
                idle_timeout: Duration::from_secs(30),
                ..PoolConfig::default()
            },
            None,
        )
    }

    /// A connection made at `t0`, used `requests` times.
    fn entry(t0: Instant, requests: u64) -> Entry {
        let mut entry = Entry::new(ConnState::Active, t0);
        entry.requests = requests;
        entry
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_young_connection_under_its_limits_is_kept_at_check_in() {
        let t0 = Instant::now();
        let at = AtCheckIn::default();
        assert_eq!(
            close_at_check_in(&entry(t0, 9), &limits(), t0 + secs(599), at),
            None
        );
    }

    #[test]
    fn each_limit_closes_at_check_in_with_its_own_reason() {
        let t0 = Instant::now();
        let (l, fresh) = (limits(), entry(t0, 1));
        let close = |e: &Entry, at| close_at_check_in(e, &l, t0 + secs(1), at);
        let with = |f: fn(&mut AtCheckIn)| {
            let mut at = AtCheckIn::default();
            f(&mut at);
            at
        };
        let cases = [
            (with(|a| a.remote_closed = true), CloseReason::RemoteClosed),
            (with(|a| a.draining = true), CloseReason::Shutdown),
            (with(|a| a.over_cap = true), CloseReason::MaxIdle),
            (with(|a| a.yield_budget = true), CloseReason::Evicted),
        ];
        for (at, reason) in cases {
            assert_eq!(close(&fresh, at), Some(reason), "{at:?}");
        }
        let at = AtCheckIn::default();
        assert_eq!(close(&entry(t0, 10), at), Some(CloseReason::MaxRequests));
        let old = close_at_check_in(&fresh, &l, t0 + secs(600), at);
        assert_eq!(old, Some(CloseReason::MaxLifetime));
    }

    #[test]
    fn an_advertised_keepalive_sets_the_request_budget_and_a_zero_timeout_closes() {
        let t0 = Instant::now();
        let at = AtCheckIn::default();
        let mut e = entry(t0, 3);
        e.keepalive = Some(Keepalive {
            idle_timeout: secs(5),
            max_requests: 3,
        });
        let now = t0 + secs(1);
        assert_eq!(
            close_at_check_in(&e, &limits(), now, at),
            Some(CloseReason::MaxRequests)
        );
        e.keepalive = Some(Keepalive {
            idle_timeout: Duration::ZERO,
            max_requests: 100,
        });
        assert_eq!(
            close_at_check_in(&e, &limits(), now, at),
            Some(CloseReason::IdleTimeout)
        );
    }

    #[test]
    fn check_in_reasons_take_precedence_in_a_fixed_order() {
        let t0 = Instant::now();
        let l = limits();
        let mut e = entry(t0, 10); // at max_requests
        e.keepalive = Some(Keepalive {
            idle_timeout: Duration::ZERO,
            max_requests: 10,
        });
        let mut at = AtCheckIn {
            remote_closed: true,
            draining: true,
            over_cap: true,
            yield_budget: true,
        };
        let old = t0 + secs(600); // past max_lifetime too
                                  // Each reason gives way to the one before it; remove them one by one.
        let order = [
            CloseReason::RemoteClosed,
            CloseReason::MaxRequests,
            CloseReason::MaxLifetime,
            CloseReason::Shutdown,
            CloseReason::MaxIdle,
            CloseReason::Evicted,
            CloseReason::IdleTimeout,
        ];
        let mut now = old;
        for expected in order {
            assert_eq!(close_at_check_in(&e, &l, now, at), Some(expected));
            match expected {
                CloseReason::RemoteClosed => at.remote_closed = false,
                CloseReason::MaxRequests => e.requests = 0,
                CloseReason::MaxLifetime => now = t0 + secs(1),
                CloseReason::Shutdown => at.draining = false,
                CloseReason::MaxIdle => at.over_cap = false,
                CloseReason::Evicted => at.yield_budget = false,
                _ => e.keepalive = None,
            }
        }
        assert_eq!(close_at_check_in(&e, &l, now, at), None);
    }

    #[test]
    fn an_idle_socket_closes_past_its_idle_timeout_or_its_lifetime() {
        let t0 = Instant::now();
        let l = limits();
        let e = entry(t0, 1);
        assert_eq!(close_when_idle(&e, &l, t0 + secs(29), false), None);
        let idle_out = close_when_idle(&e, &l, t0 + secs(30), false);
        assert_eq!(idle_out, Some(CloseReason::IdleTimeout));
        let mut used = entry(t0, 1);
        used.idle_at = t0 + secs(590); // used recently, but made long ago
        let too_old = close_when_idle(&used, &l, t0 + secs(600), false);
        assert_eq!(too_old, Some(CloseReason::MaxLifetime));
    }

    #[test]
    fn a_warm_socket_outlives_the_idle_timeout_but_not_an_advertised_one() {
        let t0 = Instant::now();
        let l = limits();
        let mut e = entry(t0, 1);
        assert_eq!(close_when_idle(&e, &l, t0 + secs(300), true), None);
        e.keepalive = Some(Keepalive {
            idle_timeout: secs(5),
            max_requests: 100,
        });
        let advertised = close_when_idle(&e, &l, t0 + secs(5), true);
        assert_eq!(advertised, Some(CloseReason::IdleTimeout));
        let mut recent = entry(t0, 1);
        recent.idle_at = t0 + secs(590);
        let too_old = close_when_idle(&recent, &l, t0 + secs(600), true);
        assert_eq!(
            too_old,
            Some(CloseReason::MaxLifetime),
            "lifetime still renews it"
        );
    }
}
