//! The pool's state machine in paused time, over in-memory connections. The helpers
//! serve the tests of the other files of the pool too.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::policy::Origin;
use crate::telemetry::Telemetry;
use crate::testkit::memory::{connect, fill_idle};
use crate::testkit::metric;

pub(super) fn pool(f: impl FnOnce(&mut PoolConfig)) -> (Pool, Arc<Telemetry>) {
    let mut config = PoolConfig::default();
    f(&mut config);
    let telemetry = Telemetry::new();
    let origin = Origin::parse_authority("upstream.test:80").unwrap();
    let pool = Pool::new("up", Connector::plain(origin, false), config, &telemetry);
    (pool, telemetry)
}

pub(super) fn closed(telemetry: &Telemetry, reason: &str) -> f64 {
    let text = telemetry.render();
    metric(
        &text,
        "tether_upstream_connections_closed_total",
        &[("upstream", "up"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Lets connection drivers observe dropped handles.
pub(super) async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

pub(super) async fn slot(pool: &Pool) -> Slot {
    match pool.checkout().await.unwrap() {
        Checkout::Connect(slot) => slot,
        Checkout::Reused(_) => panic!("expected a fresh slot"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_reaper_closes_only_connections_idle_past_idle_timeout() {
    let (pool, telemetry) = pool(|c| c.idle_timeout = Duration::from_secs(30));
    let _held = fill_idle(&pool, 3).await;
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(pool.reap(), 0);
    // One is used again: its idle clock restarts.
    let Checkout::Reused(p) = pool.checkout().await.unwrap() else {
        panic!()
    };
    p.check_in();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(pool.reap(), 2);
    settle().await;
    assert_eq!(pool.counts().open(), 1);
    assert_eq!(closed(&telemetry, "idle_timeout"), 2.0);
}

#[tokio::test(start_paused = true)]
async fn max_lifetime_closes_a_busy_connection_at_check_in() {
    let (pool, telemetry) = pool(|c| {
        c.max_lifetime = Duration::from_secs(600);
        c.idle_timeout = Duration::from_secs(3600);
    });
    let _held = fill_idle(&pool, 1).await;
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(100)).await;
        let Checkout::Reused(mut p) = pool.checkout().await.unwrap() else {
            panic!()
        };
        p.send();
        p.check_in();
        assert_eq!(pool.reap(), 0, "used every 100 s: never idle long");
    }
    tokio::time::advance(Duration::from_secs(100)).await;
    let Checkout::Reused(mut p) = pool.checkout().await.unwrap() else {
        panic!()
    };
    p.send();
    p.check_in();
    settle().await;
    assert_eq!(pool.counts().open(), 0);
    assert_eq!(closed(&telemetry, "max_lifetime"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_reaper_closes_idle_connections_past_max_lifetime() {
    let (pool, telemetry) = pool(|c| {
        c.max_lifetime = Duration::from_secs(60);
        c.idle_timeout = Duration::from_secs(3600);
    });
    let _held = fill_idle(&pool, 2).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(pool.reap(), 2);
    settle().await;
    assert_eq!(closed(&telemetry, "max_lifetime"), 2.0);
}

#[tokio::test(start_paused = true)]
async fn max_requests_closes_at_check_in() {
    let (pool, telemetry) = pool(|c| c.max_requests_per_connection = 3);
    let _held = fill_idle(&pool, 1).await;
    for _ in 0..3 {
        let Checkout::Reused(mut p) = pool.checkout().await.unwrap() else {
            panic!()
        };
        p.send();
        p.check_in();
    }
    settle().await;
    assert_eq!(pool.counts().open(), 0);
    assert_eq!(closed(&telemetry, "max_requests"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn check_ins_beyond_max_idle_are_closed() {
    let (pool, telemetry) = pool(|c| {
        c.max_connections = 4;
        c.max_idle = Some(2);
    });
    let _held = fill_idle(&pool, 4).await;
    settle().await;
    assert_eq!(pool.counts().idle, 2);
    assert_eq!(pool.counts().open(), 2);
    assert_eq!(closed(&telemetry, "max_idle"), 2.0);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_oldest_first_by_hand_off() {
    let (pool, _) = pool(|c| c.max_connections = 1);
    let (first, _far) = connect(&pool, slot(&pool).await).await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for n in 0..3 {
        let (pool, order) = (pool.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let Checkout::Reused(p) = pool.checkout().await.unwrap() else {
                panic!()
            };
            order.lock().push(n);
            p.check_in();
        }));
        settle().await; // queue them in a known order
    }
    assert_eq!(pool.counts().queued, 3);
    first.check_in();
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(*order.lock(), vec![0, 1, 2]);
    assert_eq!(pool.counts().open(), 1, "one connection served everyone");
}

#[tokio::test(start_paused = true)]
async fn a_freed_place_goes_to_the_oldest_waiter_who_then_connects() {
    let (pool, _) = pool(|c| c.max_connections = 1);
    let (first, _far) = connect(&pool, slot(&pool).await).await;
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { matches!(pool.checkout().await.unwrap(), Checkout::Connect(_)) }
    });
    settle().await;
    first.discard(CloseReason::Error); // the socket closes: its place is freed
    assert!(waiter.await.unwrap(), "the waiter got the right to connect");
}

#[tokio::test(start_paused = true)]
async fn queue_limit_and_queue_timeout_bound_the_wait() {
    let (pool, _) = pool(|c| {
        c.max_connections = 1;
        c.queue_limit = 1;
        c.queue_timeout = Duration::from_secs(5);
    });
    let (_held, _far) = connect(&pool, slot(&pool).await).await;
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.checkout().await.err().map(|e| e.classify().code) }
    });
    settle().await;
    let full = pool.checkout().await.err().map(|e| e.classify().code);
    assert_eq!(full, Some("queue_full"));
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(waiting.await.unwrap(), Some("queue_timeout"));
    assert_eq!(
        pool.counts().queued,
        0,
        "the timed-out waiter left the queue"
    );
}

#[tokio::test(start_paused = true)]
async fn the_cap_holds_under_concurrent_checkouts() {
    let (pool, _) = pool(|c| c.max_connections = 3);
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (pool, peak) = (pool.clone(), peak.clone());
            tokio::spawn(async move {
                let (mut p, far) = match pool.checkout().await.unwrap() {
                    Checkout::Connect(slot) => connect(&pool, slot).await,
                    Checkout::Reused(p) => (p, tokio::io::duplex(1).0),
                };
                peak.fetch_max(pool.counts().open(), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                p.send();
                p.check_in();
                far
            })
        })
        .collect();
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
    assert!(pool.counts().open() <= 3);
}

#[tokio::test(start_paused = true)]
async fn a_lowered_share_closes_idle_sockets_at_once_and_busy_ones_at_check_in() {
    let (pool, telemetry) = pool(|c| c.max_connections = 8);
    let _held = fill_idle(&pool, 4).await;
    let busy: Vec<Pooled> = (0..2)
        .map(|_| match pool.inner.state.lock().table.pop_idle() {
            Some((id, value)) => Pooled::new(pool.inner.clone(), id, value, true),
            None => panic!("four idle"),
        })
        .collect();
    pool.set_share(Some(1));
    settle().await;
    assert_eq!(pool.snapshot().cap, 1);
    assert_eq!(pool.snapshot().share, Some(1));
    let counts = pool.counts();
    assert_eq!(
        (counts.idle, counts.active),
        (0, 2),
        "idle ones closed at once"
    );
    for mut p in busy {
        p.send();
        p.check_in(); // the first is over the share: closed, not reused
        settle().await;
    }
    let counts = pool.counts();
    assert_eq!(
        (counts.open(), counts.idle),
        (1, 1),
        "the share's one socket is kept"
    );
    assert_eq!(closed(&telemetry, "max_idle"), 3.0);
}

#[tokio::test(start_paused = true)]
async fn a_share_of_zero_queues_requests_and_a_raised_share_admits_them() {
    let (pool, _) = pool(|c| c.max_connections = 8);
    pool.set_share(Some(0));
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { matches!(pool.checkout().await.unwrap(), Checkout::Connect(_)) }
    });
    settle().await;
    assert_eq!(pool.counts().queued, 1, "no socket may open under share 0");
    pool.reconfigure(PoolConfig {
        max_connections: 4,
        ..PoolConfig::default()
    });
    settle().await;
    assert_eq!(pool.snapshot().cap, 0, "a reload keeps the share");
    pool.set_share(Some(2));
    assert!(waiter.await.unwrap(), "the waiter got the right to connect");
    pool.set_share(Some(9));
    assert_eq!(pool.snapshot().cap, 4, "never above max_connections");
    pool.set_share(None);
    assert_eq!(pool.snapshot().cap, 4);
}

#[tokio::test(start_paused = true)]
async fn a_budget_floor_above_the_share_is_lowered_to_it() {
    let (pool, _) = pool(|c| c.min_connections = 4);
    let floor = || {
        pool.inner
            .member
            .floor
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(floor(), 4);
    // Never reachable under a share of 1: counted as starved, it would make the
    // budget's other pools yield their sockets to it for nothing.
    pool.set_share(Some(1));
    assert_eq!(floor(), 1);
    pool.set_share(None);
    assert_eq!(floor(), 4);
}

/// Every scrape sees each pool as one picture: while two sockets go from idle to
/// active and back as fast as they can, the state gauges of every render add up to
/// exactly the two that are open. (Moved live, a render that read one state before a
/// socket left it and the next after it arrived counted it twice: 3 over a cap of 2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_gauges_of_every_scrape_add_up_to_the_open_sockets() {
    let (pool, telemetry) = pool(|c| c.max_connections = 2);
    let _held = fill_idle(&pool, 2).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        async move {
            let mut cycles = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(Checkout::Reused(p)) = pool.checkout().await else {
                    panic!("two idle sockets for one checkout at a time")
                };
                p.check_in();
                cycles += 1;
                if cycles % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            cycles
        }
    });
    let sums = tokio::task::spawn_blocking(move || {
        (0..300)
            .map(|_| {
                let text = telemetry.render();
                ["connecting", "active", "idle"]
                    .iter()
                    .filter_map(|state| {
                        metric(
                            &text,
                            crate::telemetry::UPSTREAM_CONNECTIONS,
                            &[("upstream", "up"), ("state", state)],
                        )
                    })
                    .sum::<f64>()
            })
            .collect::<Vec<f64>>()
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cycles = churn.await.unwrap();
    assert!(
        cycles > 300,
        "the sockets changed state throughout ({cycles} cycles)"
    );
    assert!(
        sums.iter().all(|&s| s == 2.0),
        "state gauges per scrape: {sums:?}"
    );
}

/// The pool's timer keeps every waiter's deadline, also one that joins later with
/// less time left while the timer sleeps towards an older waiter's: that one is
/// answered at its own deadline, the older one at `queue_timeout`. A request with
/// no time left is refused at once and never queued.
#[tokio::test(start_paused = true)]
async fn each_waiter_is_expired_at_its_own_deadline() {
    let (pool, _) = pool(|c| {
        c.max_connections = 1;
        c.queue_timeout = Duration::from_secs(5);
    });
    let (_held, _far) = connect(&pool, slot(&pool).await).await;
    let t0 = tokio::time::Instant::now();
    let waiter = |deadline: Option<tokio::time::Instant>| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let refused = pool.checkout_before(deadline).await.err();
            (
                refused.map(|e| e.classify().code),
                tokio::time::Instant::now() - t0,
            )
        })
    };
    let patient = waiter(None);
    settle().await;
    let hurried = waiter(Some(t0 + Duration::from_secs(1)));
    settle().await;
    assert_eq!(pool.counts().queued, 2);
    let (code, after) = hurried.await.unwrap();
    assert_eq!(code, Some("queue_timeout"));
    assert_eq!(after, Duration::from_secs(1), "at its own deadline");
    assert_eq!(pool.counts().queued, 1, "the patient one still waits");
    let (code, after) = patient.await.unwrap();
    assert_eq!(code, Some("queue_timeout"));
    assert_eq!(after, Duration::from_secs(5));
    let none_left = pool
        .checkout_before(Some(tokio::time::Instant::now()))
        .await;
    assert_eq!(
        none_left.err().map(|e| e.classify().code),
        Some("queue_timeout")
    );
    assert_eq!(pool.counts().queued, 0);
}

/// Two pools of one name and origin reporting to `telemetry`, as every unlisted
/// origin's pool is `upstream="unlisted"`.
fn two_pools_of_one_name(telemetry: &Telemetry, config: PoolConfig) -> (Pool, Pool) {
    let origin = Origin::parse_authority("upstream.test:80").unwrap();
    let new_pool = || {
        let connector = Connector::plain(origin.clone(), false);
        Pool::new("up", connector, config.clone(), telemetry)
    };
    (new_pool(), new_pool())
}

/// Pools that share a name share its gauges (every unlisted origin's pool, a pool
/// draining after a reload beside its successor): each adds its own sockets, and
/// one that goes takes only its own away.
#[tokio::test(start_paused = true)]
async fn pools_of_one_name_add_up_in_their_gauges() {
    let telemetry = Telemetry::new();
    let (first, second) = two_pools_of_one_name(&telemetry, PoolConfig::default());
    let idle = || {
        let text = telemetry.render();
        metric(
            &text,
            crate::telemetry::UPSTREAM_CONNECTIONS,
            &[("upstream", "up"), ("state", "idle")],
        )
    };
    let held_first = fill_idle(&first, 1).await;
    let held_second = fill_idle(&second, 2).await;
    assert_eq!(idle(), Some(3.0));
    drop(held_second);
    settle().await;
    assert_eq!(second.counts().open(), 0);
    assert_eq!(
        idle(),
        Some(1.0),
        "the second pool's sockets left, the first's stay"
    );
    drop(second);
    assert_eq!(idle(), Some(1.0));
    drop(held_first);
    settle().await;
    assert_eq!(idle(), Some(0.0));
}

/// The queue depth is read at the scrape, and pools of one name add their waiters
/// up in it: with `set` at each change, the last pool to move its queue would win.
#[tokio::test(start_paused = true)]
async fn the_queue_depth_of_pools_of_one_name_adds_up_at_each_scrape() {
    let telemetry = Telemetry::new();
    let config = PoolConfig {
        max_connections: 1,
        ..PoolConfig::default()
    };
    let (first, second) = two_pools_of_one_name(&telemetry, config);
    let depth = || {
        let text = telemetry.render();
        metric(
            &text,
            crate::telemetry::UPSTREAM_QUEUE_DEPTH,
            &[("upstream", "up")],
        )
    };
    let (_held_first, _far_first) = connect(&first, slot(&first).await).await;
    let (held_second, _far_second) = connect(&second, slot(&second).await).await;
    let wait = |pool: &Pool| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout().await.is_ok() })
    };
    let waiters = [wait(&first), wait(&first), wait(&second)];
    settle().await;
    assert_eq!(
        depth(),
        Some(3.0),
        "two wait on the first pool, one on the second"
    );
    // The second pool's socket goes back: its waiter takes it and leaves the queue.
    drop(held_second);
    settle().await;
    assert_eq!(second.counts().queued, 0);
    assert_eq!(depth(), Some(2.0), "the first pool's two still wait");
    let [a, b, c] = waiters;
    assert!(c.await.unwrap(), "the second pool's waiter was served");
    a.abort();
    b.abort();
    settle().await;
    assert_eq!(first.counts().queued, 0);
    assert_eq!(
        depth(),
        Some(0.0),
        "waiters that gave up are gone from the gauge"
    );
}

/// The pool's reaper fires each HTTP/1.1 exchange's response-head deadline at its
/// time, also one armed later with less time left while the reaper sleeps towards
/// another's, and a deadline disarmed when the head came never fires.
#[tokio::test(start_paused = true)]
async fn the_reaper_fires_each_response_head_deadline_at_its_time() {
    let (pool, _) = pool(|c| {
        c.max_connections = 3;
        // Only a deadline may wake the reaper within the test.
        c.reap_interval = Duration::from_secs(60);
    });
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(connect(&pool, slot(&pool).await).await);
    }
    let t0 = tokio::time::Instant::now();
    let fired = |pooled: &Pooled| {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        pooled
            .head()
            .expect("HTTP/1.1")
            .poll_fired(&mut cx)
            .is_ready()
    };
    let s = Duration::from_secs;
    assert!(
        conns[0].0.arm_head(t0 + s(5)),
        "an HTTP/1.1 connection has a watch"
    );
    settle().await;
    conns[1].0.arm_head(t0 + s(1)); // less time left, armed while the reaper sleeps
    conns[2].0.arm_head(t0 + s(2));
    conns[2].0.head().unwrap().disarm(); // its head came
    tokio::time::sleep_until(t0 + Duration::from_millis(999)).await;
    assert!(!fired(&conns[1].0), "not before its deadline");
    tokio::time::sleep_until(t0 + s(1) + Duration::from_millis(1)).await;
    assert!(fired(&conns[1].0), "at its own deadline");
    assert!(!fired(&conns[0].0), "the other's is still to come");
    tokio::time::sleep_until(t0 + s(5) + Duration::from_millis(1)).await;
    assert!(fired(&conns[0].0));
    assert!(!fired(&conns[2].0), "a disarmed deadline never fires");
    // A deadline between two milliseconds fires after it, never before.
    let odd = tokio::time::Instant::now() + Duration::from_micros(1_000_400);
    conns[2].0.arm_head(odd);
    tokio::time::sleep_until(odd - Duration::from_micros(100)).await;
    assert!(!fired(&conns[2].0), "not early");
    tokio::time::sleep_until(odd + Duration::from_millis(2)).await;
    assert!(
        fired(&conns[2].0),
        "within the pool's millisecond and tokio's"
    );
}
