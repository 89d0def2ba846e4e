//! Pictures of one pool, typed: `/debug/pools` serialises them and the status page
//! renders them, so neither reads numbers back out of the Prometheus text or JSON.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio::time::Instant;

use super::metrics::ConnState;
use super::table::{Keepalive, Table};
use crate::config::PoolConfig;

/// Connection counts of one pool.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolCounts {
    pub connecting: usize,
    pub active: usize,
    pub idle: usize,
    pub tunnels_active: usize,
    pub tunnels_idle: usize,
    pub queued: usize,
}

impl PoolCounts {
    /// The counts of `table`, with `queued` requests waiting.
    pub(super) fn of(table: &Table, queued: usize) -> PoolCounts {
        PoolCounts {
            connecting: table.count(ConnState::Connecting),
            active: table.count(ConnState::Active),
            idle: table.count(ConnState::Idle),
            tunnels_active: table.count(ConnState::TunnelActive),
            tunnels_idle: table.count(ConnState::TunnelIdle),
            queued,
        }
    }

    /// Every socket of the pool, tunnels included.
    pub fn open(&self) -> usize {
        self.connecting + self.active + self.idle + self.tunnels_active + self.tunnels_idle
    }
}

/// One pool as `/debug/pools` shows it.
#[derive(Debug, Serialize)]
pub struct PoolSnapshot {
    pub upstream: String,
    pub origin: String,
    pub limits: PoolConfig,
    /// The cap in force (what `open` is held under).
    pub cap: usize,
    /// This replica's share of `cluster_max_connections`, when a cluster shares it
    /// (the cap in force is the smaller of it and `max_connections`).
    pub share: Option<usize>,
    pub open: usize,
    pub counts: PoolCounts,
    pub connections: Vec<ConnSnapshot>,
    /// This pool's sockets closed since it was made, by reason (every reason listed).
    pub closed: BTreeMap<&'static str, u64>,
    /// This pool's requests refused, by reason (every reason listed).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Responses sent to clients for this pool since it was made.
    pub responses: u64,
    /// Requests that queued for a socket, and their total wait.
    pub queue_waits: u64,
    pub queue_wait_seconds: f64,
    /// Its failed exchanges, by error kind (every kind listed).
    pub errors: BTreeMap<&'static str, u64>,
}

/// One socket as `/debug/pools` shows it.
#[derive(Debug, Serialize)]
pub struct ConnSnapshot {
    pub id: u64,
    pub state: ConnState,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub requests: u64,
    pub local_port: u16,
    /// `h1`, `h2` or `tunnel`.
    pub protocol: &'static str,
    /// Open HTTP/2 streams.
    pub streams: usize,
    /// The upstream's advertised keep-alive limits in force for this socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<Keepalive>,
}

/// Every socket of `table` at `now`, by id.
pub(super) fn connections(table: &Table, now: Instant) -> Vec<ConnSnapshot> {
    let ms = |since: Instant| now.saturating_duration_since(since).as_millis() as u64;
    let mut connections: Vec<ConnSnapshot> = table
        .iter()
        .map(|(id, e)| {
            let tunnel = matches!(e.state(), ConnState::TunnelActive | ConnState::TunnelIdle);
            ConnSnapshot {
                id,
                state: e.state(),
                age_ms: ms(e.created),
                idle_ms: match e.state() {
                    ConnState::Idle | ConnState::TunnelIdle => ms(e.idle_at),
                    _ => 0,
                },
                requests: e.requests,
                local_port: e.local_port,
                protocol: match () {
                    _ if tunnel => "tunnel",
                    _ if e.h2 => "h2",
                    _ => "h1",
                },
                streams: e.streams,
                keepalive: e.keepalive,
            }
        })
        .collect();
    connections.sort_by_key(|c| c.id);
    connections
}
