//! Downstream state: the registry of open client connections, each connection's
//! clocks and guards ([`conn`], with the CONNECT hand-off), and the
//! admission decisions under
//! `max_client_connections` ([`admission`]). No I/O of its own: the listeners in
//! [`crate::server`] drive it.

mod admission;
mod close;
mod conn;

pub use conn::{
    ClientClose, ClientConn, ClientShare, Downstream, Handoff, RequestGuard, TunnelJob,
};
pub(crate) use conn::{ClientGuard, Events, Parked};
