//! The response-head deadlines of HTTP/1.1 exchanges in flight, kept by the pool's
//! reaper rather than by a timer each.
//!
//! An HTTP/1.1 connection carries one exchange at a time, so each has one
//! [`HeadWatch`], made with it and registered in the pool's table: the request in
//! flight arms it with its deadline, the reaper's one timer fires it when the
//! deadline passes, and the request disarms it when the head comes, when it times
//! out, or when it is abandoned. A request then touches two atomics and a waker where
//! a timer of its own cost a timer-wheel insert and removal under the wheel's lock
//! (about 300 instructions, benches/instructions.sh). HTTP/2 streams share a
//! connection and keep their own timers.
//!
//! The pool keeps the earliest deadline the reaper must wake for
//! ([`Inner::heads_due`](super::inner::Inner)): a request with a deadline earlier
//! than it lowers it and wakes the reaper, and only the reaper's scan, once that
//! deadline has come, raises it again. With one `response_header_timeout` for all, a
//! later request's deadline is later, so the reaper is woken early only when the pool
//! was quiet. A deadline fires up to about 2 ms late: it is rounded up to the pool's
//! millisecond, and the reaper's timer to tokio's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

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
    /// In the pool's table, where the reaper finds it: only then may a request rely
    /// on it instead of a timer.
    registered: AtomicBool,
}

/// What the reaper found of one watch.
pub(super) enum Due {
    /// Nothing armed (or already fired).
    Idle,
    /// Armed for this pool millisecond, still to come.
    Later(u64),
    /// Fired now: the request's waker, to wake once the pool's lock is released.
    Fired(Option<Waker>),
}

impl HeadWatch {
    /// Marks the watch as kept by the pool's reaper.
    pub(super) fn register(&self) {
        self.registered.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    /// Arms the deadline `at` (pool milliseconds; at least 1), replacing any earlier.
    pub(super) fn arm(&self, at: u64) {
        self.deadline
            .store(at.clamp(1, FIRED - 1), Ordering::SeqCst);
    }

    /// The head came, the request timed out, or it was abandoned: no deadline, and
    /// no waker of the request's task kept (it would keep the finished task's memory
    /// for as long as the connection stays idle).
    pub fn disarm(&self) {
        self.deadline.store(NONE, Ordering::Relaxed);
        drop(self.waker.take());
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

    /// Fires the deadline if it is due at `now`. Fires only the deadline it read:
    /// one armed since by the next request stays.
    pub(super) fn fire_if_due(&self, now: u64) -> Due {
        let at = self.deadline.load(Ordering::SeqCst);
        if at == NONE || at == FIRED {
            return Due::Idle;
        }
        if at > now {
            return Due::Later(at);
        }
        match self
            .deadline
            .compare_exchange(at, FIRED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Due::Fired(self.waker.take()),
            Err(_) => Due::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wake(due: Due) {
        if let Due::Fired(Some(waker)) = due {
            waker.wake();
        }
    }

    /// Armed, the watch fires at its deadline and hands back the request's waker;
    /// disarmed or re-armed later by the next request, an old deadline fires nothing;
    /// disarmed, it keeps no waker of the request's task.
    #[test]
    fn a_watch_fires_at_its_deadline_and_only_at_the_one_armed() {
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let watch = HeadWatch::default();
        assert!(matches!(watch.fire_if_due(100), Due::Idle), "nothing armed");
        watch.arm(50);
        assert!(watch.poll_fired(&mut cx).is_pending());
        assert!(matches!(watch.fire_if_due(49), Due::Later(50)));
        assert!(watch.poll_fired(&mut cx).is_pending());
        wake(watch.fire_if_due(50));
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(watch.poll_fired(&mut cx).is_ready());
        watch.arm(80); // the next request on the connection
        assert!(
            watch.poll_fired(&mut cx).is_pending(),
            "re-armed, not fired"
        );
        assert_eq!(
            Arc::strong_count(&woken),
            3,
            "the test's two and the watch's clone"
        );
        watch.disarm();
        assert_eq!(Arc::strong_count(&woken), 2, "the watch let the task go");
        assert!(
            matches!(watch.fire_if_due(1000), Due::Idle),
            "disarmed: never fires"
        );
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
    }
}
