//! The FIFO of requests waiting for a socket, and the hand-off to them.
//!
//! A waiter is sent a grant (a ready connection, or the right to open one) through a
//! oneshot channel; one that gave up has dropped its receiver, so a grant it could not
//! take comes back to the pool. The queue moves its depth gauge with every change.
//!
//! Generic over the grant so that it knows nothing of what is granted.

use std::collections::VecDeque;

use metrics::Gauge;
use tokio::sync::oneshot;

struct Waiter<G> {
    id: u64,
    tx: oneshot::Sender<G>,
    /// Needs a socket of its own (a tunnel), not a pooled connection.
    slot_only: bool,
}

/// The waiters of one pool, oldest first.
pub(super) struct Queue<G> {
    waiters: VecDeque<Waiter<G>>,
    next_id: u64,
    depth: Gauge,
}

impl<G> Queue<G> {
    pub(super) fn new(depth: Gauge) -> Queue<G> {
        Queue {
            waiters: VecDeque::new(),
            next_id: 0,
            depth,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.waiters.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Someone waits who would take a pooled connection.
    pub(super) fn wants_connection(&self) -> bool {
        self.waiters.iter().any(|w| !w.slot_only)
    }

    /// A new waiter at the back: its id (to leave with [`Queue::remove`]) and where
    /// its grant will arrive.
    pub(super) fn push(&mut self, slot_only: bool) -> (u64, oneshot::Receiver<G>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        self.waiters.push_back(Waiter { id, tx, slot_only });
        self.depth.set(self.waiters.len() as f64);
        (id, rx)
    }

    /// Waiter `id` gave up; whether it was still queued.
    pub(super) fn remove(&mut self, id: u64) -> bool {
        // Waiter ids increase along the queue, so a binary search finds it.
        let Ok(pos) = self.waiters.binary_search_by_key(&id, |w| w.id) else {
            return false;
        };
        self.waiters.remove(pos);
        self.depth.set(self.waiters.len() as f64);
        true
    }

    /// Gives a connection to the oldest waiter still waiting that takes one (not a
    /// tunnel's); back if there is none.
    pub(super) fn hand_off(&mut self, mut grant: G) -> Result<(), G> {
        while let Some(pos) = self.waiters.iter().position(|w| !w.slot_only) {
            let waiter = self.waiters.remove(pos).expect("position is in range");
            match waiter.tx.send(grant) {
                Ok(()) => {
                    self.depth.set(self.waiters.len() as f64);
                    return Ok(());
                }
                Err(back) => grant = back,
            }
        }
        self.depth.set(self.waiters.len() as f64);
        Err(grant)
    }

    /// Gives the right to a socket to the oldest waiter, whatever it waits for. Back
    /// if that waiter had gone: the grant then still holds its place, and whatever
    /// releases it serves the next waiter.
    pub(super) fn grant_oldest(&mut self, grant: G) -> Result<(), G> {
        let Some(waiter) = self.waiters.pop_front() else {
            return Err(grant);
        };
        self.depth.set(self.waiters.len() as f64);
        waiter.tx.send(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Queue<&'static str> {
        Queue::new(Gauge::noop())
    }

    #[test]
    fn a_connection_goes_to_the_oldest_waiter_that_takes_one() {
        let mut q = queue();
        let (_, mut tunnel) = q.push(true);
        let (_, mut first) = q.push(false);
        let (_, mut second) = q.push(false);
        assert!(q.hand_off("conn").is_ok());
        assert_eq!(first.try_recv(), Ok("conn"));
        assert!(tunnel.try_recv().is_err() && second.try_recv().is_err());
        assert_eq!(q.len(), 2);
        assert!(q.wants_connection());
    }

    #[test]
    fn a_hand_off_skips_waiters_that_gave_up_and_comes_back_when_none_is_left() {
        let mut q = queue();
        let (_, gone) = q.push(false);
        drop(gone);
        let (_, _tunnel) = q.push(true);
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
        let (_, mut tunnel) = q.push(true);
        let (_, _pooled) = q.push(false);
        assert!(q.grant_oldest("slot").is_ok());
        assert_eq!(tunnel.try_recv(), Ok("slot"));
        let (_, gone) = q.push(false);
        drop(gone);
        q.remove(1);
        assert_eq!(q.grant_oldest("slot"), Err("slot"), "back, not passed on");
        assert!(q.is_empty());
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_the_queue() {
        let mut q = queue();
        let ids: Vec<u64> = (0..3).map(|_| q.push(false).0).collect();
        assert!(q.remove(ids[1]));
        assert!(!q.remove(ids[1]));
        assert_eq!(q.len(), 2);
    }
}
