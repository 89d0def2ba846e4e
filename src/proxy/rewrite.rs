//! Response rewriting that keeps follow-up requests inside tether.
//!
//! A registry answers `401` with `WWW-Authenticate: Bearer realm="https://auth:32612/token",...`;
//! a client pointed at tether's route listener would fetch its token from the auth
//! server directly, ungoverned. When the realm (or a 3xx `Location`) names another
//! listed upstream, tether rewrites it to that upstream's route listener, at the host
//! the client used to reach tether. For forward-proxy clients an `https://` URL of a
//! TLS upstream becomes `http://`, so the follow-up is pooled (tether originates TLS).

use http::header::{self, HeaderMap, HeaderValue};
use http::Uri;

use crate::policy::Origin;
use crate::route::{self, Mode};
use crate::Table;

/// Rewrites `WWW-Authenticate` Bearer realms and `Location` in place. `handle`
/// calls it only for a response whose head had either, as the pass over the head
/// found (`Timing::links`), so a response with neither works nothing out here.
///
/// `client_host` gives the host the client addressed.
pub fn response_headers<'h>(
    table: &Table,
    mode: Mode,
    client_host: impl FnOnce() -> Option<&'h str>,
    headers: &mut HeaderMap,
) {
    let client_host = client_host().map(host_only);
    let rewrite = |url: &str| rewrite_url(table, mode, client_host, url);
    if let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
        if let Some(new) = rewrite(location).and_then(|u| HeaderValue::from_str(&u).ok()) {
            headers.insert(header::LOCATION, new);
        }
    }
    if headers.contains_key(header::WWW_AUTHENTICATE) {
        let values: Vec<HeaderValue> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| rewrite_realm(s, rewrite))
                    .and_then(|s| HeaderValue::from_str(&s).ok())
                    .unwrap_or_else(|| v.clone())
            })
            .collect();
        headers.remove(header::WWW_AUTHENTICATE);
        for v in values {
            headers.append(header::WWW_AUTHENTICATE, v);
        }
    }
}

/// The host part of a `Host` header value (IPv6 brackets kept).
fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    }
}

/// The URL a client should use instead of `url`, if it points at a listed upstream.
fn rewrite_url(table: &Table, mode: Mode, client_host: Option<&str>, url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = uri.authority()?;
    let origin = Origin {
        host: authority.host().to_ascii_lowercase(),
        port: authority.port_u16().unwrap_or(default_port),
    };
    let target = route::listed(table, &origin)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    match mode {
        Mode::Route(_) => {
            let listen = table.route_addrs.iter().find(|(u, _)| *u == target)?.1;
            let host = match client_host {
                Some(h) => h.to_string(),
                None if listen.ip().is_unspecified() => "127.0.0.1".to_string(),
                None => match listen.ip() {
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                },
            };
            Some(format!("http://{host}:{}{path}", listen.port()))
        }
        // An https URL without a port meant 443; the origin keeps it explicit.
        Mode::Forward if scheme == "https" && table.listed[target].tls => {
            Some(format!("http://{origin}{path}"))
        }
        Mode::Forward => None,
        // Intercepted clients reach every origin directly, and their follow-ups are
        // intercepted by the same rules: nothing to point elsewhere.
        Mode::Intercept(_) => None,
    }
}

/// Rewrites the `realm` parameter of a `Bearer` challenge, keeping every other
/// parameter byte for byte. `None` when there is nothing to change.
pub fn rewrite_realm(challenge: &str, rewrite: impl Fn(&str) -> Option<String>) -> Option<String> {
    let (scheme, params) = challenge.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let (start, end, value) = find_param(params, "realm")?;
    let new = rewrite(&value)?;
    let offset = challenge.len() - params.len();
    Some(format!(
        "{}{}{}",
        &challenge[..offset + start],
        quote(&new),
        &challenge[offset + end..]
    ))
}

/// Finds `name=value` among comma-separated auth-params: the byte span of the value
/// (quotes included) and its unquoted text.
fn find_param(params: &str, name: &str) -> Option<(usize, usize, String)> {
    let bytes = params.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && (bytes[i] == b',' || bytes[i] == b' ' || bytes[i] == b'\t') {
            i += 1;
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && bytes[i] != b',' {
            i += 1;
        }
        let key = params[key_start..i].trim();
        if i >= bytes.len() || bytes[i] != b'=' {
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let value_start = i;
        let mut value = String::new();
        if bytes.get(i) == Some(&b'"') {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i] as char);
                i += 1;
            }
            i = (i + 1).min(bytes.len());
        } else {
            while i < bytes.len() && bytes[i] != b',' {
                i += 1;
            }
            value = params[value_start..i].trim().to_string();
        }
        if key.eq_ignore_ascii_case(name) {
            return Some((value_start, i, value));
        }
    }
    None
}

/// A quoted-string per RFC 9110 §5.6.4.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realm_is_rewritten_and_other_params_kept() {
        let challenge = r#"Bearer realm="https://auth:32612/token",service="registry",scope="repository:lib/x:pull""#;
        let out = rewrite_realm(challenge, |u| {
            assert_eq!(u, "https://auth:32612/token");
            Some("http://10.0.0.5:32612/token".into())
        })
        .unwrap();
        assert_eq!(
            out,
            r#"Bearer realm="http://10.0.0.5:32612/token",service="registry",scope="repository:lib/x:pull""#
        );
    }

    #[test]
    fn realm_in_any_position_and_with_escapes() {
        let challenge =
            r#"Bearer service="a,b", error="insufficient_scope", realm="https://a/t?x=\"1\"""#;
        let out = rewrite_realm(challenge, |u| {
            assert_eq!(u, r#"https://a/t?x="1""#);
            Some("http://b/t".into())
        })
        .unwrap();
        assert_eq!(
            out,
            r#"Bearer service="a,b", error="insufficient_scope", realm="http://b/t""#
        );
    }

    #[test]
    fn non_bearer_and_unmatched_challenges_are_left_alone() {
        assert_eq!(
            rewrite_realm(r#"Basic realm="x""#, |_| Some("y".into())),
            None
        );
        assert_eq!(rewrite_realm(r#"Bearer realm="x""#, |_| None), None);
        assert_eq!(rewrite_realm("Bearer", |_| Some("y".into())), None);
        assert_eq!(
            rewrite_realm(r#"Bearer realm="unterminated"#, |_| None),
            None
        );
    }

    #[test]
    fn host_only_strips_ports() {
        assert_eq!(host_only("10.0.0.5:32402"), "10.0.0.5");
        assert_eq!(host_only("[::1]:80"), "[::1]");
        assert_eq!(host_only("name"), "name");
    }
}
