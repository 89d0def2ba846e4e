//! Upstreams: one governed pool per origin, and sending a request through it.
//!
//! `send` is the part of the data path after policy: pool checkout (reuse, connect
//! within the cap, or queue), the HTTP/1.1 exchange with its timeouts, one retry on
//! a fresh socket when a pooled one turns out closed before the request was written,
//! and a response body that checks the connection back in when it ends.

pub mod body;
pub mod budget;
pub mod connect;
pub mod pool;
mod registry;
mod request;
mod response;
mod target;
mod tracked;
pub mod tunnel;

use std::future::Future;
use std::net::IpAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::header::HeaderValue;
use http::uri::Authority;
use http::{header, Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use body::UpstreamBody;
use connect::Connector;
pub use pool::{Checkout, Client, CloseReason, Pool, PoolCounts, PoolSnapshot, Pooled, Slot};
pub use registry::Upstreams;
pub use request::{BodyBytes, RequestBody};
use response::{close_after, HeadNotes};
use target::forwarded_path;
pub use target::{h1_form, h1_target};
pub use tracked::Tracked;

use crate::config::{PoolConfig, UpstreamConfig};
use crate::error::ProxyError;
use crate::policy::Origin;
use crate::telemetry::Telemetry;

/// A listed upstream (or an origin reached through an allow pattern) and its pool.
pub struct Upstream {
    pub name: Arc<str>,
    pub origin: Origin,
    pub pool: Pool,
    pub tunnels: tunnel::Tunnels,
    /// Rewrite realms/Location pointing at other upstreams.
    pub rewrite_realm: bool,
    pub tls: bool,
    /// The `[[upstream]]` it was built from, to match it across reloads.
    pub settings: UpstreamConfig,
    /// What the origin's host last resolved to, and when: a redirected connection
    /// to one of these addresses belongs to this upstream.
    addresses: Mutex<Option<(Instant, Arc<[IpAddr]>)>>,
    /// The `Host` requests to this origin carry (the port left out when it is 80).
    host: Result<HeaderValue, http::header::InvalidHeaderValue>,
}

/// Where an exchange's time went before its response head, for the access log, and
/// what the head's one pass found that the caller reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timing {
    /// Waiting for a socket (or the right to open one), retries included.
    pub queue: Duration,
    /// Opening a socket (TCP, and TLS when originated), when one was opened.
    pub connect: Option<Duration>,
    /// Whether the request went on a pooled socket, once one was had.
    pub reused: Option<bool>,
    /// When the upstream's response head arrived, if it did.
    pub head_at: Option<Instant>,
    /// The head has `Location` or `WWW-Authenticate`, for `proxy::rewrite`.
    pub links: bool,
}

/// How long a resolution of an upstream's host is trusted when matching redirected
/// connections: short, so a DNS change is followed within seconds.
const ADDRESSES_TTL: Duration = Duration::from_secs(5);

impl Upstream {
    pub fn new(
        name: &str,
        connector: Connector,
        config: PoolConfig,
        telemetry: &Telemetry,
    ) -> Upstream {
        Upstream::with_budget(name, connector, config, telemetry, None)
    }

    fn with_budget(
        name: &str,
        connector: Connector,
        config: PoolConfig,
        telemetry: &Telemetry,
        budget: Option<Arc<budget::Budget>>,
    ) -> Upstream {
        let origin = connector.origin().clone();
        let origin_string = origin.to_string();
        let host = match origin.port {
            80 => HeaderValue::from_str(&origin.host),
            _ => HeaderValue::from_str(&origin_string),
        };
        let pool = Pool::with_budget(name, connector, config, telemetry, budget);
        Upstream {
            name: name.into(),
            origin,
            tunnels: tunnel::Tunnels::new(pool.clone()),
            pool,
            rewrite_realm: true,
            tls: false,
            settings: UpstreamConfig::new(name, origin_string),
            addresses: Mutex::new(None),
            host,
        }
    }

    /// The `Host` header naming this origin.
    pub fn host_header(&self) -> Result<HeaderValue, ProxyError> {
        self.host
            .as_ref()
            .map(HeaderValue::clone)
            .map_err(|e| ProxyError::BadTarget(format!("{}: {e}", self.origin)))
    }

    /// The origin's host is `ip` or resolves to it (cached for a few seconds; a
    /// failed lookup matches nothing until it is retried).
    pub async fn resolves_to(&self, ip: IpAddr) -> bool {
        if let Some(literal) = self.origin.ip() {
            return literal == ip;
        }
        let cached = self
            .addresses
            .lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < ADDRESSES_TTL)
            .map(|(_, addrs)| addrs.clone());
        let addrs = match cached {
            Some(addrs) => addrs,
            None => {
                let looked_up =
                    tokio::net::lookup_host((self.origin.bare_host(), self.origin.port)).await;
                let addrs: Arc<[IpAddr]> = match looked_up {
                    Ok(found) => found.map(|a| a.ip()).collect(),
                    Err(e) => {
                        tracing::debug!(upstream = %self.name, error = %e, "cannot resolve the upstream's host");
                        Arc::new([])
                    }
                };
                *self.addresses.lock() = Some((Instant::now(), addrs.clone()));
                addrs
            }
        };
        addrs.contains(&ip)
    }

    /// A governed raw TCP socket for a tunnel (CONNECT, or an intercepted connection
    /// that is not plain HTTP): a place under the cap, made by evicting the idle
    /// socket or tunnel idle longest when at it, then TCP within `connect_timeout`.
    pub async fn open_tunnel(&self) -> Result<Tracked<TcpStream>, ProxyError> {
        let config = self.pool.config();
        let slot = self.tunnels.checkout().await?;
        // On error the slot drops here: never opened, nothing counted.
        let tcp = self
            .pool
            .connector()
            .connect_tcp_within(config.connect_timeout)
            .await?;
        let local_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        self.pool
            .connected(slot.id(), local_port, pool::ConnState::TunnelActive);
        Ok(Tracked::new(tcp, slot))
    }

    /// Sends `req` (already in origin form, hop-by-hop headers removed), which began
    /// `started`, and returns the response, its hop-by-hop headers removed, with a
    /// body that returns the connection to the pool, as the caller's body type `B`
    /// (made from it in place, not by moving the response again). `timing` says
    /// where the time went, also when it fails.
    ///
    /// Not an `async fn`: one keeps its arguments twice in its future (as captured
    /// and again as locals, rust-lang/rust#62958), and the request alone is 272
    /// bytes that every move of the request's future would copy.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice"
    )]
    pub fn send<'a, B: From<UpstreamBody>>(
        &'a self,
        mut req: Request<RequestBody>,
        started: Instant,
        timing: &'a mut Timing,
    ) -> impl std::future::Future<Output = Result<Response<B>, ProxyError>> + Send + 'a {
        async move {
            let config = self.pool.config();
            let deadline = started + config.request_timeout;
            let origin = || self.origin.to_string();
            // A pooled socket the upstream already closed costs no request (the request is
            // handed back unsent), so retrying is always safe; bound it by the cap anyway.
            let mut stale_budget = config.max_connections + 1;
            let mut queued_at = started;
            loop {
                // A wait in the queue has no timer of its own: the pool's expires it.
                let checkout = self.pool.checkout_before(Some(deadline)).await;
                let mut pooled = match checkout {
                    Err(e) => {
                        timing.queue += queued_at.elapsed();
                        return Err(e);
                    }
                    Ok(Checkout::Reused(p)) => p,
                    Ok(Checkout::Connect(slot)) => {
                        let connecting_at = Instant::now();
                        timing.queue += connecting_at - queued_at;
                        // Boxed: opening a socket (TLS included) is over a kilobyte of
                        // future that every reused request would otherwise carry.
                        let connected = Box::pin(self.connect(slot, &config)).await;
                        queued_at = Instant::now();
                        timing.connect = Some(queued_at - connecting_at);
                        connected?
                    }
                };
                if pooled.ready().await.is_err() {
                    pooled.discard(CloseReason::RemoteClosed);
                    self.pool.metrics().stale_retries.increment(1);
                    stale_budget -= 1;
                    let now = Instant::now();
                    timing.queue += now - queued_at;
                    if stale_budget == 0 {
                        return Err(ProxyError::UpstreamClosed { origin: origin() });
                    }
                    queued_at = now;
                    continue;
                }
                let reused = pooled.reused;
                timing.reused = Some(reused);
                self.request_form(&mut req, pooled.is_h2())?;
                // The clock is read twice here on the usual path (now, and when the
                // head is back; the start is the service's read): the queue's time
                // ends when the socket is in hand, which for a reused one is when the
                // request goes out.
                let sent_at = Instant::now();
                timing.queue += sent_at - queued_at;
                let head_by = sent_at + config.response_header_timeout;
                let by_request = deadline < head_by;
                let exchange = pooled.send().try_send_request(req);
                // Owns the socket while the head is awaited: if this request is dropped
                // (its client left), the exchange finishes in the background and the
                // socket is kept.
                // The head's deadline: an HTTP/1.1 connection's watch, which the
                // pool's reaper fires (no timer of the request's own); a timer for
                // an HTTP/2 stream.
                let head_limit = head_by.min(deadline);
                let mut timer = pin!(None::<tokio::time::Sleep>);
                if !pooled.arm_head(head_limit) {
                    timer.set(Some(tokio::time::sleep_until(head_limit)));
                }
                let mut in_flight = body::InFlight::new(exchange, pooled, deadline);
                let result = std::future::poll_fn(|cx| {
                    if let Poll::Ready(result) = Pin::new(&mut in_flight).poll(cx) {
                        return Poll::Ready(Some(result));
                    }
                    let fired = match (timer.as_mut().as_pin_mut(), in_flight.head()) {
                        (Some(timer), _) => timer.poll(cx),
                        (None, Some(head)) => head.poll_fired(cx),
                        (None, None) => unreachable!("an HTTP/1.1 connection has a watch"),
                    };
                    fired.map(|()| None)
                })
                .await;
                let pooled = in_flight.pooled();
                if let Some(head) = pooled.head() {
                    head.disarm();
                }
                let result = match result {
                    Some(result) => result,
                    None => {
                        pooled.discard(CloseReason::Error);
                        return Err(if by_request {
                            ProxyError::RequestTimeout {
                                origin: origin(),
                                timeout: config.request_timeout,
                            }
                        } else {
                            ProxyError::ResponseHeaderTimeout {
                                origin: origin(),
                                timeout: config.response_header_timeout,
                            }
                        });
                    }
                };
                match result {
                    Ok(resp) => {
                        let metrics = self.pool.metrics();
                        let head_at = Instant::now();
                        timing.head_at = Some(head_at);
                        metrics.duration.record((head_at - sent_at).as_secs_f64());
                        metrics.request(resp.status(), reused);
                        let HeadNotes {
                            close,
                            keep_alive,
                            hop_by_hop,
                            links,
                        } = HeadNotes::of(resp.headers());
                        timing.links = links;
                        if let Some((timeout, max)) = keep_alive {
                            self.pool.advertised_keepalive(pooled.id(), timeout, max);
                        }
                        if let Some(reason) = close {
                            // Known now, before the driver sees the close.
                            self.pool.close_reason(pooled.id(), reason);
                        }
                        let (mut parts, body) = resp.into_parts();
                        // Not for the client: found in the pass above.
                        hop_by_hop.strip(&mut parts.headers);
                        if close == Some(CloseReason::Error) {
                            // Framed twice (`close_after`'s `Error`). hyper reads the
                            // body by its Transfer-Encoding (chunked, or to the close)
                            // but leaves the length in the map; forwarded, it would
                            // frame the client's copy (RFC 9112 §6.3). Without it, the
                            // body's unknown size makes hyper's server chunk it to the
                            // client afresh.
                            parts.headers.remove(header::CONTENT_LENGTH);
                        }
                        return Ok(Response::from_parts(
                            parts,
                            B::from(UpstreamBody::new(body, pooled, close, deadline)),
                        ));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if stale_budget > 1 => {
                            // Closed before our bytes went out: the upstream never saw it.
                            req = unsent;
                            queued_at = Instant::now();
                            stale_budget -= 1;
                            pooled.discard(CloseReason::RemoteClosed);
                            self.pool.metrics().stale_retries.increment(1);
                        }
                        _ => {
                            let error = ProxyError::exchange(origin(), e.into_error());
                            // The client's own failure still leaves this socket half-written.
                            pooled.discard(match error {
                                ProxyError::RequestBody { .. } => CloseReason::RequestAborted,
                                _ => CloseReason::Error,
                            });
                            return Err(error);
                        }
                    },
                }
            }
        }
    }

    /// Opens a socket under `slot` and starts its HTTP/1.1 driver. The slot rides
    /// inside the IO, so whenever the driver drops the socket the place is freed.
    async fn connect(&self, slot: Slot, config: &PoolConfig) -> Result<Pooled, ProxyError> {
        let connected = self
            .pool
            .connector()
            .connect(config.connect_timeout)
            .await?;
        let id = slot.id();
        self.pool
            .connected(id, connected.local_port, pool::ConnState::Active);
        let io = TokioIo::new(Tracked::new(connected.io, slot));
        let handshake_err = |source| ProxyError::Upstream {
            origin: self.origin.to_string(),
            source,
        };
        let pool = self.pool.clone();
        let client = if connected.h2 {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(handshake_err)?;
            tokio::spawn(async move {
                let result = conn.await;
                pool.driver_ended(id, result.is_err());
            });
            Client::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(handshake_err)?;
            tokio::spawn(async move {
                let mut conn = pin!(conn);
                let result = conn.as_mut().await;
                pool.driver_ended(id, result.is_err());
            });
            Client::h1(send)
        };
        Ok(self.pool.fresh(id, client))
    }
}

impl Upstream {
    /// HTTP/1.1 takes an origin-form target and `Host`; HTTP/2 an absolute URI, from
    /// which hyper writes `:scheme` and `:authority`. A client's origin-form target
    /// (a route listener's usual case) goes to HTTP/1.1 as it is.
    ///
    /// Over HTTP/2 the `Host` tether chose (the origin's, or the client's where it is
    /// kept) becomes the authority and leaves the header map: RFC 9113 §8.3.1 puts
    /// the authority in `:authority`, and strict servers refuse a `Host` field beside
    /// it (nginx answers 400, taking both for Host). A request made ready for an HTTP/2
    /// connection that was gone before it went out gets its `Host` back from the
    /// authority if its retry goes over HTTP/1.1.
    fn request_form<B: http_body::Body>(
        &self,
        req: &mut Request<B>,
        h2: bool,
    ) -> Result<(), ProxyError> {
        let bad = |e: http::Error| ProxyError::BadTarget(e.to_string());
        if h2 {
            // The Host chosen; else the authority of a target already made ready for
            // HTTP/2 (a retry) or of a forward proxy's absolute one; else the origin.
            let host = req.headers_mut().remove(header::HOST);
            let authority = match (host, req.uri().authority()) {
                (None, Some(authority)) => authority.clone(),
                (host, _) => {
                    let host = host.map_or_else(|| self.host_header(), Ok)?;
                    Authority::try_from(host.as_bytes())
                        .map_err(|e| ProxyError::BadTarget(format!("Host {host:?}: {e}")))?
                }
            };
            *req.uri_mut() = Uri::builder()
                .scheme(self.pool.connector().scheme())
                .authority(authority)
                .path_and_query(forwarded_path(req.uri())?)
                .build()
                .map_err(bad)?;
            *req.version_mut() = http::Version::HTTP_2;
            return Ok(());
        }
        if req.version() == http::Version::HTTP_2 {
            if let Some(authority) = req.uri().authority() {
                let host = HeaderValue::from_str(authority.as_str())
                    .map_err(|e| ProxyError::BadTarget(format!("{authority}: {e}")))?;
                req.headers_mut().entry(header::HOST).or_insert(host);
            }
        }
        h1_form(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(origin: &str) -> Upstream {
        let origin = crate::policy::Origin::parse_authority(origin).unwrap();
        Upstream::new(
            "up",
            Connector::plain(origin, false),
            PoolConfig::default(),
            &Telemetry::new(),
        )
    }

    fn request(target: &str, host: Option<&str>) -> Request<http_body_util::Empty<bytes::Bytes>> {
        let mut req = Request::get(target);
        if let Some(host) = host {
            req = req.header(header::HOST, host);
        }
        req.body(http_body_util::Empty::new()).unwrap()
    }

    /// The `Host` chosen for the request is the HTTP/2 authority and leaves the map;
    /// with none, a forward proxy's absolute target or else the origin names it.
    #[tokio::test]
    async fn over_h2_the_host_becomes_the_authority() {
        let up = upstream("registry.test:5000");
        for (target, host, authority) in [
            ("/v2/", Some("registry.test:5000"), "registry.test:5000"),
            ("/v2/", Some("mirror.test"), "mirror.test"),
            ("http://other.test:81/v2/", None, "other.test:81"),
            ("/v2/", None, "registry.test:5000"),
        ] {
            let mut req = request(target, host);
            up.request_form(&mut req, true).unwrap();
            assert_eq!(req.uri().to_string(), format!("http://{authority}/v2/"));
            assert_eq!(req.version(), http::Version::HTTP_2);
            assert!(
                req.headers().get(header::HOST).is_none(),
                "{target} {host:?}"
            );
        }
        let mut bad = request("/", None);
        bad.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a b"));
        assert!(matches!(
            up.request_form(&mut bad, true),
            Err(ProxyError::BadTarget(_))
        ));
    }

    /// A request made ready for an HTTP/2 connection that closed before it went out
    /// may be retried on an HTTP/1.1 one: it goes in origin form with its `Host` back.
    #[tokio::test]
    async fn a_request_made_ready_for_h2_and_retried_over_h1_gets_its_host_back() {
        let up = upstream("registry.test:5000");
        let mut req = request("/v2/?n=1", Some("mirror.test:8080"));
        up.request_form(&mut req, true).unwrap();
        up.request_form(&mut req, false).unwrap();
        assert_eq!(req.uri().to_string(), "/v2/?n=1");
        assert_eq!(req.version(), http::Version::HTTP_11);
        assert_eq!(req.headers()[header::HOST], "mirror.test:8080");
        assert_eq!(req.headers().get_all(header::HOST).iter().count(), 1);
        // An HTTP/1.1 request keeps the Host it has, and gets none added.
        let mut plain = request("/x", Some("registry.test:5000"));
        up.request_form(&mut plain, false).unwrap();
        assert_eq!(plain.headers().get_all(header::HOST).iter().count(), 1);
    }
}
