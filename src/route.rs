//! Route selection: the one place that picks the upstream for a request, in every
//! mode. A route listener's upstream is its table entry; a forward or CONNECT target
//! is looked up in the egress policy; an intercepted connection is matched by its
//! original destination. Rewriting a response asks here which listed upstream a URL
//! names.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::Uri;

use crate::error::ProxyError;
use crate::policy::{Decision, Origin};
use crate::upstream::Upstream;
use crate::{Shared, Table};

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

/// The upstream for a request reaching tether in `mode` with `target`.
pub async fn upstream(
    shared: &Shared,
    table: &Table,
    mode: Mode,
    target: &Uri,
) -> Result<Arc<Upstream>, ProxyError> {
    match mode {
        Mode::Route(route) => table.route_upstream(route).ok_or(ProxyError::ShuttingDown),
        Mode::Forward => {
            let origin = Origin::from_uri(target).map_err(ProxyError::BadTarget)?;
            by_policy(shared, table, &origin)
        }
        Mode::Intercept(destination) => by_destination(shared, table, destination).await,
    }
}

/// The upstream for an origin, by the egress policy.
pub fn by_policy(
    shared: &Shared,
    table: &Table,
    origin: &Origin,
) -> Result<Arc<Upstream>, ProxyError> {
    match table.policy.decide(origin) {
        Decision::Upstream(i) => Ok(table.listed[i].clone()),
        Decision::Allowed => Ok(shared
            .upstreams()
            .unlisted(origin, !table.policy.allow_private)),
        Decision::Denied => Err(ProxyError::Denied {
            origin: origin.to_string(),
        }),
    }
}

/// The upstream a connection redirected from `destination` belongs to: a listed
/// upstream whose origin is that address (or a name resolving to it), else — if an
/// `[egress] allow` pattern matches it or `allow_unlisted` is set — the `unlisted`
/// pool of that destination.
pub async fn by_destination(
    shared: &Shared,
    table: &Table,
    destination: SocketAddr,
) -> Result<Arc<Upstream>, ProxyError> {
    let origin = Origin {
        host: match destination.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        },
        port: destination.port(),
    };
    let decision = table.policy.decide(&origin);
    if let Decision::Upstream(i) = decision {
        return Ok(table.listed[i].clone());
    }
    for upstream in table.listed.iter().filter(|u| u.origin.port == origin.port) {
        if upstream.origin.ip().is_none() && upstream.resolves_to(destination.ip()).await {
            return Ok(upstream.clone());
        }
    }
    if decision == Decision::Allowed || table.config.transparent.allow_unlisted {
        return Ok(shared
            .upstreams()
            .unlisted(&origin, !table.policy.allow_private));
    }
    Err(ProxyError::Denied {
        origin: origin.to_string(),
    })
}

/// The listed upstream `origin` names, by its index in the table, if any: where a
/// rewritten realm or `Location` should point.
pub fn listed(table: &Table, origin: &Origin) -> Option<usize> {
    match table.policy.decide(origin) {
        Decision::Upstream(i) => Some(i),
        _ => None,
    }
}
