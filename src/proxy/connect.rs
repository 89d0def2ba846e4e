//! `CONNECT host:port`: the egress policy picks the upstream, a governed socket is
//! opened under its cap, and the tunnel is handed to the client connection, which
//! runs it once hyper has written the `200` and handed the socket back.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::access::Exchange;
use super::body::ProxyBody;
use crate::downstream::{ClientConn, TunnelJob};
use crate::error::ProxyError;
use crate::policy::Origin;
use crate::route::{self, Mode};
use crate::upstream::tunnel::TunnelLog;
use crate::Shared;

/// `CONNECT host:port`: a governed byte tunnel to an allowed origin.
pub(super) async fn connect(
    req: Request<Incoming>,
    shared: &Shared,
    mode: Mode,
    client: Arc<ClientConn>,
    exchange: &mut Exchange,
) -> Result<Response<ProxyBody>, ProxyError> {
    if mode != Mode::Forward {
        return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
    }
    let authority = req
        .uri()
        .authority()
        .filter(|_| {
            req.uri().scheme().is_none()
                && req
                    .uri()
                    .path_and_query()
                    .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty())
        })
        .ok_or_else(|| ProxyError::BadTarget("CONNECT needs a host:port target".into()))?;
    let origin = Origin::parse_authority(authority.as_str()).map_err(ProxyError::BadTarget)?;
    let upstream = route::by_policy(shared, &shared.table(), &origin)?;
    exchange.upstream = Some(upstream.clone());
    let upstream_io = upstream.open_tunnel().await?;
    // The client connection stays "active" for the tunnel's lifetime; the listener
    // runs the tunnel once hyper has written the 200 and handed the socket back.
    client.handoff().fill(TunnelJob {
        tunnels: upstream.tunnels.clone(),
        upstream: upstream_io,
        busy: client.begin_request(),
        log: TunnelLog {
            client: client.peer,
            target: origin.to_string(),
            upstream: upstream.name.clone(),
            started: exchange.started(),
        },
    });
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}
