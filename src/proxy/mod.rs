//! The request path, in the order a request travels: refuse what cannot be
//! forwarded faithfully ([`checks`]), pick the upstream ([`crate::route`]), rewrite
//! the head for it ([`headers`]), send it through the upstream's governed pool, and
//! rewrite the response head for the client ([`rewrite`]); `CONNECT` opens a governed
//! tunnel instead ([`connect`]). Every response body is a [`body::ProxyBody`].

pub mod body;
mod checks;
mod connect;
mod headers;
pub mod rewrite;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use body::ProxyBody;
use checks::{check_host, check_target};
pub use headers::strip_hop_by_hop;
use headers::{prepare_request, VIA};

use crate::downstream::ClientConn;
use crate::error::ProxyError;
use crate::route::{self, Mode};
use crate::Shared;

/// Handles one request from a client connection.
pub async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    mode: Mode,
    client: Arc<ClientConn>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    // Only the path is logged: query strings carry tokens. (A clone of the URI
    // shares its bytes; copying the path would cost an allocation per request.)
    let uri = req.uri().clone();
    let path = uri.path();
    let result = match check_host(&req) {
        Err(e) => Err(e),
        Ok(()) if method == Method::CONNECT => {
            connect::connect(req, &shared, mode, client.clone()).await
        }
        Ok(()) => forward(req, &shared, mode).await,
    };
    let (response, upstream) = match result {
        Ok(ok) => ok,
        Err(e) => {
            let (status, code) = e.classify();
            shared.downstream().reject(code);
            tracing::warn!(client = %client.peer, %method, path, status = status.as_u16(), error = %e, "request refused");
            (e.to_response(), None)
        }
    };
    tracing::info!(
        target: "tether::access",
        client = %client.peer,
        upstream = upstream.as_deref().unwrap_or("-"),
        %method,
        path,
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
    );
    response
}

/// A response and the name of the upstream it came from (for the access log).
type Handled = (Response<ProxyBody>, Option<Arc<str>>);

async fn forward(
    mut req: Request<Incoming>,
    shared: &Shared,
    mode: Mode,
) -> Result<Handled, ProxyError> {
    check_target(req.method(), req.uri(), mode)?;
    let table = shared.table();
    let upstream = route::upstream(shared, &table, mode, req.uri()).await?;
    // The host the client addressed, to point rewritten URLs back at: the target's
    // authority when it has one, which wins over Host (RFC 9112 §3.2.2).
    let client_host = match req.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    };
    let keep_host = matches!(mode, Mode::Intercept(_));
    prepare_request(&mut req, &upstream, keep_host)?;
    let mut response = upstream.send(req).await?;
    strip_hop_by_hop(response.headers_mut());
    response.headers_mut().append(header::VIA, VIA);
    if upstream.rewrite_realm {
        rewrite::response_headers(&table, mode, client_host.as_ref(), response.headers_mut());
    }
    let name = upstream.name.clone();
    Ok((response.map(ProxyBody::upstream), Some(name)))
}

/// A plain-text response tether writes itself.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
