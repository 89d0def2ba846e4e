//! The FIFO of requests waiting for a socket, and the hand-off to them.
//!
//! A waiter is sent a grant (a ready connection, or the right to open one) through a
//! oneshot channel; one that gave up has dropped its receiver, so a grant it could not
//! take comes back to the pool. Its share of the depth gauge is brought up to date
//! when a scrape renders ([`Queue::publish_depth`]), not at each change.
//!
//! Each waiter has a deadline, and the queue keeps the time its pool's timer must
//! next look at it ([`Queue::armed`]): the reaper's one timer sends [`Expired`] to the
//! waiters past theirs ([`Queue::expire`]), so a request that waits registers no
//! timer of its own. In a FIFO with one timeout the oldest waiter's deadline comes
//! first, so the timer is moved earlier only when a request joins an empty queue (or
//! one with less time left joins); a grant leaves it where it was, and the reaper
//! then wakes once for nothing and moves it on.
//!
//! Generic over the grant so that it knows nothing of what is granted.

use std::collections::VecDeque;

use metrics::Gauge;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// What a waiter whose deadline passed is sent instead of a grant.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Expired;

/// What a waiter receives: a grant, or [`Expired`].
pub(super) type Granted<G> = Result<G, Expired>;

struct Waiter<G> {
    id: u64,
    tx: oneshot::Sender<Granted<G>>,
    /// Needs a socket of its own (a tunnel), not a pooled connection.
    slot_only: bool,
    deadline: Instant,
}

/// The waiters of one pool, oldest first.
pub(super) struct Queue<G> {
    waiters: VecDeque<Waiter<G>>,
    next_id: u64,
    depth: Gauge,
    /// This queue's share of `depth` as last published: the pools of one name share
    /// the gauge (every unlisted origin's, and a draining pool's with its
    /// successor's), and each adds only its own change.
    published: usize,
    /// When the pool's timer looks at the queue next: no later than the earliest
    /// deadline of a waiter.
    armed: Option<Instant>,
    /// Waiters that joined with a deadline before the one ahead of them (less time
    /// left than `queue_timeout`): while there are none, deadlines rise along the
    /// queue and [`Queue::expire`] stops at the first waiter not yet due.
    hurried: usize,
}

impl<G> Queue<G> {
    pub(super) fn new(depth: Gauge) -> Queue<G> {
        Queue {
            waiters: VecDeque::new(),
            next_id: 0,
            depth,
            published: 0,
            armed: None,
            hurried: 0,
        }
    }

    /// When the pool's timer must next [`expire`](Queue::expire) waiters, if any wait.
    pub(super) fn armed(&self) -> Option<Instant> {
        self.armed
    }

    /// Sends [`Expired`] to the waiters whose deadline is past at `now`, and moves
    /// [`armed`](Queue::armed) to the earliest deadline left. How many it expired.
    pub(super) fn expire(&mut self, now: Instant) -> usize {
        let before = self.waiters.len();
        if self.hurried == 0 {
            // In deadline order: the expired are at the front.
            while self.waiters.front().is_some_and(|w| w.deadline <= now) {
                let waiter = self.waiters.pop_front().expect("front exists");
                // One that gave up has dropped its receiver: nothing to tell.
                let _ = waiter.tx.send(Err(Expired));
            }
            self.armed = self.waiters.front().map(|w| w.deadline);
        } else {
            let mut earliest: Option<Instant> = None;
            let mut i = 0;
            while let Some(waiter) = self.waiters.get(i) {
                if waiter.deadline > now {
                    earliest = Some(earliest.map_or(waiter.deadline, |e| e.min(waiter.deadline)));
                    i += 1;
                    continue;
                }
                let waiter = self.waiters.remove(i).expect("index is in range");
                let _ = waiter.tx.send(Err(Expired));
            }
            self.armed = earliest;
        }
        if self.waiters.is_empty() {
            self.hurried = 0;
        }
        before - self.waiters.len()
    }

    pub(super) fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Adds to the depth gauge the change since its last publication (at a scrape):
    /// the gauge says how many wait when it is read, and the hot path moves no float.
    pub(super) fn publish_depth(&mut self) {
        self.publish(self.waiters.len());
    }

    /// Takes this queue's share out of the depth gauge: its pool is gone.
    pub(super) fn unpublish_depth(&mut self) {
        self.publish(0);
    }

    fn publish(&mut self, n: usize) {
        if n != self.published {
            self.depth.increment(n as f64 - self.published as f64);
            self.published = n;
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Someone waits who would take a pooled connection.
    pub(super) fn wants_connection(&self) -> bool {
        self.waiters.iter().any(|w| !w.slot_only)
    }

    /// A new waiter at the back, to be sent [`Expired`] at `deadline`: its id (to
    /// leave with [`Queue::remove`]), where its grant will arrive, and whether the
    /// pool's timer must be told (its deadline is now the earliest it knows of).
    pub(super) fn push(
        &mut self,
        slot_only: bool,
        deadline: Instant,
    ) -> (u64, oneshot::Receiver<Granted<G>>, bool) {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        match self.waiters.back() {
            None => self.hurried = 0,
            Some(last) if deadline < last.deadline => self.hurried += 1,
            Some(_) => {}
        }
        self.waiters.push_back(Waiter {
            id,
            tx,
            slot_only,
            deadline,
        });
        let rearm = self.armed.is_none_or(|armed| deadline < armed);
        if rearm {
            self.armed = Some(deadline);
        }
        (id, rx, rearm)
    }

    /// Waiter `id` gave up; whether it was still queued.
    pub(super) fn remove(&mut self, id: u64) -> bool {
        // Waiter ids increase along the queue, so a binary search finds it.
        let Ok(pos) = self.waiters.binary_search_by_key(&id, |w| w.id) else {
            return false;
        };
        self.waiters.remove(pos);
        true
    }

    /// Gives a connection to the oldest waiter still waiting that takes one (not a
    /// tunnel's); back if there is none.
    pub(super) fn hand_off(&mut self, mut grant: G) -> Result<(), G> {
        while let Some(pos) = self.waiters.iter().position(|w| !w.slot_only) {
            let waiter = self.waiters.remove(pos).expect("position is in range");
            match waiter.tx.send(Ok(grant)) {
                Ok(()) => return Ok(()),
                Err(back) => grant = back.unwrap_or_else(|_| unreachable!("sent a grant")),
            }
        }
        Err(grant)
    }

    /// Gives the right to a socket to the oldest waiter, whatever it waits for. Back
    /// if that waiter had gone: the grant then still holds its place, and whatever
    /// releases it serves the next waiter.
    pub(super) fn grant_oldest(&mut self, grant: G) -> Result<(), G> {
        let Some(waiter) = self.waiters.pop_front() else {
            return Err(grant);
        };
        waiter
            .tx
            .send(Ok(grant))
            .map_err(|back| back.unwrap_or_else(|_| unreachable!("sent a grant")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn queue() -> Queue<&'static str> {
        Queue::new(Gauge::noop())
    }

    /// A waiter far from its deadline.
    fn push(
        q: &mut Queue<&'static str>,
        slot_only: bool,
    ) -> (u64, oneshot::Receiver<Granted<&'static str>>) {
        let (id, rx, _) = q.push(slot_only, Instant::now() + Duration::from_secs(3600));
        (id, rx)
    }

    /// Two queues of one gauge each publish their own share, and one that ends
    /// takes out what it last published, waiters or none.
    #[test]
    fn queues_of_one_gauge_add_their_shares_and_an_ended_one_takes_its_out() {
        let telemetry = crate::telemetry::Telemetry::new();
        let name = crate::telemetry::UPSTREAM_QUEUE_DEPTH;
        let gauge = || telemetry.gauge(name, &[("upstream", "up")]);
        let depth = || {
            let text = telemetry.render();
            crate::testkit::metric(&text, name, &[("upstream", "up")])
        };
        let (mut a, mut b) = (Queue::<&str>::new(gauge()), Queue::<&str>::new(gauge()));
        let _a1 = push(&mut a, false);
        let _a2 = push(&mut a, false);
        let (b1, _b1_rx) = push(&mut b, false);
        assert_eq!(depth(), Some(0.0), "nothing is published before a scrape");
        a.publish_depth();
        b.publish_depth();
        assert_eq!(depth(), Some(3.0));
        assert!(b.remove(b1));
        b.publish_depth();
        assert_eq!(depth(), Some(2.0), "the second queue's waiter left");
        // The first queue ends with its waiters still in it, before another scrape.
        a.unpublish_depth();
        assert_eq!(depth(), Some(0.0));
    }

    #[test]
    fn a_connection_goes_to_the_oldest_waiter_that_takes_one() {
        let mut q = queue();
        let (_, mut tunnel) = push(&mut q, true);
        let (_, mut first) = push(&mut q, false);
        let (_, mut second) = push(&mut q, false);
        assert!(q.hand_off("conn").is_ok());
        assert_eq!(first.try_recv(), Ok(Ok("conn")));
        assert!(tunnel.try_recv().is_err() && second.try_recv().is_err());
        assert_eq!(q.len(), 2);
        assert!(q.wants_connection());
    }

    #[test]
    fn a_hand_off_skips_waiters_that_gave_up_and_comes_back_when_none_is_left() {
        let mut q = queue();
        let (_, gone) = push(&mut q, false);
        drop(gone);
        let (_, _tunnel) = push(&mut q, true);
        assert_eq!(q.hand_off("conn"), Err("conn"));
        assert_eq!(
            q.len(),
            1,
            "the tunnel still waits; the one that left is gone"
        );
        assert!(!q.wants_connection());
    }

    #[test]
    fn the_right_to_connect_goes_to_the_oldest_waiter_of_any_kind() {
        let mut q = queue();
        let (_, mut tunnel) = push(&mut q, true);
        let (_, _pooled) = push(&mut q, false);
        assert!(q.grant_oldest("slot").is_ok());
        assert_eq!(tunnel.try_recv(), Ok(Ok("slot")));
        let (_, gone) = push(&mut q, false);
        drop(gone);
        q.remove(1);
        assert_eq!(q.grant_oldest("slot"), Err("slot"), "back, not passed on");
        assert!(q.is_empty());
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_the_queue() {
        let mut q = queue();
        let ids: Vec<u64> = (0..3).map(|_| push(&mut q, false).0).collect();
        assert!(q.remove(ids[1]));
        assert!(!q.remove(ids[1]));
        assert_eq!(q.len(), 2);
    }

    /// The timer is told only of a deadline earlier than any it knows; at a
    /// deadline, exactly the waiters past theirs are sent `Expired` and leave, and
    /// the timer moves to the earliest deadline left (none once the queue is empty).
    #[test]
    fn waiters_past_their_deadline_are_expired_and_the_timer_follows_the_earliest() {
        let mut q = queue();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (_, mut first, rearm) = q.push(false, t0 + s(10));
        assert!(rearm);
        let (_, mut second, rearm) = q.push(false, t0 + s(20));
        assert!(!rearm, "a later deadline needs no re-arm");
        let (_, mut hurried, rearm) = q.push(true, t0 + s(5));
        assert!(rearm, "less time left than the oldest waiter");
        assert_eq!(q.armed(), Some(t0 + s(5)));
        assert_eq!(q.expire(t0 + s(4)), 0);
        assert_eq!(q.armed(), Some(t0 + s(5)));
        assert_eq!(q.expire(t0 + s(10)), 2);
        assert_eq!(hurried.try_recv(), Ok(Err(Expired)));
        assert_eq!(first.try_recv(), Ok(Err(Expired)));
        assert!(second.try_recv().is_err(), "still waiting");
        assert_eq!((q.len(), q.armed()), (1, Some(t0 + s(20))));
        assert!(q.hand_off("conn").is_ok());
        assert_eq!(second.try_recv(), Ok(Ok("conn")));
        assert_eq!(q.expire(t0 + s(30)), 0);
        assert_eq!(q.armed(), None);
    }

    /// Waiters in deadline order (one `queue_timeout` for all) expire from the front,
    /// and the timer follows the oldest one left.
    #[test]
    fn in_deadline_order_the_oldest_waiters_expire_first() {
        let mut q = queue();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut rxs: Vec<_> = (1..=3).map(|i| q.push(false, t0 + s(10 * i)).1).collect();
        assert_eq!(q.armed(), Some(t0 + s(10)));
        assert_eq!(q.expire(t0 + s(25)), 2);
        assert_eq!(rxs[0].try_recv(), Ok(Err(Expired)));
        assert_eq!(rxs[1].try_recv(), Ok(Err(Expired)));
        assert!(rxs[2].try_recv().is_err(), "not yet due");
        assert_eq!((q.len(), q.armed()), (1, Some(t0 + s(30))));
    }
}
