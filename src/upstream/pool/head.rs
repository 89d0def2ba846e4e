//! The response-head deadlines of HTTP/1.1 exchanges in flight, kept by the pool's
//! reaper rather than by a timer each.
//!
//! An HTTP/1.1 connection carries one exchange at a time, so each has one
//! [`HeadWatch`], made with it: the request in flight arms it with its deadline, the
//! reaper's one timer fires it when the deadline passes, and the request disarms it
//! when the head comes. A request then touches two atomics and a waker where a timer
//! of its own cost a timer-wheel insert and removal under the wheel's lock (about 450
//! instructions, benches/instructions.sh). HTTP/2 streams share a connection and keep
//! their own timers.
//!
//! The pool keeps the earliest deadline the reaper must wake for
//! ([`Inner::heads_due`](super::inner::Inner)): a request with a deadline earlier
//! than it lowers it and wakes the reaper. With one `response_header_timeout` for all,
//! a later request's deadline is later, so that is rare: when the pool was quiet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// No deadline armed.
const NONE: u64 = 0;
/// The deadline passed: the request in flight has timed out.
const FIRED: u64 = u64::MAX;

/// One HTTP/1.1 connection's response-head deadline, in milliseconds on the pool's
/// clock ([`NONE`], [`FIRED`] or a time), and the waker of the request awaiting it.
#[derive(Debug, Default)]
pub struct HeadWatch {
    deadline: AtomicU64,
    waker: AtomicWaker,
}

impl HeadWatch {
    /// Arms the deadline `at` (pool milliseconds; at least 1), replacing any earlier.
    pub(super) fn arm(&self, at: u64) {
        self.deadline
            .store(at.clamp(1, FIRED - 1), Ordering::SeqCst);
    }

    /// The head came, or the request gave up on it.
    pub fn disarm(&self) {
        self.deadline.store(NONE, Ordering::Relaxed);
    }

    /// Ready once the armed deadline has passed; registers the task to be woken then.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.deadline.load(Ordering::SeqCst) == FIRED {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Fires the deadline if it is due at `now`; else the deadline still to come.
    /// Fires only the deadline it read: one armed since by the next request stays.
    pub(super) fn fire_if_due(&self, now: u64) -> Option<u64> {
        let at = self.deadline.load(Ordering::SeqCst);
        if at == NONE || at == FIRED {
            return None;
        }
        if at > now {
            return Some(at);
        }
        if self
            .deadline
            .compare_exchange(at, FIRED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.waker.wake();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Armed, the watch fires at its deadline and wakes the request; disarmed or
    /// re-armed later by the next request, an old deadline fires nothing.
    #[test]
    fn a_watch_fires_at_its_deadline_and_only_at_the_one_armed() {
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let watch = HeadWatch::default();
        assert_eq!(watch.fire_if_due(100), None, "nothing armed");
        watch.arm(50);
        assert!(watch.poll_fired(&mut cx).is_pending());
        assert_eq!(watch.fire_if_due(49), Some(50));
        assert!(watch.poll_fired(&mut cx).is_pending());
        assert_eq!(watch.fire_if_due(50), None);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(watch.poll_fired(&mut cx).is_ready());
        watch.arm(80); // the next request on the connection
        assert!(
            watch.poll_fired(&mut cx).is_pending(),
            "re-armed, not fired"
        );
        watch.disarm();
        assert_eq!(
            watch.fire_if_due(1000),
            None,
            "a disarmed watch never fires"
        );
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
    }
}
