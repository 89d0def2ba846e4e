//! The request path, in the order a request travels: classify the request (forward,
//! CONNECT, route), look the origin up in the egress policy, rewrite the head for the
//! upstream (origin-form, Host, hop-by-hop headers, Via), send it through the
//! upstream's governed pool, and rewrite the response head for the client.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::listener::{ClientConn, TunnelJob};
use crate::policy::{Decision, Origin};
use crate::rewrite;
use crate::upstream::Upstream;
use crate::{Shared, Table};

pub use crate::route::Mode;

const VIA: HeaderValue = HeaderValue::from_static("1.1 tether");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy-only ones, never forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

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
        Ok(()) if method == Method::CONNECT => connect(req, &shared, mode, client.clone()).await,
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

type Handled = (Response<ProxyBody>, Option<Arc<str>>);

async fn forward(
    mut req: Request<Incoming>,
    shared: &Shared,
    mode: Mode,
) -> Result<Handled, ProxyError> {
    check_target(req.method(), req.uri(), mode)?;
    let table = shared.table();
    let upstream = match mode {
        Mode::Route(route) => table
            .route_upstream(route)
            .ok_or(ProxyError::ShuttingDown)?,
        Mode::Forward => {
            let origin = Origin::from_uri(req.uri()).map_err(ProxyError::BadTarget)?;
            lookup(shared, &table, &origin)?
        }
        Mode::Intercept(destination) => {
            crate::transparent::upstream_for(shared, &table, destination).await?
        }
    };
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

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without `Host`,
/// and to any request with more than one or with one that is not `host[:port]`
/// (empty is allowed). Filling in or choosing a Host would let tether and the next
/// hop disagree about which site a request is for.
fn check_host(req: &Request<Incoming>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        )),
        (None, _) => Ok(()),
        (Some(_), Some(_)) => Err(ProxyError::BadRequest("more than one Host header")),
        (Some(host), None) if is_host_and_port(host.as_bytes()) => Ok(()),
        (Some(_), None) => Err(ProxyError::BadRequest("the Host header is not host[:port]")),
    }
}

/// `uri-host [ ":" port ]` (RFC 9112 §3.2), where an empty reg-name is a host. An
/// authority with userinfo is not.
fn is_host_and_port(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    match Authority::try_from(value) {
        Ok(a) => {
            !a.as_str().contains('@') && (a.host().len() == a.as_str().len() || a.port().is_some())
        }
        Err(_) => false,
    }
}

/// The request-target forms a listener takes (RFC 9112 §3.2). The forward proxy
/// takes absolute-form. A route or intercepted connection stands in for the origin:
/// origin-form, absolute-form (which a server MUST accept, §3.2.2; the route, not
/// the target's authority, picks the upstream, as it does for Host), and the
/// asterisk-form for OPTIONS only (§3.2.4). The authority-form is CONNECT's alone
/// (§3.2.3), and CONNECT never comes here.
fn check_target(method: &Method, uri: &Uri, mode: Mode) -> Result<(), ProxyError> {
    let bad = |why: &str| Err(ProxyError::BadTarget(why.into()));
    let asterisk = uri.scheme().is_none() && uri.authority().is_none() && uri.path() == "*";
    match mode {
        Mode::Forward if uri.scheme().is_some() => Ok(()),
        _ if uri.scheme().is_none() && uri.authority().is_some() => {
            bad("an authority-form target (host:port) is only for CONNECT")
        }
        Mode::Forward if asterisk => bad("the forward proxy is no origin: OPTIONS * needs a route listener"),
        Mode::Forward => bad("an origin-form request reached the forward proxy; send absolute-form (HTTP_PROXY) or use a route listener"),
        _ if asterisk && method != Method::OPTIONS => bad("the asterisk-form target * is only for OPTIONS"),
        _ => Ok(()),
    }
}

/// The upstream for an origin, by the egress policy.
fn lookup(shared: &Shared, table: &Table, origin: &Origin) -> Result<Arc<Upstream>, ProxyError> {
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

/// Turns the client's request headers into the ones the upstream gets: `Host`
/// naming the upstream (or the client's own, with `keep_host`, when it has one), no
/// hop-by-hop headers, `Via` added. The target's form is the upstream's to choose,
/// per connection (see [`Upstream::send`]).
fn prepare_request(
    req: &mut Request<Incoming>,
    upstream: &Upstream,
    keep_host: bool,
) -> Result<(), ProxyError> {
    check_framing(req.headers())?;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    if !(keep_host && headers.contains_key(header::HOST)) {
        headers.insert(header::HOST, upstream.host_header()?);
    }
    headers.append(header::VIA, VIA);
    Ok(())
}

/// Refuses framing tether cannot forward faithfully. hyper has already refused what
/// leaves a body's length unknown (RFC 9112 §6.3: differing lengths, a final coding
/// other than chunked) and, for a request framed by both `Content-Length` and
/// `Transfer-Encoding`, let the coding win, dropped the length and marked the client
/// connection to close after the response; tether re-frames the body upstream.
///
/// Left to tether is what re-framing would lose. hyper decodes one chunked layer and
/// reads only the last `Transfer-Encoding` line, and tether drops the header (it is
/// hop-by-hop): a coding before chunked (`gzip, chunked`, or `gzip` on a line of its
/// own) would reach the upstream undeclared, and HTTP/2 upstreams have no transfer
/// codings at all. RFC 9112 §6.1: a coding the server does not understand SHOULD get
/// 501. Chunked twice is a malformed message (a sender MUST NOT, §7): 400.
fn check_framing(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if lengths.any(|other| other != first) {
            return Err(ProxyError::BadRequest("conflicting Content-Length headers"));
        }
    }
    let mut chunked = 0;
    let mut other = false;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        // Not text: no coding tether knows (hyper refuses it before this anyway).
        let list = value.to_str().unwrap_or("?");
        // Empty list elements are ignored (RFC 9110 §5.6.1).
        for coding in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else {
                other = true;
            }
        }
    }
    if chunked > 1 {
        return Err(ProxyError::BadRequest("chunked is applied more than once"));
    }
    if other {
        return Err(ProxyError::UnsupportedCoding);
    }
    Ok(())
}

/// Removes hop-by-hop headers, including those the Connection header names.
///
/// Runs on every request and response, so it allocates nothing in the usual case:
/// the Connection values are cloned (a reference count) to read them while other
/// headers are removed, and names are looked up as `&str`, never built.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut connection = headers.get_all(header::CONNECTION).iter();
    let first = connection.next().cloned();
    let more: Vec<HeaderValue> = connection.cloned().collect(); // empty: no allocation
    for value in first.iter().chain(&more) {
        for name in value.to_str().unwrap_or("").split(',') {
            headers.remove(name.trim());
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// `CONNECT host:port`: a governed byte tunnel to an allowed origin.
async fn connect(
    req: Request<Incoming>,
    shared: &Shared,
    mode: Mode,
    client: Arc<ClientConn>,
) -> Result<Handled, ProxyError> {
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
    let upstream = lookup(shared, &shared.table(), &origin)?;
    let upstream_io = upstream.open_tunnel().await?;
    // The client connection stays "active" for the tunnel's lifetime; the listener
    // runs the tunnel once hyper has written the 200 and handed the socket back.
    client.start_tunnel(TunnelJob {
        tunnels: upstream.tunnels.clone(),
        upstream: upstream_io,
        busy: client.begin_request(),
    });
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::OK;
    Ok((response, Some(upstream.name.clone())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Trace-Hop"),
            ("connection", " ,x-second ,, not a name;,"),
            ("keep-alive", "timeout=5"),
            ("x-trace-hop", "1"),
            ("x-second", "2"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("content-type", "text/plain"),
            ("x-kept", "3"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);
    }

    #[test]
    fn a_host_header_is_a_host_with_an_optional_port() {
        for ok in [
            "example.com",
            "example.com:8080",
            "10.0.0.5:32402",
            "[::1]",
            "[::1]:80",
            "",
        ] {
            assert!(is_host_and_port(ok.as_bytes()), "{ok:?} is a Host");
        }
        for bad in [
            "user@example.com",
            "a b",
            "example.com:port",
            "example.com:99999",
            "[::1",
            "a/b",
            "a?b",
        ] {
            assert!(!is_host_and_port(bad.as_bytes()), "{bad:?} is no Host");
        }
    }

    #[test]
    fn a_connection_value_that_is_not_text_removes_only_itself() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-kept\xff").unwrap(),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
