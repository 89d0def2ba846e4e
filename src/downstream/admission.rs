//! Admission under `max_client_connections`: the check and the registration under
//! one lock, eviction of a connection with no request in flight to make room, and
//! closing connections in bulk (parked ones past their idle timeout, all at shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::conn::{ClientClose, ClientConn, Downstream};

/// How long a connection admitted at `max_client_connections` waits for its
/// eviction victim to close before it is refused instead. A victim with no request
/// in flight closes within the watcher's grace (`server::watcher`); one whose request began after it was
/// chosen finishes that request first.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

impl Downstream {
    /// Registers a just-accepted client connection under `max_client_connections`.
    ///
    /// The check and the registration happen under one lock, so the registered count
    /// never exceeds the limit, whichever listeners accept at once. At the limit, one
    /// connection with no request in flight is evicted (see [`Downstream::victim`])
    /// and the newcomer waits, at most [`EVICTION_WAIT`], for a place to free: it is
    /// admitted only once its victim's socket is gone. `None` (counted, logged) when
    /// no connection can be evicted. The caller must wrap the socket in a
    /// [`ClientIo`] at once, so the registration ends when the socket drops.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        peer: SocketAddr,
        config: &crate::config::Config,
    ) -> Option<Arc<ClientConn>> {
        let limit = config.proxy.max_client_connections;
        let deadline = Instant::now() + EVICTION_WAIT;
        loop {
            // Armed before the count is read, so a place freed in between is seen.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (victim, pending) = {
                let mut conns = self.conns.lock();
                if conns.len() < limit {
                    let conn = self.new_conn(peer);
                    conns.insert(conn.id, conn.clone());
                    drop(conns);
                    self.clients.opened(peer.ip(), &config.diagnosis);
                    return Some(conn);
                }
                let victim = Self::victim(&conns);
                let pending = conns.values().any(|c| c.evicting.load(Ordering::Relaxed));
                (victim, pending)
            };
            match victim {
                // Closed outside the lock: a parked victim's socket drops right here,
                // and its guard takes the lock to deregister.
                Some(victim) => victim.close(ClientClose::Evicted),
                None if pending => {} // an earlier victim is still closing: wait for it
                None => return self.refuse(peer, limit),
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.refuse(peer, limit);
            }
        }
    }

    fn refuse(&self, peer: SocketAddr, limit: usize) -> Option<Arc<ClientConn>> {
        self.count_close(ClientClose::Limit);
        tracing::warn!(client = %peer, limit, "max_client_connections reached and no idle client to close: refusing");
        None
    }

    /// The connection to evict to make room, marked so that it is never chosen
    /// twice: one with no request in flight, idle longest (a half-sent head counts
    /// as idle since its last request; it holds nothing a client is waiting for).
    fn victim(conns: &HashMap<u64, Arc<ClientConn>>) -> Option<Arc<ClientConn>> {
        let victim = conns
            .values()
            .filter(|c| !c.busy() && !c.evicting.load(Ordering::Relaxed))
            .max_by_key(|c| c.idle_for())?;
        victim.evicting.store(true, Ordering::Relaxed);
        Some(victim.clone())
    }

    /// Asks every idle client connection to close (shutdown).
    pub fn close_idle(&self) {
        let all: Vec<_> = self.conns.lock().values().cloned().collect();
        for c in all {
            c.close(ClientClose::Shutdown);
        }
    }

    /// Closes parked sockets idle for `idle_timeout`, and those whose listener has
    /// stopped (a route removed by a reload). A parked socket has no task and so no
    /// timer of its own: [`sweep_parked`] calls this on a short tick.
    pub fn expire_parked(&self, idle_timeout: Duration) {
        let expired: Vec<_> = self
            .conns
            .lock()
            .values()
            .filter_map(|c| {
                let parked = c.parked.lock();
                let socket = parked.as_ref()?;
                if socket.listener_stopped() {
                    Some((c.clone(), ClientClose::Shutdown))
                } else if c.idle_for() >= idle_timeout {
                    Some((c.clone(), ClientClose::IdleTimeout))
                } else {
                    None
                }
            })
            .collect();
        for (c, reason) in expired {
            c.close(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_eviction_victim_is_never_chosen_twice() {
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (a, b) = (downstream.register(peer), downstream.register(peer));
        let busy = downstream.register(peer);
        let _request = busy.begin_request();
        let chosen: Vec<u64> = std::iter::from_fn(|| Downstream::victim(&downstream.conns.lock()))
            .map(|c| c.id)
            .collect();
        let mut expected = vec![a.id, b.id];
        let mut got = chosen.clone();
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(
            got, expected,
            "each idle connection once, never the busy one"
        );
    }
}
