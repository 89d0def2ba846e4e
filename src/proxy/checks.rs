//! What tether refuses before it picks an upstream: a missing or doubled `Host`, a
//! request-target in the wrong form for the listener, and framing it could not
//! forward faithfully. hyper has already refused what HTTP/1.1 itself forbids; these
//! are the rules a proxy adds, re-framing the request for another hop.

use http::header::{self, HeaderMap};
use http::uri::Authority;
use http::{Method, Uri, Version};

use crate::error::ProxyError;
use crate::hop_by_hop::{self as hop, Present};
use crate::route::Mode;

/// What tether reads of a request head before it forwards it, in one pass over its
/// fields: its `Host` fields, whether it is framed by a length or a coding, and its
/// hop-by-hop headers. The lookups of what a head lacks (most have no
/// `Content-Length`, `Transfer-Encoding` or hop-by-hop field) cost nothing.
#[derive(Debug, Clone, Copy)]
pub(super) struct RequestNotes {
    /// How many `Host` fields, counted to 2.
    hosts: u8,
    /// Whether the first `Host` is `host[:port]` ([`is_host_and_port`]).
    host_ok: bool,
    /// Whether it has `Content-Length` or `Transfer-Encoding` ([`check_framing`]).
    framed: bool,
    /// The hop-by-hop headers to remove before it goes upstream.
    pub(super) hop_by_hop: Present,
}

impl RequestNotes {
    pub(super) fn of(headers: &HeaderMap) -> RequestNotes {
        let mut notes = RequestNotes {
            hosts: 0,
            host_ok: false,
            framed: false,
            hop_by_hop: Present::default(),
        };
        for (name, value) in headers.iter() {
            match notes.hop_by_hop.note(name, value) {
                0 => {}
                hop::HOST => {
                    if notes.hosts == 0 {
                        notes.host_ok = is_host_and_port(value.as_bytes());
                    }
                    notes.hosts = (notes.hosts + 1).min(2);
                }
                hop::CONTENT_LENGTH | hop::TRANSFER_ENCODING => notes.framed = true,
                _ => {}
            }
        }
        notes
    }

    /// Whether [`check_framing`] has anything to look at.
    pub(super) fn framed(&self) -> bool {
        self.framed
    }
}

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without `Host`,
/// and to any request with more than one or with one that is not `host[:port]`
/// (empty is allowed). Filling in or choosing a Host would let tether and the next
/// hop disagree about which site a request is for. `notes` are the request's.
pub(super) fn check_host(version: Version, notes: &RequestNotes) -> Result<(), ProxyError> {
    match notes.hosts {
        0 if version == Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        )),
        0 => Ok(()),
        1 if notes.host_ok => Ok(()),
        1 => Err(ProxyError::BadRequest("the Host header is not host[:port]")),
        _ => Err(ProxyError::BadRequest("more than one Host header")),
    }
}

/// `uri-host [ ":" port ]` (RFC 9112 §3.2), where an empty reg-name is a host. An
/// authority with userinfo is not.
fn is_host_and_port(value: &[u8]) -> bool {
    if value.is_empty() || is_plain_host_and_port(value) {
        return true;
    }
    match Authority::try_from(value) {
        Ok(a) => {
            !a.as_str().contains('@') && (a.host().len() == a.as_str().len() || a.port().is_some())
        }
        Err(_) => false,
    }
}

/// The usual Host, decided without parsing it as an authority (a tenth of the cost):
/// a name or IPv4 address of letters, digits, dots and hyphens, and a port of at most
/// five digits up to 65535. Anything else (IPv6 brackets, other characters) is left
/// to [`Authority`], which takes every value this does.
fn is_plain_host_and_port(value: &[u8]) -> bool {
    let (host, port) = match value.iter().position(|&b| b == b':') {
        Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
        None => (value, None),
    };
    let name = |b: &u8| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-';
    !host.is_empty()
        && host.iter().all(name)
        && port.is_none_or(|port| {
            (1..=5).contains(&port.len())
                && port.iter().all(u8::is_ascii_digit)
                && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
        })
}

/// The request-target forms a listener takes (RFC 9112 §3.2). The forward proxy
/// takes absolute-form. A route or intercepted connection stands in for the origin:
/// origin-form, absolute-form (which a server MUST accept, §3.2.2; the route, not
/// the target's authority, picks the upstream, as it does for Host), and the
/// asterisk-form for OPTIONS only (§3.2.4). The authority-form is CONNECT's alone
/// (§3.2.3), and CONNECT never comes here.
pub(super) fn check_target(method: &Method, uri: &Uri, mode: Mode) -> Result<(), ProxyError> {
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
///
/// A head with neither `Content-Length` nor `Transfer-Encoding` passes; tether calls
/// this only for one that has either ([`RequestNotes::framed`]), which most requests
/// (GETs) do not.
pub fn check_framing(headers: &HeaderMap) -> Result<(), ProxyError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn notes(fields: &[(&'static str, &'static str)]) -> RequestNotes {
        RequestNotes::of(&crate::testkit::head(fields))
    }

    /// The one pass finds what the checks need wherever in the head it is.
    #[test]
    fn one_pass_over_the_head_reads_its_host_framing_and_hop_by_hop_fields() {
        let v11 = Version::HTTP_11;
        let usual = notes(&[("user-agent", "x"), ("host", "registry:5000")]);
        assert!(check_host(v11, &usual).is_ok());
        assert!(!usual.framed());
        assert!(!usual.hop_by_hop.has(hop::CONNECTION));

        assert!(check_host(v11, &notes(&[("accept", "*/*")])).is_err());
        assert!(check_host(Version::HTTP_10, &notes(&[("accept", "*/*")])).is_ok());
        let two = notes(&[("host", "a"), ("accept", "*/*"), ("host", "a")]);
        assert!(matches!(
            check_host(v11, &two),
            Err(ProxyError::BadRequest("more than one Host header"))
        ));
        // The first Host is the one judged; a bad second one is still a second one.
        let bad_second = notes(&[("host", "a"), ("host", "a b")]);
        assert!(matches!(
            check_host(v11, &bad_second),
            Err(ProxyError::BadRequest("more than one Host header"))
        ));
        let bad = notes(&[("host", "user@a")]);
        assert!(matches!(
            check_host(v11, &bad),
            Err(ProxyError::BadRequest("the Host header is not host[:port]"))
        ));

        let length = notes(&[("host", "a"), ("content-length", "3")]);
        assert!(length.framed());
        let coded = notes(&[("transfer-encoding", "chunked"), ("host", "a")]);
        assert!(coded.framed() && coded.hop_by_hop.has(hop::TRANSFER_ENCODING));
        let closing = notes(&[("host", "a"), ("connection", "close")]);
        assert!(closing.hop_by_hop.has(hop::CONNECTION) && !closing.framed());
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

    /// The shortcut never takes a Host that `Authority` (the full check) refuses, and
    /// takes the usual ones without it.
    #[test]
    fn the_plain_host_shortcut_agrees_with_the_authority_parser() {
        let slow = |v: &str| {
            Authority::try_from(v).is_ok_and(|a| {
                !a.as_str().contains('@')
                    && (a.host().len() == a.as_str().len() || a.port().is_some())
            })
        };
        let mut values: Vec<String> = [
            "example.com",
            "example.com:8080",
            "10.0.0.5:32402",
            "a",
            "a-b.c",
            "-",
            ".",
            "a:0",
            "a:65535",
            "a:65536",
            "a:99999",
            "a:123456",
            "a:",
            ":80",
            "a::1",
            "a:1:2",
            "a:+1",
            "a:-1",
            "A.B",
            "a_b",
            "a b",
            "a@b",
            "[::1]:80",
            "é",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every one- and two-byte value over the bytes that matter here.
        let bytes = b"a0.-:_@[]% \x7f";
        for &x in bytes {
            values.push((x as char).to_string());
            for &y in bytes {
                values.push(format!("{}{}", x as char, y as char));
            }
        }
        for v in &values {
            if is_plain_host_and_port(v.as_bytes()) {
                assert!(
                    slow(v),
                    "{v:?} is taken by the shortcut but refused by Authority"
                );
            }
        }
        for usual in ["registry.example.com", "127.0.0.1:5000", "auth-server:8443"] {
            assert!(is_plain_host_and_port(usual.as_bytes()), "{usual:?}");
        }
    }
}
