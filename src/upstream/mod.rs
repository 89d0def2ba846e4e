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
pub mod tunnel;

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{header, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use body::UpstreamBody;
use connect::Connector;
pub use pool::{Checkout, Client, CloseReason, Pool, PoolCounts, PoolSnapshot, Pooled, Slot};

use crate::config::{Config, PoolConfig, UpstreamConfig};
use crate::error::ProxyError;
use crate::policy::Origin;
use crate::telemetry::{Telemetry, UNLISTED};

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

    /// Sends `req` (already in origin form, hop-by-hop headers removed) and returns
    /// the response with a body that returns the connection to the pool.
    pub async fn send(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let config = self.pool.config();
        let started = Instant::now();
        let deadline = started + config.request_timeout;
        let origin = || self.origin.to_string();
        // A pooled socket the upstream already closed costs no request (the request is
        // handed back unsent), so retrying is always safe; bound it by the cap anyway.
        let mut stale_budget = config.max_connections + 1;
        loop {
            let mut pooled = match self.pool.checkout().await? {
                Checkout::Reused(p) => p,
                Checkout::Connect(slot) => self.connect(slot, &config).await?,
            };
            if pooled.ready().await.is_err() {
                pooled.discard(CloseReason::RemoteClosed);
                self.pool.metrics().stale_retries.increment(1);
                stale_budget -= 1;
                if stale_budget == 0 {
                    return Err(ProxyError::UpstreamClosed { origin: origin() });
                }
                continue;
            }
            let reused = pooled.reused;
            self.request_form(&mut req, pooled.is_h2())?;
            let sent_at = Instant::now();
            let wait = config
                .response_header_timeout
                .min(deadline.saturating_duration_since(sent_at));
            let exchange = pooled.send().try_send_request(req);
            // Owns the socket while the head is awaited: if this request is dropped
            // (its client left), the exchange finishes in the background and the
            // socket is kept.
            let mut in_flight = body::InFlight::new(exchange, pooled, deadline);
            let result = tokio::time::timeout(wait, &mut in_flight).await;
            let pooled = in_flight.pooled();
            let result = match result {
                Ok(result) => result,
                Err(_) => {
                    pooled.discard(CloseReason::Error);
                    return Err(if wait < config.response_header_timeout {
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
                    metrics.duration.record(sent_at.elapsed().as_secs_f64());
                    metrics.request(resp.status(), reused);
                    let close = close_after(resp.headers());
                    if let Some((timeout, max)) = keep_alive_params(resp.headers()) {
                        self.pool.advertised_keepalive(pooled.id(), timeout, max);
                    }
                    if let Some(reason) = close {
                        // Known now, before the driver sees the close.
                        self.pool.close_reason(pooled.id(), reason);
                    }
                    let (mut parts, body) = resp.into_parts();
                    if framed_twice(&parts.headers) {
                        // hyper reads the body by its Transfer-Encoding (chunked, or
                        // to the close) but leaves the length in the map; forwarded,
                        // it would frame the client's copy (RFC 9112 §6.3). Without
                        // it, the body's unknown size makes hyper's server chunk it
                        // to the client afresh.
                        parts.headers.remove(header::CONTENT_LENGTH);
                    }
                    return Ok(Response::from_parts(
                        parts,
                        UpstreamBody::new(body, pooled, close, deadline),
                    ));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if stale_budget > 1 => {
                        // Closed before our bytes went out: the upstream never saw it.
                        req = unsent;
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
            Client::H1(send)
        };
        Ok(self.pool.fresh(id, client))
    }
}

impl Upstream {
    /// HTTP/1.1 takes an origin-form target and `Host`; HTTP/2 an absolute URI, from
    /// which hyper writes `:scheme` and `:authority`. A client's origin-form target
    /// (a route listener's usual case) goes to HTTP/1.1 as it is.
    fn request_form(&self, req: &mut Request<Incoming>, h2: bool) -> Result<(), ProxyError> {
        let uri = req.uri();
        let bad = |e: http::Error| ProxyError::BadTarget(e.to_string());
        if h2 {
            *req.uri_mut() = Uri::builder()
                .scheme(self.pool.connector().scheme())
                .authority(self.origin.to_string())
                .path_and_query(forwarded_path(uri)?)
                .build()
                .map_err(bad)?;
            *req.version_mut() = http::Version::HTTP_2;
            return Ok(());
        }
        h1_form(req)
    }
}

/// Puts `req` in the form tether sends over HTTP/1.1: the target ([`h1_target`]),
/// the version, and the framing of a body of unknown length. Public so the
/// `request_head` fuzz check runs the very transformation the request path does.
pub fn h1_form<B: http_body::Body>(req: &mut Request<B>) -> Result<(), ProxyError> {
    if let Some(target) = h1_target(req.uri())? {
        *req.uri_mut() = target;
    }
    *req.version_mut() = http::Version::HTTP_11;
    // A body of unknown length came chunked, and tether removed the client's
    // Transfer-Encoding with the other hop-by-hop headers. hyper's client chunks such
    // a body itself, except for GET, HEAD and CONNECT, where it assumes there is
    // none and sends no body unless the header is set.
    let body = req.body();
    if !body.is_end_stream() && body.size_hint().exact().is_none() {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    Ok(())
}

/// The target an HTTP/1.1 request for `uri` carries, when it is not `uri` itself: a
/// client's origin-form target goes as it is (`None`); any other becomes
/// [`forwarded_path`].
pub fn h1_target(uri: &Uri) -> Result<Option<Uri>, ProxyError> {
    let origin_form = uri.scheme().is_none()
        && uri.authority().is_none()
        && uri
            .path_and_query()
            .is_some_and(|p| p.as_str().starts_with('/'));
    if origin_form {
        return Ok(None);
    }
    Uri::builder()
        .path_and_query(forwarded_path(uri)?)
        .build()
        .map(Some)
        .map_err(|e| ProxyError::BadTarget(e.to_string()))
}

/// [`target_path`] for a target that names a resource: absolute-form with an http or
/// https scheme, origin-form or asterisk-form. Any other is refused rather than sent
/// upstream as `/` or as its bare path, a resource the client never asked for:
/// authority-form (`GET host:port`, CONNECT's alone, RFC 9112 §3.2.3; `proxy`
/// refuses it first, this is the last step before the bytes are written) and other
/// schemes, which `http::Uri` accepts even empty (`://host/path`).
fn forwarded_path(uri: &Uri) -> Result<PathAndQuery, ProxyError> {
    let absolute = uri
        .scheme()
        .is_some_and(|s| *s == http::uri::Scheme::HTTP || *s == http::uri::Scheme::HTTPS)
        && uri.authority().is_some();
    let bare = uri.scheme().is_none() && uri.authority().is_none();
    if !(absolute || bare) {
        return Err(ProxyError::BadTarget(format!(
            "{uri} is not an origin-form, absolute-form (http or https) or * target"
        )));
    }
    target_path(uri).map_err(|e| ProxyError::BadTarget(e.to_string()))
}

/// A target's path and query as an origin server is sent them: an empty path as `/`
/// (RFC 9112 §3.2.1), also before a query; the asterisk-form stays `*`. `http` reads
/// an empty path as `/` but writes it as nothing, so `http://host#x` (its fragment
/// dropped by the parser) went out as `GET  HTTP/1.1`: such a path is rebuilt.
fn target_path(uri: &Uri) -> Result<PathAndQuery, http::uri::InvalidUri> {
    match uri.path_and_query() {
        Some(p) if p.path() != "/" => Ok(p.clone()),
        Some(p) => match p.query() {
            Some(query) => format!("/?{query}").parse(),
            None => Ok(PathAndQuery::from_static("/")),
        },
        None => Ok(PathAndQuery::from_static("/")),
    }
}

/// Keeps an upstream's warm floor (`min_idle`) filled: every `reap_interval`, opens
/// the sockets it lacks and checks them in idle. Ends with the upstream.
fn spawn_warmer(upstream: std::sync::Weak<Upstream>) {
    tokio::spawn(async move {
        loop {
            let Some(up) = upstream.upgrade() else { return };
            let config = up.pool.config();
            for slot in up.pool.warm_slots() {
                match up.connect(slot, &config).await {
                    Ok(pooled) => pooled.check_in(),
                    Err(e) => {
                        tracing::debug!(upstream = %up.name, error = %e, "warm connection failed");
                        break;
                    }
                }
            }
            drop(up);
            tokio::time::sleep(config.reap_interval).await;
        }
    });
}

/// `Keep-Alive: timeout=N, max=M` (RFC 2068 §19.7.1, still what servers send).
fn keep_alive_params(
    headers: &http::HeaderMap,
) -> Option<(Option<std::time::Duration>, Option<u64>)> {
    let value = headers.get("keep-alive")?.to_str().ok()?;
    let mut timeout = None;
    let mut max = None;
    for param in value.split(',') {
        let Some((name, v)) = param.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            "timeout" => timeout = v.parse::<u64>().ok().map(std::time::Duration::from_secs),
            "max" => max = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    (timeout.is_some() || max.is_some()).then_some((timeout, max))
}

/// Why the connection must close once this response's body has been read, if it
/// must: the upstream said so, or it framed the response with both
/// `Transfer-Encoding` and `Content-Length`. hyper's client lets the first win and
/// would keep the connection, but two framings are how responses are split (RFC 9112
/// §6.3), and which one the upstream meant cannot be known, so its next bytes are
/// not trusted to start a response. Counted as `error`: the upstream broke HTTP's
/// rules, the way a malformed head that hyper rejects is counted.
pub(super) fn close_after(headers: &http::HeaderMap) -> Option<CloseReason> {
    if framed_twice(headers) {
        Some(CloseReason::Error)
    } else if wants_close(headers) {
        Some(CloseReason::RemoteClosed)
    } else {
        None
    }
}

/// Both `Transfer-Encoding` and `Content-Length`: hyper's client reads the body by
/// the former and leaves the latter in the header map.
fn framed_twice(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING) && headers.contains_key(header::CONTENT_LENGTH)
}

fn wants_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

pin_project! {
    /// An upstream socket carrying its [`Slot`]: dropping the socket frees its place
    /// under the cap and counts the close, on every path.
    pub struct Tracked<T> {
        #[pin]
        io: T,
        slot: Slot,
    }
}

impl<T> Tracked<T> {
    pub fn new(io: T, slot: Slot) -> Tracked<T> {
        Tracked { io, slot }
    }

    pub fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl<T: AsyncRead> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Upstreams not in the current table: those created on demand for origins matched by
/// allow patterns, and those a reload removed, kept until their last socket closes.
pub struct Upstreams {
    unlisted: Mutex<HashMap<Origin, Arc<Upstream>>>,
    retired: Mutex<Vec<Arc<Upstream>>>,
    telemetry: Arc<Telemetry>,
    defaults: Mutex<PoolConfig>,
    /// The shared `[budget]`, created with the first configuration that sets one.
    budget: Mutex<Option<Arc<budget::Budget>>>,
}

impl Upstreams {
    pub fn new(telemetry: Arc<Telemetry>) -> Upstreams {
        Upstreams {
            unlisted: Mutex::default(),
            retired: Mutex::default(),
            telemetry,
            defaults: Mutex::new(PoolConfig::default()),
            budget: Mutex::new(None),
        }
    }

    /// The listed upstreams of `config`. An upstream of `previous` with the same
    /// name and connection settings is kept, its live pool taking the new limits.
    pub fn build(
        &self,
        config: &Config,
        previous: &[Arc<Upstream>],
    ) -> Result<Vec<Arc<Upstream>>, String> {
        let budget = {
            let mut current = self.budget.lock();
            match (&*current, config.budget.max_connections) {
                (Some(b), max) if max > 0 => b.set_max(max),
                (Some(_), _) => tracing::warn!("removing the [budget] takes effect on restart"),
                (None, 0) => {}
                (None, max) => *current = Some(budget::Budget::new(max, &self.telemetry)),
            }
            current.clone()
        };
        let mut listed = Vec::new();
        for up in &config.upstream {
            let limits = up.pool(&config.pool);
            if let Some(old) = previous.iter().find(|o| o.settings.same_connection(up)) {
                old.pool.reconfigure(limits);
                listed.push(old.clone());
                continue;
            }
            let origin = Origin::parse_authority(&up.origin)?;
            let connector = Connector::for_upstream(origin, up)
                .map_err(|e| format!("upstream {}: {e}", up.name))?;
            let mut upstream =
                Upstream::with_budget(&up.name, connector, limits, &self.telemetry, budget.clone());
            upstream.rewrite_realm = up.rewrite_realm;
            upstream.tls = up.tls;
            upstream.settings = up.clone();
            let upstream = Arc::new(upstream);
            spawn_warmer(Arc::downgrade(&upstream));
            listed.push(upstream);
        }
        *self.defaults.lock() = config.pool.clone();
        for u in self.unlisted.lock().values() {
            u.pool.reconfigure(config.pool.clone());
        }
        Ok(listed)
    }

    /// Drains upstreams a reload removed: idle sockets close now, in-flight
    /// exchanges finish, and the pool is forgotten once its last socket closes.
    pub fn retire(&self, removed: Vec<Arc<Upstream>>) {
        for u in &removed {
            u.pool.drain();
        }
        self.retired.lock().extend(removed);
    }

    /// The pool for an origin matched by an allow pattern, created on first use.
    pub fn unlisted(&self, origin: &Origin, deny_private: bool) -> Arc<Upstream> {
        let mut map = self.unlisted.lock();
        // Forget pools with no socket left, so the map cannot grow without bound.
        if map.len() > 64 {
            map.retain(|_, u| u.pool.counts().open() > 0);
        }
        if let Some(existing) = map.get(origin) {
            if existing.pool.connector().denies_private() == deny_private {
                return existing.clone();
            }
            // A reload changed `allow_private`: the pool was built under the old
            // rule, so it drains and a new one dials under the new rule.
            let stale = map.remove(origin).expect("just found");
            stale.pool.drain();
            self.retired.lock().push(stale);
        }
        let connector = Connector::plain(origin.clone(), deny_private);
        let upstream = Arc::new(Upstream::new(
            UNLISTED,
            connector,
            self.defaults.lock().clone(),
            &self.telemetry,
        ));
        map.insert(origin.clone(), upstream.clone());
        upstream
    }

    /// Unlisted and retired upstreams that still exist.
    pub fn others(&self) -> Vec<Arc<Upstream>> {
        let mut retired = self.retired.lock();
        retired.retain(|u| u.pool.counts().open() > 0);
        let mut all: Vec<_> = self.unlisted.lock().values().cloned().collect();
        all.extend(retired.iter().cloned());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&'static str, &'static str)]) -> http::HeaderMap {
        lines
            .iter()
            .map(|(n, v)| {
                (
                    http::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn a_response_framed_one_way_keeps_its_socket_unless_it_asks_to_close() {
        assert_eq!(close_after(&headers(&[("content-length", "2")])), None);
        assert_eq!(
            close_after(&headers(&[("transfer-encoding", "chunked")])),
            None
        );
        assert_eq!(
            close_after(&headers(&[("connection", "keep-alive, close")])),
            Some(CloseReason::RemoteClosed)
        );
    }

    fn target(uri: &str) -> Result<Option<String>, ProxyError> {
        h1_target(&uri.parse().unwrap()).map(|t| t.map(|u| u.to_string()))
    }

    #[test]
    fn an_origin_form_target_goes_as_it_is_and_an_absolute_one_as_its_path() {
        assert_eq!(target("/v2/?n=1").unwrap(), None);
        assert_eq!(target("//x/y").unwrap(), None);
        assert_eq!(
            target("http://a:80/v2/?n=1").unwrap().as_deref(),
            Some("/v2/?n=1")
        );
        assert_eq!(target("HTTPS://a").unwrap().as_deref(), Some("/"));
        assert_eq!(target("http://a?q=1").unwrap().as_deref(), Some("/?q=1"));
        assert_eq!(target("*").unwrap().as_deref(), Some("*"));
    }

    #[test]
    fn an_absolute_target_with_only_a_fragment_after_the_host_goes_as_slash() {
        // `http::Uri` gives it an empty path that prints as an empty target (#16.2).
        assert_eq!(target("http://a#frag").unwrap().as_deref(), Some("/"));
        assert_eq!(target("http://a:8#0").unwrap().as_deref(), Some("/"));
    }

    #[test]
    fn a_target_that_names_no_resource_is_refused() {
        for uri in ["a.com:80", "h", "://b/c", "ftp://a/b"] {
            assert!(
                matches!(target(uri), Err(ProxyError::BadTarget(_))),
                "{uri}: {:?}",
                target(uri)
            );
        }
    }

    #[test]
    fn a_get_with_a_body_of_unknown_length_goes_chunked() {
        let body = http_body_util::StreamBody::new(futures_util::stream::empty::<
            Result<http_body::Frame<bytes::Bytes>, std::io::Error>,
        >());
        let mut req = Request::get("/").body(body).unwrap();
        h1_form(&mut req).unwrap();
        assert_eq!(req.headers()[header::TRANSFER_ENCODING], "chunked");

        // A known length (hyper writes Content-Length) or no body at all: no header.
        let sized = http_body_util::Full::new(bytes::Bytes::from_static(b"ab"));
        let mut req = Request::post("/").body(sized).unwrap();
        h1_form(&mut req).unwrap();
        assert!(!req.headers().contains_key(header::TRANSFER_ENCODING));
        let mut req = Request::get("/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        h1_form(&mut req).unwrap();
        assert!(!req.headers().contains_key(header::TRANSFER_ENCODING));
    }

    #[test]
    fn a_response_framed_twice_closes_its_socket_as_an_error_whatever_else_it_says() {
        let twice = [("transfer-encoding", "chunked"), ("content-length", "3")];
        assert_eq!(close_after(&headers(&twice)), Some(CloseReason::Error));
        let closing = [twice[0], twice[1], ("connection", "close")];
        assert_eq!(close_after(&headers(&closing)), Some(CloseReason::Error));
    }
}
