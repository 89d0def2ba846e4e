//! The hop-by-hop headers (RFC 9110 §7.6.1): which they are, the options a
//! `Connection` header lists, and their removal from a head before it goes to the
//! next hop, request or response. Read by `proxy` (requests) and `upstream`
//! (response heads, in the same pass that reads what they say about their socket).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers plus the proxy-only ones, never forwarded. A `static`, not a
/// `const`: each use of a `const` array builds it afresh and drops it after
/// (benches/instructions.sh: 150 instructions a response).
static HOP_BY_HOP: [HeaderName; 9] = [
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

/// The bits of [`bit`] for the hop-by-hop names whose values a head is read for
/// (`Transfer-Encoding` by the request's pass too, for its framing).
pub const CONNECTION: u16 = 1;
pub const KEEP_ALIVE: u16 = 1 << 1;
pub const TRANSFER_ENCODING: u16 = 1 << 5;
/// The bits of [`HOP_BY_HOP`]'s names; [`Present`] keeps only these.
const HOP_BITS: u16 = (1 << HOP_BY_HOP.len()) - 1;

/// Bits past the hop-by-hop ones, for the end-to-end names a pass over a head looks
/// for: [`bit`] finds them in the same `match`, where a `==` on each field's name
/// would cost a comparison per field (the head's pass in `proxy::checks` reads
/// `Host` and `Content-Length`, the response's in `upstream::response` reads
/// `Content-Length`, `Location` and `WWW-Authenticate`).
pub const CONTENT_LENGTH: u16 = 1 << 9;
pub const HOST: u16 = 1 << 10;
pub const LOCATION: u16 = 1 << 11;
pub const WWW_AUTHENTICATE: u16 = 1 << 12;

/// The bit of `name`'s place in [`HOP_BY_HOP`], or of one of the end-to-end names
/// above, or 0: a `match` on the name is a switch on its length and one comparison,
/// where `==` on each `HeaderName` (or on each one's `as_str`) costs a comparison
/// per entry, 3–4× the time in benches/headers.rs. The two lists are held together
/// by a test.
pub fn bit(name: &HeaderName) -> u16 {
    let i = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "proxy-authorization" => 7,
        "proxy-authenticate" => 8,
        "content-length" => return CONTENT_LENGTH,
        "host" => return HOST,
        "location" => return LOCATION,
        "www-authenticate" => return WWW_AUTHENTICATE,
        _ => return 0,
    };
    1 << i
}

/// The hop-by-hop headers a head has, found in one pass over its fields
/// ([`Present::note`] each), to be removed by [`Present::strip`] with no second pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct Present {
    bits: u16,
    /// A `Connection` header names fields other than the hop-by-hop ones.
    others: bool,
}

impl Present {
    /// The hop-by-hop headers of `headers`.
    pub fn of(headers: &HeaderMap) -> Present {
        let mut present = Present::default();
        for (name, value) in headers.iter() {
            present.note(name, value);
        }
        present
    }

    /// Notes one field; its [`bit`] (0 for an end-to-end field other than the few
    /// [`bit`] knows).
    pub fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> u16 {
        let bit = bit(name);
        // The Connection values are read as the pass meets them: no lookup of their own.
        if bit == CONNECTION && !self.others {
            self.others = names_others(value);
        }
        self.bits |= bit & HOP_BITS;
        bit
    }

    /// Whether the head has the hop-by-hop header of `bit` (never true for the
    /// end-to-end bits, which a pass gets from [`Present::note`] and this keeps none
    /// of).
    pub fn has(&self, bit: u16) -> bool {
        self.bits & bit != 0
    }

    /// Removes from `headers` (the head this was taken of) its hop-by-hop headers,
    /// including those the Connection header names.
    ///
    /// Allocates nothing in the usual case and looks up only what is there (most
    /// requests have no hop-by-hop header, most responses only `Connection`). A
    /// Connection that names other headers has its values cloned (a reference
    /// count) to read them while those are removed, and the names it lists are looked
    /// up as `&str`, never built; one that names only hop-by-hop headers
    /// (`keep-alive`, as nginx sends) is just removed.
    pub fn strip(self, headers: &mut HeaderMap) {
        if self.bits == 0 {
            return;
        }
        if self.others {
            let mut connection = headers.get_all(header::CONNECTION).iter();
            let first = connection.next().cloned();
            let more: Vec<HeaderValue> = connection.cloned().collect(); // empty: no allocation
            for value in first.iter().chain(&more) {
                for name in connection_options(value) {
                    let Ok(name) = std::str::from_utf8(name) else {
                        continue;
                    };
                    // A hop-by-hop name (`keep-alive`, mostly) goes below if it is there.
                    if !is_hop_by_hop(name.as_bytes()) {
                        headers.remove(name);
                    }
                }
            }
        }
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if self.bits & (1 << i) != 0 {
                headers.remove(name);
            }
        }
    }
}

/// Removes hop-by-hop headers, including those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    Present::of(headers).strip(headers);
}

/// The options a `Connection` value lists (RFC 9110 §7.6.1), as bytes, trimmed:
/// read by bytes, so a value with obs-text elsewhere in it still names its options.
pub fn connection_options(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
}

/// Whether a Connection value names anything but the hop-by-hop headers, which are
/// removed anyway: the usual `keep-alive` costs no clone of its value. (`close`
/// counts as a name: a field called that goes too, RFC 9110 §7.6.1.)
fn names_others(value: &HeaderValue) -> bool {
    connection_options(value).any(|name| !(name.is_empty() || is_hop_by_hop(name)))
}

/// Whether `name`, in any case, is one of [`HOP_BY_HOP`]: lowercased into a buffer
/// of the longest one's length and matched, as [`bit`] matches.
fn is_hop_by_hop(name: &[u8]) -> bool {
    let mut lower = [0u8; 19];
    let Some(lower) = lower.get_mut(..name.len()) else {
        return false;
    };
    for (l, b) in lower.iter_mut().zip(name) {
        *l = b.to_ascii_lowercase();
    }
    matches!(
        &*lower,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
            | b"proxy-authorization"
            | b"proxy-authenticate"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::head;

    /// The names left in `headers` once stripped, in order.
    fn stripped(mut headers: HeaderMap) -> Vec<String> {
        strip_hop_by_hop(&mut headers);
        headers
            .keys()
            .map(|name| name.as_str().to_owned())
            .collect()
    }

    /// `bit` names each of `HOP_BY_HOP` by its place, and nothing else;
    /// `is_hop_by_hop` knows each in any case, and nothing else either.
    #[test]
    fn each_hop_by_hop_name_has_the_bit_of_its_place() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(bit(name), 1 << i, "{name}");
            assert!(is_hop_by_hop(name.as_str().as_bytes()), "{name}");
            assert!(is_hop_by_hop(name.as_str().to_uppercase().as_bytes()));
        }
        for other in ["", "te2", "connectio", "x-proxy-authorization-1", "host"] {
            assert!(!is_hop_by_hop(other.as_bytes()), "{other}");
        }
        assert_eq!(bit(&header::CONNECTION), CONNECTION);
        let wanted = [
            (header::CONTENT_LENGTH, CONTENT_LENGTH),
            (header::HOST, HOST),
            (header::LOCATION, LOCATION),
            (header::WWW_AUTHENTICATE, WWW_AUTHENTICATE),
        ];
        for (name, wanted) in wanted {
            assert_eq!(bit(&name), wanted, "{name}");
            assert_eq!(wanted & HOP_BITS, 0, "{name}");
            // A pass notes it, and strips nothing for it.
            let mut present = Present::default();
            assert_eq!(present.note(&name, &HeaderValue::from_static("x")), wanted);
            assert_eq!(present.bits, 0, "{name}");
        }
        for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::DATE] {
            assert_eq!(bit(&name), 0, "{name}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let headers = head(&[
            ("connection", "keep-alive, X-Trace-Hop"),
            ("connection", " ,x-second ,, not a name;,"),
            ("keep-alive", "timeout=5"),
            ("x-trace-hop", "1"),
            ("x-second", "2"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("content-type", "text/plain"),
            ("x-kept", "3"),
        ]);
        let mut left = stripped(headers);
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);
    }

    /// The names a Connection header lists are matched in any case, hop-by-hop ones
    /// among them; a head with no hop-by-hop header at all is left as it was.
    #[test]
    fn connection_names_in_any_case_are_removed_and_a_clean_head_is_left_alone() {
        let headers = head(&[
            ("connection", "Upgrade, KEEP-ALIVE, X-Custom"),
            ("upgrade", "h2c"),
            ("keep-alive", "timeout=5"),
            ("x-custom", "1"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ]);
        assert_eq!(stripped(headers), ["accept"]);

        let mut clean = HeaderMap::new();
        clean.insert(header::HOST, HeaderValue::from_static("origin.test"));
        clean.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        clean.append(header::ACCEPT, HeaderValue::from_static("text/plain"));
        let before = clean.clone();
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean, before);
    }

    /// The usual Connection values name only what goes anyway (`keep-alive`) or a
    /// field nobody sends (`close`); the one still goes if it is there.
    #[test]
    fn keep_alive_and_close_remove_only_what_they_name() {
        let nginx = head(&[
            ("server", "nginx"),
            ("content-length", "2"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
        ]);
        assert_eq!(stripped(nginx), ["server", "content-length"]);

        let closing = head(&[
            ("connection", "Keep-Alive, close"),
            ("close", "x"),
            ("etag", "1"),
        ]);
        assert_eq!(stripped(closing), ["etag"]);
    }

    #[test]
    fn a_connection_value_with_obs_text_still_removes_the_headers_it_names() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-hop, caf\xc3\xa9").unwrap(),
        );
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("2"));
        assert_eq!(stripped(headers), ["x-kept"]);
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
