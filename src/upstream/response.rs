//! What a response head says about its socket: close it after this exchange (it
//! asked to, or its framing was ambiguous), or keep it for the advertised
//! `Keep-Alive` parameters.

use http::header::HeaderValue;

use super::CloseReason;
use crate::hop_by_hop::{self as hop, connection_options, Present};

/// What a response head says about its socket, and which of its headers are
/// hop-by-hop, read in one pass over its fields: the lookups of the headers it lacks
/// (most have neither `Transfer-Encoding` nor `Keep-Alive`) cost nothing.
pub(super) struct HeadNotes {
    /// Why the socket closes after this exchange, if it does ([`close_after`]).
    pub close: Option<CloseReason>,
    /// The advertised `Keep-Alive` parameters ([`keep_alive_params`]).
    pub keep_alive: Option<(Option<std::time::Duration>, Option<u64>)>,
    /// The hop-by-hop headers to remove before the head goes to the client.
    pub hop_by_hop: Present,
    /// It has `Location` or `WWW-Authenticate`, URLs `proxy::rewrite` may point
    /// back at tether.
    pub links: bool,
}

impl HeadNotes {
    pub(super) fn of(headers: &http::HeaderMap) -> HeadNotes {
        let (mut length, mut asks_close, mut links) = (false, false, false);
        let mut hop_by_hop = Present::default();
        let mut keep_alive = None;
        // The names wanted are found by their bits, hop-by-hop and end-to-end alike,
        // and the values wanted read as the pass meets them, with no lookup of their
        // own.
        for (name, value) in headers.iter() {
            match hop_by_hop.note(name, value) {
                0 => {}
                hop::CONTENT_LENGTH => length = true,
                hop::CONNECTION => asks_close = asks_close || wants_close(value),
                hop::KEEP_ALIVE if keep_alive.is_none() => keep_alive = Some(value),
                hop::LOCATION | hop::WWW_AUTHENTICATE => links = true,
                _ => {}
            }
        }
        let coded = hop_by_hop.has(hop::TRANSFER_ENCODING);
        let close = if coded && length {
            Some(CloseReason::Error)
        } else if asks_close {
            Some(CloseReason::RemoteClosed)
        } else {
            None
        };
        HeadNotes {
            close,
            keep_alive: keep_alive.and_then(keep_alive_params),
            hop_by_hop,
            links,
        }
    }
}

/// `Keep-Alive: timeout=N, max=M` (RFC 2068 §19.7.1, still what servers send).
fn keep_alive_params(value: &HeaderValue) -> Option<(Option<std::time::Duration>, Option<u64>)> {
    let value = value.to_str().ok()?;
    let mut timeout = None;
    let mut max = None;
    for param in value.split(',') {
        let Some((name, v)) = param.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"');
        // Compared in any case, not lowercased: no allocation per parameter.
        let name = name.trim();
        if name.eq_ignore_ascii_case("timeout") {
            timeout = v.parse::<u64>().ok().map(std::time::Duration::from_secs);
        } else if name.eq_ignore_ascii_case("max") {
            max = v.parse::<u64>().ok();
        }
    }
    (timeout.is_some() || max.is_some()).then_some((timeout, max))
}

/// Why the connection must close once this response's body has been read, if it
/// must: the upstream said so, or it framed the response with both
/// `Transfer-Encoding` and `Content-Length`. hyper's client lets the first win and
/// would keep the connection, but two framings are how responses are split (RFC 9112
/// §6.3), and which one the upstream meant cannot be known, so its next bytes are
/// not trusted to start a response (hyper reads the body by the coding and leaves
/// the length in the map). Counted as `error`: the upstream broke HTTP's rules, the
/// way a malformed head that hyper rejects is counted; `Error` is the answer exactly
/// when the response is framed twice.
pub(super) fn close_after(headers: &http::HeaderMap) -> Option<CloseReason> {
    HeadNotes::of(headers).close
}

/// Whether a `Connection` value lists `close`.
fn wants_close(value: &HeaderValue) -> bool {
    connection_options(value).any(|t| t.eq_ignore_ascii_case(b"close"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::head as headers;

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

    #[test]
    fn keep_alive_parameters_are_read_alongside_the_close_reason() {
        let kept = HeadNotes::of(&headers(&[
            ("content-length", "2"),
            ("keep-alive", "timeout=5, max=100"),
            ("connection", "keep-alive"),
        ]));
        assert_eq!(kept.close, None);
        let five = std::time::Duration::from_secs(5);
        assert_eq!(kept.keep_alive, Some((Some(five), Some(100))));
        let closing = HeadNotes::of(&headers(&[
            ("connection", "close"),
            ("keep-alive", "max=1"),
        ]));
        assert_eq!(closing.close, Some(CloseReason::RemoteClosed));
        assert_eq!(closing.keep_alive, Some((None, Some(1))));
        let plain = HeadNotes::of(&headers(&[
            ("content-length", "2"),
            ("connection", "keep-alive"),
        ]));
        assert_eq!((plain.close, plain.keep_alive), (None, None));
    }

    #[test]
    fn a_response_framed_twice_closes_its_socket_as_an_error_whatever_else_it_says() {
        let twice = [("transfer-encoding", "chunked"), ("content-length", "3")];
        assert_eq!(close_after(&headers(&twice)), Some(CloseReason::Error));
        let closing = [twice[0], twice[1], ("connection", "close")];
        assert_eq!(close_after(&headers(&closing)), Some(CloseReason::Error));
    }

    /// The pass that reads a head's socket notes also finds its hop-by-hop headers,
    /// those its Connection header names included, and removes exactly those.
    #[test]
    fn the_same_pass_finds_the_hop_by_hop_headers_to_remove() {
        let mut head = headers(&[
            ("content-length", "2"),
            ("connection", "keep-alive, x-trace"),
            ("keep-alive", "timeout=5"),
            ("x-trace", "1"),
            ("upgrade", "h2c"),
            ("etag", "\"1\""),
        ]);
        let notes = HeadNotes::of(&head);
        assert_eq!(notes.close, None);
        let five = std::time::Duration::from_secs(5);
        assert_eq!(notes.keep_alive, Some((Some(five), None)));
        notes.hop_by_hop.strip(&mut head);
        let mut left: Vec<&str> = head.keys().map(|n| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "etag"]);
        assert!(!notes.links);
    }

    /// The same pass tells the caller whether the head carries a URL it may rewrite.
    #[test]
    fn the_same_pass_finds_a_location_or_a_challenge() {
        for (name, value) in [
            ("location", "http://auth:8080/"),
            ("www-authenticate", "Bearer realm=\"http://auth/token\""),
        ] {
            let notes = HeadNotes::of(&headers(&[("content-length", "0"), (name, value)]));
            assert!(notes.links, "{name}");
            // Neither is hop-by-hop: both reach the client.
            let mut head = headers(&[(name, value)]);
            notes.hop_by_hop.strip(&mut head);
            assert!(head.contains_key(name), "{name}");
        }
        assert!(!HeadNotes::of(&headers(&[("content-location", "/x")])).links);
    }
}
