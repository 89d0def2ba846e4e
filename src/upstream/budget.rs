//! A connection budget shared by every upstream: at most `[budget] max_connections`
//! sockets in all, with each upstream guaranteed its `min_connections` floor.
//!
//! A pool that needs a socket while the budget is spent closes the longest-idle
//! socket of an upstream above its floor; if none is idle, its request queues as
//! usual. A freed unit goes first to a waiting pool below its floor, and a pool above
//! its floor closes instead of idling a checked-in socket while such a pool waits.
//!
//! Lock order: a pool's lock, then the budget's. The budget never locks a pool while
//! holding its own lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use metrics::Gauge;
use parking_lot::Mutex;

use super::pool::Inner;
use crate::telemetry::{self as t, Telemetry};

/// The shared budget.
pub struct Budget {
    state: Mutex<BudgetState>,
    open: Gauge,
    limit: Gauge,
}

struct BudgetState {
    max: usize,
    used: usize,
    members: Vec<Member>,
}

/// What the budget knows of a pool without taking its lock.
pub struct Member {
    pool: Weak<Inner>,
    pub stats: Arc<MemberStats>,
}

/// Published by a pool under its own lock.
#[derive(Default)]
pub struct MemberStats {
    pub open: AtomicUsize,
    pub waiting: AtomicUsize,
    pub floor: AtomicUsize,
}

impl MemberStats {
    fn starved(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
            && self.open.load(Ordering::Relaxed) < self.floor.load(Ordering::Relaxed)
    }
}

impl Budget {
    pub fn new(max: usize, telemetry: &Telemetry) -> Arc<Budget> {
        let budget = Arc::new(Budget {
            state: Mutex::new(BudgetState {
                max,
                used: 0,
                members: Vec::new(),
            }),
            open: telemetry.gauge(t::BUDGET_CONNECTIONS, &[("state", "open")]),
            limit: telemetry.gauge(t::BUDGET_CONNECTIONS, &[("state", "limit")]),
        });
        budget.limit.set(max as f64);
        budget
    }

    /// Changes the limit (a reload); sockets above it close as they are checked in.
    pub fn set_max(&self, max: usize) {
        self.state.lock().max = max;
        self.limit.set(max as f64);
    }

    pub(crate) fn join(&self, pool: Weak<Inner>, stats: Arc<MemberStats>) {
        let mut st = self.state.lock();
        st.members.retain(|m| m.pool.strong_count() > 0);
        st.members.push(Member { pool, stats });
    }

    /// Takes one unit if the budget allows.
    pub fn try_take(&self) -> bool {
        let mut st = self.state.lock();
        if st.used < st.max {
            st.used += 1;
            self.open.set(st.used as f64);
            true
        } else {
            false
        }
    }

    /// Returns one unit.
    pub fn give_back(&self) {
        let mut st = self.state.lock();
        st.used = st.used.saturating_sub(1);
        self.open.set(st.used as f64);
    }

    pub fn is_full(&self) -> bool {
        let st = self.state.lock();
        st.used >= st.max
    }

    /// Another pool waits below its floor: `me` should yield what it can.
    pub fn someone_starved_besides(&self, me: &Arc<MemberStats>) -> bool {
        self.state
            .lock()
            .members
            .iter()
            .any(|m| !Arc::ptr_eq(&m.stats, me) && m.stats.starved())
    }

    fn members(&self) -> Vec<(Arc<Inner>, Arc<MemberStats>)> {
        self.state
            .lock()
            .members
            .iter()
            .filter_map(|m| Some((m.pool.upgrade()?, m.stats.clone())))
            .collect()
    }

    /// Hands free units to waiting pools, those below their floor first.
    pub(crate) fn wake(&self) {
        let mut members = self.members();
        members.sort_by_key(|(_, s)| !s.starved());
        for (pool, stats) in members {
            if self.is_full() {
                return;
            }
            if stats.waiting.load(Ordering::Relaxed) > 0 {
                pool.grant_from_budget();
            }
        }
    }

    /// Closes the longest-idle socket of a pool (other than `me`) above its floor.
    pub(crate) fn make_room(&self, me: &Arc<MemberStats>) -> bool {
        self.members()
            .into_iter()
            .filter(|(_, s)| {
                !Arc::ptr_eq(s, me)
                    && s.open.load(Ordering::Relaxed) > s.floor.load(Ordering::Relaxed)
            })
            .any(|(pool, _)| pool.evict_one_idle())
    }
}
