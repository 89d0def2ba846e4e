//! Route selection: how a client reached tether ([`Mode`]), which decides how the
//! upstream for its requests is picked.

use std::net::SocketAddr;

/// How a client reached tether.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The forward-proxy listener: absolute-form requests and CONNECT.
    Forward,
    /// Route listener number `n`; its upstream is looked up per request, so a
    /// reload can re-point it.
    Route(usize),
    /// A plain-HTTP connection iptables redirected to the transparent listener, with
    /// its original destination. The upstream is matched per request, like a route's;
    /// the client addressed the origin itself, so its `Host` is kept.
    Intercept(SocketAddr),
}
