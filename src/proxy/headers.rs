//! The head as the next hop gets it: no hop-by-hop headers (RFC 9110 §7.6.1), `Host`
//! naming the upstream, `Via` added, on requests and responses alike.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;
use hyper::body::Incoming;

use super::checks::check_framing;
use crate::error::ProxyError;
use crate::upstream::Upstream;

pub(super) const VIA: HeaderValue = HeaderValue::from_static("1.1 tether");

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

/// Turns the client's request headers into the ones the upstream gets: `Host`
/// naming the upstream (or the client's own, with `keep_host`, when it has one), no
/// hop-by-hop headers, `Via` added. The target's form is the upstream's to choose,
/// per connection (see [`Upstream::send`]).
pub(super) fn prepare_request(
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
