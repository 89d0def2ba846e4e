//! The TLS session store of an upstream's connector.
//!
//! rustls' default `ClientSessionMemoryCache` keeps at most 8 TLS 1.3 tickets per
//! server, and a ticket is used once (RFC 8446 appendix C.4; the `ClientSessionStore`
//! contract). A pool that reopens more sockets than that at once — after its clients
//! left mid-response and it dropped the busy sockets, or after the upstream closed
//! them — makes full handshakes for the rest, where HAProxy and nginx (which reuse
//! one session for every connection) resume them all. This store keeps up to twice
//! the pool's `max_connections` tickets per server name, so that a whole pool can
//! resume even after some tickets were spent for nothing.
//!
//! Why twice: a server sends two tickets after a full handshake, but OpenSSL (nginx,
//! most origins) only one after a resumption, so a resumed socket gives back the one
//! it took. A socket dropped before it read its new ticket (its client left while
//! its TLS handshake was finishing, as in a mass disconnect mid-blob) takes one and
//! gives none. With one ticket per socket kept, a few of those left the next mass
//! reconnect short: 1–4 full handshakes of 16 in benches/registry.sh's burst. The
//! surplus that full handshakes bring covers them. A ticket is the server's opaque
//! ticket (a few hundred bytes) and a secret; the certificate chain it refers to is
//! shared (an `Arc`) with the session it came from, so the store holds one chain
//! per full handshake at most: 32 tickets for a pool of 16 are tens of KiB.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use parking_lot::Mutex;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

/// The most tickets kept per server, whatever the cap: each holds the server's
/// certificate chain, and a pool that reopens more sockets than this at once is
/// rare enough to pay full handshakes for the rest.
const MAX_TICKETS: usize = 256;

/// An upstream connector talks to one server name: the maps hold one entry.
pub(super) struct TicketStore {
    max_tickets: usize,
    inner: Mutex<Sessions>,
}

#[derive(Default)]
struct Sessions {
    kx_hint: HashMap<ServerName<'static>, NamedGroup>,
    tls12: HashMap<ServerName<'static>, Tls12ClientSessionValue>,
    tls13: HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>,
}

impl TicketStore {
    /// The store of a pool of up to `max_connections` sockets: two tickets per
    /// socket, at least rustls' 8, at most [`MAX_TICKETS`].
    pub(super) fn for_pool(max_connections: usize) -> TicketStore {
        TicketStore {
            max_tickets: max_connections.saturating_mul(2).clamp(8, MAX_TICKETS),
            inner: Mutex::new(Sessions::default()),
        }
    }
}

impl fmt::Debug for TicketStore {
    // The sessions hold secrets: never in a debug view.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketStore")
            .field("max_tickets", &self.max_tickets)
            .finish_non_exhaustive()
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.lock().kx_hint.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.lock().kx_hint.get(server_name).copied()
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.lock().tls12.insert(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.lock().tls12.get(server_name).cloned()
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.lock().tls12.remove(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut inner = self.inner.lock();
        let tickets = inner.tls13.entry(server_name).or_default();
        if tickets.len() >= self.max_tickets {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        // The newest first, as rustls does: the least likely to have expired.
        self.inner.lock().tls13.get_mut(server_name)?.pop_back()
    }
}
