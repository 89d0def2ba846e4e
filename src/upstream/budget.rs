//! A connection budget shared by every upstream: at most `[budget] max_connections`
//! sockets in all, with each upstream guaranteed its `min_connections` floor.
//!
//! A pool that needs a socket while the budget is spent closes the longest-idle
//! socket of an upstream above its floor; if none is idle, its request queues as
//! usual. A freed unit goes first to a waiting pool below its floor, and a pool above
//! its floor closes instead of idling a checked-in socket while such a pool waits.
//!
//! The budget knows its pools only as [`BudgetMember`]s and through the counts they
//! publish ([`MemberStats`]); it never sees a pool's internals.
//!
//! Lock order: a pool's lock, then the budget's. The budget never locks a pool while
//! holding its own lock: it copies its members out first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use metrics::Gauge;
use parking_lot::Mutex;

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

/// What the budget asks of a pool that shares it. Called without the budget's lock.
pub trait BudgetMember: Send + Sync {
    /// A unit came free: serve this pool's waiters with it, if they may have it.
    fn grant_from_budget(self: Arc<Self>);

    /// Closes this pool's longest-idle socket if the pool is above its floor.
    /// Whether one was chosen (its unit comes back when the socket is gone).
    fn evict_one_idle(&self) -> bool;
}

/// What the budget knows of a pool without taking its lock.
struct Member {
    pool: Weak<dyn BudgetMember>,
    stats: Arc<MemberStats>,
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
            limit: telemetry.gauge(t::BUDGET_MAX_CONNECTIONS, &[]),
        });
        budget.limit.set(max as f64);
        budget
    }

    /// Changes the limit (a reload); sockets above it close as they are checked in.
    pub fn set_max(&self, max: usize) {
        self.state.lock().max = max;
        self.limit.set(max as f64);
    }

    /// Adds a pool, which publishes its counts in `stats`. Members that are gone are
    /// forgotten here.
    pub fn join(&self, pool: Weak<dyn BudgetMember>, stats: Arc<MemberStats>) {
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

    fn members(&self) -> Vec<(Arc<dyn BudgetMember>, Arc<MemberStats>)> {
        self.state
            .lock()
            .members
            .iter()
            .filter_map(|m| Some((m.pool.upgrade()?, m.stats.clone())))
            .collect()
    }

    /// Hands free units to waiting pools, those below their floor first.
    pub fn wake(&self) {
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
    pub fn make_room(&self, me: &Arc<MemberStats>) -> bool {
        self.members()
            .into_iter()
            .filter(|(_, s)| {
                !Arc::ptr_eq(s, me)
                    && s.open.load(Ordering::Relaxed) > s.floor.load(Ordering::Relaxed)
            })
            .any(|(pool, _)| pool.evict_one_idle())
    }
}

#[cfg(test)]
mod tests {
    //! The budget's promises, first with stand-in members, then with real pools in
    //! paused time over in-memory connections.

    use std::time::Duration;

    use super::*;
    use crate::config::PoolConfig;
    use crate::policy::Origin;
    use crate::testkit::memory::{connect, fill_idle};
    use crate::testkit::metric;
    use crate::upstream::connect::Connector;
    use crate::upstream::pool::{Checkout, Pool};

    /// A member that records what it was asked, and takes a unit when granted one.
    struct Stub {
        budget: Arc<Budget>,
        stats: Arc<MemberStats>,
        granted: AtomicUsize,
        evicts: bool,
        evicted: AtomicUsize,
    }

    impl BudgetMember for Stub {
        fn grant_from_budget(self: Arc<Self>) {
            if self.budget.try_take() {
                self.granted.fetch_add(1, Ordering::Relaxed);
            }
        }

        fn evict_one_idle(&self) -> bool {
            self.evicted.fetch_add(1, Ordering::Relaxed);
            self.evicts
        }
    }

    /// A stub with `open` sockets, `waiting` requests and a floor of `floor`.
    fn stub(budget: &Arc<Budget>, open: usize, waiting: usize, floor: usize) -> Arc<Stub> {
        let stats = Arc::new(MemberStats::default());
        stats.open.store(open, Ordering::Relaxed);
        stats.waiting.store(waiting, Ordering::Relaxed);
        stats.floor.store(floor, Ordering::Relaxed);
        let stub = Arc::new(Stub {
            budget: budget.clone(),
            stats: stats.clone(),
            granted: AtomicUsize::new(0),
            evicts: true,
            evicted: AtomicUsize::new(0),
        });
        let member: Weak<dyn BudgetMember> = Arc::downgrade(&stub) as _;
        budget.join(member, stats);
        stub
    }

    #[test]
    fn the_budget_never_grants_more_than_its_limit() {
        let budget = Budget::new(2, &Telemetry::new());
        assert!(budget.try_take() && budget.try_take());
        assert!(!budget.try_take() && budget.is_full());
        budget.give_back();
        assert!(budget.try_take());
        budget.set_max(1);
        assert!(
            budget.is_full(),
            "a lowered limit counts the units still out"
        );
        budget.give_back();
        assert!(budget.is_full());
        budget.give_back();
        assert!(!budget.is_full());
    }

    #[test]
    fn a_freed_unit_goes_first_to_a_waiting_pool_below_its_floor() {
        let budget = Budget::new(1, &Telemetry::new());
        assert!(budget.try_take());
        let above = stub(&budget, 3, 1, 0);
        let starved = stub(&budget, 0, 1, 1);
        budget.give_back();
        budget.wake();
        assert_eq!(starved.granted.load(Ordering::Relaxed), 1);
        assert_eq!(
            above.granted.load(Ordering::Relaxed),
            0,
            "nothing left for it"
        );
        assert!(budget.someone_starved_besides(&above.stats));
        assert!(!budget.someone_starved_besides(&starved.stats));
    }

    #[test]
    fn room_is_made_only_by_pools_above_their_floor_and_never_by_the_asker() {
        let budget = Budget::new(3, &Telemetry::new());
        let me = stub(&budget, 1, 1, 0);
        let at_floor = stub(&budget, 1, 0, 1);
        assert!(!budget.make_room(&me.stats), "nobody above a floor but me");
        let above = stub(&budget, 2, 0, 1);
        assert!(budget.make_room(&me.stats));
        assert_eq!(above.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(at_floor.evicted.load(Ordering::Relaxed), 0);
        assert_eq!(me.evicted.load(Ordering::Relaxed), 0);
    }

    fn pool(
        name: &str,
        budget: &Arc<Budget>,
        telemetry: &Telemetry,
        f: fn(&mut PoolConfig),
    ) -> Pool {
        let mut config = PoolConfig::default();
        f(&mut config);
        let origin = Origin::parse_authority(&format!("{name}.test:80")).unwrap();
        let connector = Connector::plain(origin, false);
        Pool::with_budget(name, connector, config, telemetry, Some(budget.clone()))
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn connects(pool: &Pool) -> tokio::task::JoinHandle<bool> {
        let pool = pool.clone();
        tokio::spawn(async move { matches!(pool.checkout().await, Ok(Checkout::Connect(_))) })
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_at_the_spent_budget_gets_a_place_when_another_pool_evicts_an_idle_socket() {
        let telemetry = Telemetry::new();
        let budget = Budget::new(2, &telemetry);
        let a = pool("a", &budget, &telemetry, |_| {});
        let b = pool("b", &budget, &telemetry, |_| {});
        let _held = fill_idle(&a, 2).await;
        assert!(budget.is_full());
        assert!(connects(&b).await.unwrap(), "b connects in a's place");
        settle().await;
        assert_eq!(a.counts().open(), 1);
        let evicted = metric(
            &telemetry.render(),
            "tether_upstream_connections_closed_total",
            &[("upstream", "a"), ("reason", "evicted")],
        );
        assert_eq!(evicted, Some(1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_at_its_floor_keeps_its_idle_sockets_when_another_needs_one() {
        let telemetry = Telemetry::new();
        let budget = Budget::new(2, &telemetry);
        let a = pool("a", &budget, &telemetry, |c| c.min_connections = 2);
        let b = pool("b", &budget, &telemetry, |c| {
            c.queue_timeout = Duration::from_secs(1)
        });
        let _held = fill_idle(&a, 2).await;
        let waiting = connects(&b);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            !waiting.await.unwrap(),
            "b's request timed out in its queue"
        );
        assert_eq!(a.counts().idle, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_checked_in_socket_closes_while_a_pool_below_its_floor_waits() {
        let telemetry = Telemetry::new();
        let budget = Budget::new(1, &telemetry);
        let a = pool("a", &budget, &telemetry, |_| {});
        let b = pool("b", &budget, &telemetry, |c| c.min_connections = 1);
        let Checkout::Connect(slot) = a.checkout().await.unwrap() else {
            panic!("an empty pool connects")
        };
        let (mut busy, _far) = connect(&a, slot).await;
        let waiting = connects(&b);
        settle().await;
        assert_eq!(b.counts().queued, 1, "no idle socket to evict: b waits");
        busy.send();
        busy.check_in();
        assert!(waiting.await.unwrap(), "the unit went to b");
        settle().await;
        assert_eq!(a.counts().open(), 0, "a closed rather than idled");
    }
}
