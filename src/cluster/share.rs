//! The share of a cluster-wide cap each member takes, and when a change of the
//! member list changes it: pure functions of what was read and when, tested
//! without a clock or a socket.
//!
//! The rule that keeps the sum of the members' caps under the cluster cap while
//! the list changes: a member's share is the **smallest** share any view of the
//! list gave it within the last hold-off. A view that lowers the share is in force
//! at once; one that raises it waits until every lower view is older than the
//! hold-off. A member that has read the list only once, or is not in it, counts
//! that view as share 0.

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// `total` split over `members` sorted members: member `index` gets
/// `total / members`, and the first `total % members` members one more.
/// 0 for an index outside the list.
pub fn share(total: usize, members: usize, index: usize) -> usize {
    if index >= members {
        return 0;
    }
    total / members + usize::from(index < total % members)
}

/// One read of the member list: the members, sorted and without duplicates, and
/// this replica's place among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub members: Vec<IpAddr>,
    pub self_index: Option<usize>,
}

impl Membership {
    /// The list `addrs` as seen by the member at `me` (`None`: unknown).
    pub fn new(mut addrs: Vec<IpAddr>, me: Option<IpAddr>) -> Membership {
        addrs.sort();
        addrs.dedup();
        let self_index = me.and_then(|me| addrs.iter().position(|a| *a == me));
        Membership {
            members: addrs,
            self_index,
        }
    }
}

/// What one view lets this member take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Joining (the list read only once so far) or not listed: share 0.
    Nothing,
    /// Member `index` of `members`.
    Member { members: usize, index: usize },
}

impl Seen {
    fn share(self, total: usize) -> usize {
        match self {
            Seen::Nothing => 0,
            Seen::Member { members, index } => share(total, members, index),
        }
    }
}

/// What is in force for every upstream with a cluster cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// The list was never read: each pool's own `max_connections` stands in for
    /// the whole cluster cap (see [`Standing::cap`]).
    Fallback,
    /// The views of the last hold-off; the share is the smallest they give.
    Views(Vec<Seen>),
}

impl Standing {
    /// A view of the last hold-off gave nothing: the first read, or the list
    /// without this replica. (Listed now, it is still joining.)
    pub fn holds_nothing(&self) -> bool {
        matches!(self, Standing::Views(views) if views.contains(&Seen::Nothing))
    }

    /// This member's cap for an upstream whose cluster cap is `total` and whose own
    /// cap is `max_connections`. Falling back, the replica acts as if it were alone
    /// with `max_connections` as the whole cap (never above `total`: no single
    /// replica may exceed the cluster's cap, whatever else is unknown).
    pub fn cap(&self, total: usize, max_connections: usize) -> usize {
        match self {
            Standing::Fallback => max_connections.min(total),
            Standing::Views(views) => views
                .iter()
                .map(|v| v.share(total))
                .min()
                .unwrap_or(0)
                .min(max_connections),
        }
    }
}

/// The hold-off state machine: fed every read of the list, it says what is in
/// force.
#[derive(Debug)]
pub struct Tracker {
    hold_off: Duration,
    reads: u64,
    /// Views that differ from the one before, oldest first, each with when it was
    /// replaced (`None`: the current one).
    history: Vec<(Seen, Option<Instant>)>,
    last: Option<Membership>,
}

impl Tracker {
    pub fn new(hold_off: Duration) -> Tracker {
        Tracker {
            hold_off,
            reads: 0,
            history: Vec::new(),
            last: None,
        }
    }

    /// Successful reads so far.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// The last list read.
    pub fn last(&self) -> Option<&Membership> {
        self.last.as_ref()
    }

    /// A read of the list at `now`: `None` when it could not be read, which keeps
    /// what is in force (or the fallback, when it was never read).
    pub fn observe(&mut self, now: Instant, read: Option<Membership>) -> Standing {
        if let Some(membership) = read {
            self.reads += 1;
            let seen = match membership.self_index {
                Some(index) if self.reads >= 2 => Seen::Member {
                    members: membership.members.len(),
                    index,
                },
                _ => Seen::Nothing,
            };
            match self.history.last_mut() {
                Some((current, _)) if *current == seen => {}
                Some((_, until)) => {
                    *until = Some(now);
                    self.history.push((seen, None));
                }
                None => self.history.push((seen, None)),
            }
            let hold_off = self.hold_off;
            self.history.retain(|(_, until)| {
                until.is_none_or(|t| now.saturating_duration_since(t) < hold_off)
            });
            self.last = Some(membership);
        }
        self.standing()
    }

    /// What is in force now.
    pub fn standing(&self) -> Standing {
        if self.reads == 0 {
            return Standing::Fallback;
        }
        Standing::Views(self.history.iter().map(|(seen, _)| *seen).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(last: &[u8]) -> Vec<IpAddr> {
        last.iter().map(|b| IpAddr::from([10, 0, 0, *b])).collect()
    }

    fn me(b: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, b]))
    }

    #[test]
    fn shares_sum_to_the_total_for_every_member_count_with_the_remainder_first() {
        for total in 0..40 {
            for n in 1..12 {
                let shares: Vec<usize> = (0..n).map(|i| share(total, n, i)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total, "{total} over {n}");
                assert!(shares.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
            }
        }
        assert_eq!(
            (0..3).map(|i| share(7, 3, i)).collect::<Vec<_>>(),
            [3, 2, 2]
        );
        assert_eq!(share(6, 3, 3), 0, "outside the list");
        assert_eq!(share(6, 0, 0), 0, "an empty list");
    }

    #[test]
    fn a_membership_is_sorted_and_deduplicated_whatever_order_it_was_read_in() {
        let m = Membership::new(ips(&[3, 1, 2, 1]), me(2));
        assert_eq!(m.members, ips(&[1, 2, 3]));
        assert_eq!(m.self_index, Some(1));
        assert_eq!(Membership::new(ips(&[1, 3]), me(2)).self_index, None);
        assert_eq!(Membership::new(ips(&[1, 3]), None).self_index, None);
    }

    #[test]
    fn a_list_never_read_falls_back_to_the_own_cap_bounded_by_the_cluster_cap() {
        let mut t = Tracker::new(Duration::from_secs(3));
        let standing = t.observe(Instant::now(), None);
        assert_eq!(standing, Standing::Fallback);
        assert_eq!(standing.cap(16, 8), 8);
        assert_eq!(standing.cap(6, 32), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_member_takes_nothing_until_it_has_read_the_list_twice_and_held_off() {
        let hold_off = Duration::from_secs(3);
        let mut t = Tracker::new(hold_off);
        let list = || Some(Membership::new(ips(&[1, 2, 3]), me(1)));
        assert_eq!(t.observe(Instant::now(), list()).cap(6, 32), 0, "read once");
        tokio::time::advance(Duration::from_secs(1)).await;
        // Read twice: a member, but taking its share is growth and waits.
        let standing = t.observe(Instant::now(), list());
        assert_eq!(standing.cap(6, 32), 0);
        assert!(standing.holds_nothing());
        tokio::time::advance(hold_off).await;
        let standing = t.observe(Instant::now(), list());
        assert_eq!(standing.cap(6, 32), 2);
        assert!(!standing.holds_nothing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_shrinks_at_once_and_grows_only_after_the_hold_off() {
        let hold_off = Duration::from_secs(3);
        let mut t = Tracker::new(hold_off);
        let mut read = |members: &[u8]| {
            t.observe(Instant::now(), Some(Membership::new(ips(members), me(2))))
                .cap(6, 32)
        };
        read(&[1, 2, 3]);
        tokio::time::advance(Duration::from_secs(1)).await;
        read(&[1, 2, 3]);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(read(&[1, 2, 3]), 2);
        // A fourth member joins: 6 over 4 is 2, 2, 1, 1; member 2 is second.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(read(&[1, 2, 3, 4]), 2);
        // One leaves, one more joins before it: at once to the smaller share.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(read(&[0, 1, 2, 4]), 1, "now third of four");
        // It shrinks to two members: 3 each, but only after the hold-off from the
        // moment the smaller share was last in view.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(read(&[1, 2]), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            read(&[1, 2]),
            1,
            "2 s after the change, within the hold-off"
        );
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(read(&[1, 2]), 3, "the hold-off has passed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_list_keeps_the_share_in_force_and_an_unlisted_self_takes_none() {
        let hold_off = Duration::from_secs(1);
        let mut t = Tracker::new(hold_off);
        let mut read = |members: Option<&[u8]>| {
            let read = members.map(|m| Membership::new(ips(m), me(2)));
            t.observe(Instant::now(), read).cap(6, 32)
        };
        read(Some(&[1, 2]));
        tokio::time::advance(Duration::from_secs(2)).await;
        read(Some(&[1, 2]));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(read(Some(&[1, 2])), 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(read(None), 3, "unreadable: the last share stays");
        assert_eq!(read(Some(&[1, 3])), 0, "not listed: nothing");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(read(None), 0, "unreadable while unlisted: still nothing");
        assert_eq!(read(Some(&[1, 2])), 0, "listed again: growth waits");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(read(Some(&[1, 2])), 3);
    }
}
