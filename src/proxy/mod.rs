//! The request path, in the order a request travels: refuse what cannot be
//! forwarded faithfully ([`checks`]), pick the upstream ([`crate::route`]), rewrite
//! the head for it ([`headers`]), send it through the upstream's governed pool, and
//! rewrite the response head for the client ([`rewrite`]); `CONNECT` opens a governed
//! tunnel instead ([`connect`]). Every response body is a [`body::ProxyBody`].

mod access;
pub mod body;
mod checks;
mod connect;
mod headers;
pub mod rewrite;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

pub use crate::hop_by_hop::strip_hop_by_hop;
use access::Exchange;
use body::ProxyBody;
pub use checks::check_framing;
use checks::{check_host, check_target, RequestNotes};
use headers::{prepare_request, VIA};

use crate::downstream::{ClientConn, RequestGuard};
use crate::route::{self, Mode};
use crate::upstream::RequestBody;
use crate::Shared;

/// Handles one request from a client connection, which began `started` and holds
/// `guard` until its response is done. Its access-log line is written by the
/// response body when the exchange ends ([`access`]).
///
/// This returns an `async move` block rather than being an `async fn`,
/// as [`Upstream::send`](crate::upstream::Upstream::send) does: an `async fn` keeps
/// its arguments twice in its future, and the request is 264 bytes that every move of
/// the future copies. Forwarding is written out in the block too, not awaited as a
/// future of its own, which would keep the request once more beside it. The output
/// is hyper's service's, so the response is not moved once more to wrap it, and the
/// guard and the exchange are put in its body in place.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn handle(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    mode: Mode,
    client: Arc<ClientConn>,
    guard: RequestGuard,
    started: Instant,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
    async move {
        // Boxed once here: the body that writes its line at the end carries it.
        let mut exchange = Box::new(Exchange::new(&req, client.peer, started));
        let connect = req.method() == Method::CONNECT;
        // The head's fields are read once, for every check and rewrite below.
        let notes = RequestNotes::of(req.headers());
        let result = match check_host(req.version(), &notes) {
            Err(e) => Err(e),
            // Boxed, as the upstream's connect is: a tunnel's set-up would otherwise
            // make every forwarded request's future that much larger.
            Ok(()) if connect => {
                Box::pin(connect::connect(
                    req,
                    &shared,
                    mode,
                    client.clone(),
                    &mut exchange,
                ))
                .await
            }
            // Forwarded: written out here rather than awaited as a future of its
            // own, which would keep the request a second time beside it.
            Ok(()) => 'forward: {
                macro_rules! check {
                    ($e:expr) => {
                        match $e {
                            Ok(v) => v,
                            Err(e) => break 'forward Err(e),
                        }
                    };
                }
                check!(check_target(req.method(), req.uri(), mode));
                let table = shared.table();
                let upstream = check!(route::upstream(&shared, &table, mode, req.uri()).await);
                exchange.upstream = Some(upstream.clone());
                let keep_host = matches!(mode, Mode::Intercept(_));
                check!(prepare_request(&mut req, &notes, &upstream, keep_host));
                let (parts, body) = req.into_parts();
                let (body, bytes) = RequestBody::counted(body);
                exchange.request_bytes = bytes;
                let req = Request::from_parts(parts, body);
                let mut response: Response<ProxyBody> =
                    check!(upstream.send(req, started, &mut exchange.timing).await);
                // Its hop-by-hop headers are gone (`Upstream::send`).
                response.headers_mut().append(header::VIA, VIA);
                // Most responses have neither Location nor WWW-Authenticate (`Timing::links`).
                if upstream.rewrite_realm && exchange.timing.links {
                    // The host the client addressed points rewritten URLs back at tether.
                    let client_host = || exchange.client_host();
                    rewrite::response_headers(&table, mode, client_host, response.headers_mut());
                }
                Ok(response)
            }
        };
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                let class = e.classify();
                shared.downstream().reject(class.code);
                let upstream = exchange.upstream.as_ref().map(|u| &*u.name);
                tracing::warn!(client = %client.peer, upstream, status = class.status.as_u16(), error = %e, "request refused");
                exchange.head(class.status, Some(class.kind));
                let mut response = e.to_response::<ProxyBody>();
                response.body_mut().attach(guard, Some(exchange));
                return Ok(response);
            }
        };
        exchange.head(response.status(), None);
        // A tunnel's line is written when it closes.
        let exchange = (!connect).then_some(exchange);
        response.body_mut().attach(guard, exchange);
        Ok(response)
    }
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
