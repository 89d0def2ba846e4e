//! Admission under `max_client_connections` and `max_connections_per_client`: the
//! check and the registration under one lock, eviction of a connection with no
//! request in flight to make room (the heaviest client's, or at the per-client
//! limit the client's own), and
//! closing connections in bulk (parked ones past their idle timeout, all at shutdown).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::conn::{ClientClose, ClientConn, Downstream, Registry};

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
        let per_client = config.proxy.max_connections_per_client;
        let ip = peer.ip();
        let deadline = Instant::now() + EVICTION_WAIT;
        loop {
            // Armed before the count is read, so a place freed in between is seen.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (victim, pending, refusal) = {
                let mut reg = self.conns.lock();
                let client_full = per_client.is_some_and(|l| reg.open_from(ip) >= l);
                if !client_full && reg.len() < limit {
                    let conn = self.new_conn(peer);
                    reg.insert(conn.clone());
                    drop(reg);
                    self.clients.opened(ip, &config.diagnosis);
                    return Some(conn);
                }
                if client_full {
                    // The client makes room from its own connections, whatever the
                    // others hold.
                    let victim = Self::own_victim(&mut reg, ip);
                    let pending = reg
                        .values()
                        .any(|c| c.peer.ip() == ip && c.evicting.load(Ordering::Relaxed));
                    (victim, pending, ClientClose::ClientLimit)
                } else {
                    let victim = Self::victim(&mut reg);
                    let pending = reg.values().any(|c| c.evicting.load(Ordering::Relaxed));
                    (victim, pending, ClientClose::Limit)
                }
            };
            match victim {
                // Closed outside the lock: a parked victim's socket drops right here,
                // and its guard takes the lock to deregister.
                Some(victim) => victim.close(ClientClose::Evicted),
                None if pending => {} // an earlier victim is still closing: wait for it
                None => return self.refuse(peer, refusal, config),
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.refuse(peer, refusal, config);
            }
        }
    }

    fn refuse(
        &self,
        peer: SocketAddr,
        reason: ClientClose,
        config: &crate::config::Config,
    ) -> Option<Arc<ClientConn>> {
        self.count_close(reason);
        if reason == ClientClose::ClientLimit {
            let limit = config.proxy.max_connections_per_client;
            tracing::warn!(client = %peer, limit, "client at max_connections_per_client and none of its connections idle: refusing");
        } else {
            let limit = config.proxy.max_client_connections;
            tracing::warn!(client = %peer, limit, "max_client_connections reached and no idle client to close: refusing");
        }
        None
    }

    /// The connection to evict to make room under `max_client_connections`, marked
    /// so that it is never chosen twice: one with no request in flight (a half-sent
    /// head counts as idle since its last request; it holds nothing a client is
    /// waiting for), of the client that holds the most connections, and among
    /// those the one idle longest. One leaky client so pays for its own leak.
    fn victim(reg: &mut Registry) -> Option<Arc<ClientConn>> {
        let now = Instant::now();
        let victim = reg
            .values()
            .filter(|c| evictable(c))
            .max_by_key(|c| (reg.open_from(c.peer.ip()), idleness(c, now)))?
            .clone();
        Some(Self::mark(reg, victim))
    }

    /// `ip`'s own longest-idle connection with no request in flight, marked: the
    /// victim when `ip` is at `max_connections_per_client`.
    fn own_victim(reg: &mut Registry, ip: IpAddr) -> Option<Arc<ClientConn>> {
        let now = Instant::now();
        let victim = reg
            .values()
            .filter(|c| c.peer.ip() == ip && evictable(c))
            .max_by_key(|c| idleness(c, now))?
            .clone();
        Some(Self::mark(reg, victim))
    }

    fn mark(reg: &mut Registry, victim: Arc<ClientConn>) -> Arc<ClientConn> {
        victim.evicting.store(true, Ordering::Relaxed);
        if let Some(c) = reg.clients.get_mut(&victim.peer.ip()) {
            c.evicted += 1;
        }
        victim
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
        let now = Instant::now();
        let expired: Vec<_> = self
            .conns
            .lock()
            .values()
            .filter_map(|c| {
                let parked = c.parked.lock();
                let socket = parked.as_ref()?;
                if socket.listener_stopped() {
                    Some((c.clone(), ClientClose::Shutdown))
                } else if c.idle_at(c.ms_at(now)) >= idle_timeout {
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

/// How long `c` has been idle at `now`, then (for the connections that went idle in
/// the same millisecond) the older first: what "idle longest" orders by.
fn idleness(c: &ClientConn, now: Instant) -> (Duration, std::cmp::Reverse<u64>) {
    (c.idle_at(c.ms_at(now)), std::cmp::Reverse(c.id))
}

/// No request in flight and not already chosen.
fn evictable(c: &ClientConn) -> bool {
    !c.busy() && !c.evicting.load(Ordering::Relaxed)
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
        let chosen: Vec<u64> =
            std::iter::from_fn(|| Downstream::victim(&mut downstream.conns.lock()))
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

    #[tokio::test(start_paused = true)]
    async fn the_victim_at_the_global_limit_is_the_heaviest_clients_longest_idle() {
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let polite: SocketAddr = "127.0.0.3:1".parse().unwrap();
        let leaky: SocketAddr = "127.0.0.2:1".parse().unwrap();
        // The polite client's connection has been idle longest...
        let polite_conn = downstream.register(polite);
        tokio::time::advance(Duration::from_secs(10)).await;
        let oldest_leak = downstream.register(leaky);
        tokio::time::advance(Duration::from_secs(1)).await;
        let leaks: Vec<_> = (0..2).map(|_| downstream.register(leaky)).collect();
        tokio::time::advance(Duration::from_secs(1)).await;
        // ...but the leaky client holds the most: its longest-idle goes first.
        let first = Downstream::victim(&mut downstream.conns.lock()).unwrap();
        assert_eq!(first.id, oldest_leak.id);
        // A busy connection of the heaviest client is never chosen; its idle ones are.
        let _busy = leaks[1].begin_request();
        let second = Downstream::victim(&mut downstream.conns.lock()).unwrap();
        assert_eq!(second.id, leaks[0].id);
        // The leaky client still holds the most, but nothing of it is evictable.
        let third = Downstream::victim(&mut downstream.conns.lock()).unwrap();
        assert_eq!(third.id, polite_conn.id);
        assert_eq!(downstream.top_by_connections(1, None)[0].evicted, 2);
        assert_eq!(downstream.open_from(leaky.ip()), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_per_client_limit_the_victim_is_the_clients_own() {
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let polite: SocketAddr = "127.0.0.3:1".parse().unwrap();
        let leaky: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let _polite_conn = downstream.register(polite);
        tokio::time::advance(Duration::from_secs(10)).await;
        let _newer = downstream.register(polite);
        let _leak = downstream.register(leaky);
        let victim = Downstream::own_victim(&mut downstream.conns.lock(), leaky.ip()).unwrap();
        assert_eq!(victim.peer, leaky);
        assert!(Downstream::own_victim(&mut downstream.conns.lock(), leaky.ip()).is_none());
    }

    /// A leaky client opens and finishes many connections within one millisecond:
    /// "idle longest" must still mean its oldest, not whichever the map yields first.
    #[tokio::test(start_paused = true)]
    async fn connections_idle_since_the_same_millisecond_are_evicted_oldest_first() {
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let leaky: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let ids: Vec<u64> = (0..32).map(|_| downstream.register(leaky).id).collect();
        tokio::time::advance(Duration::from_secs(1)).await;
        let own: Vec<u64> =
            std::iter::from_fn(|| Downstream::own_victim(&mut downstream.conns.lock(), leaky.ip()))
                .take(16)
                .map(|c| c.id)
                .collect();
        assert_eq!(own, ids[..16], "per-client victims, oldest first");
        let global: Vec<u64> =
            std::iter::from_fn(|| Downstream::victim(&mut downstream.conns.lock()))
                .map(|c| c.id)
                .collect();
        assert_eq!(global, ids[16..], "global victims, oldest first");
    }
}
