//! Origins (`host:port`, normalised: the pools' keys) and `[egress] allow` patterns:
//! parsing and matching, no I/O. The config's validation and the policy share it.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use http::uri::{Authority, Scheme, Uri};

/// A `host:port` an upstream socket connects to. Hosts are lower-cased; IPv6
/// literals keep their brackets so the value prints as an authority.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Origin {
    /// Parses `host:port` (the port is required), as written in the config or a
    /// CONNECT request.
    pub fn parse_authority(s: &str) -> Result<Origin, String> {
        let authority =
            Authority::from_str(s).map_err(|e| format!("not a host:port authority ({e})"))?;
        Self::from_authority(&authority, None)
    }

    /// The origin of an absolute-form request URI (`http://host[:port]/...`).
    pub fn from_uri(uri: &Uri) -> Result<Origin, String> {
        match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => {}
            Some(s) => {
                return Err(format!(
                    "scheme {s:?} is not supported (use CONNECT for https)"
                ))
            }
            None => return Err("expected an absolute URI (http://host/path)".into()),
        }
        let authority = uri.authority().ok_or("the URI has no host")?;
        Self::from_authority(authority, Some(80))
    }

    fn from_authority(authority: &Authority, default_port: Option<u16>) -> Result<Origin, String> {
        if authority.as_str().contains('@') {
            return Err("userinfo in the authority is not allowed".into());
        }
        let host = authority.host();
        if host.is_empty() {
            return Err("the host is empty".into());
        }
        // `Authority` accepts brackets anywhere and then reads the host up to the
        // first ':' and the port after the last one, so `a:[::1]` would become `a`
        // with the default port, and `e[::1]m` the host `e[`. Require exactly
        // host [":" port], where only a whole IPv6 literal is bracketed and the port
        // is digits (RFC 3986 §3.2.2, §3.2.3).
        if host.starts_with('[') {
            let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
            if literal.is_none_or(|ip| ip.parse::<Ipv6Addr>().is_err()) {
                return Err(format!("{host:?} is not an IPv6 address"));
            }
        } else if host.contains(['[', ']']) {
            return Err("brackets may only enclose an IPv6 address".into());
        }
        let rest = authority
            .as_str()
            .strip_prefix(host)
            .ok_or("not a host:port authority")?;
        let port = match rest.strip_prefix(':') {
            None if rest.is_empty() => default_port.ok_or("a port is required (host:port)")?,
            None => return Err(format!("{rest:?} after the host is not a port")),
            Some("") => return Err("the port is empty".into()),
            Some(p) => p
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| p.parse::<u16>().ok())
                .flatten()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p:?} is not valid"))?,
        };
        Ok(Origin {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host without IPv6 brackets, for DNS and TLS server names.
    pub fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The host as an IP address, when it is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.bare_host().parse().ok()
    }
}

/// An `[egress] allow` pattern: `host:port`, `*.suffix:port`, or any of them with
/// port `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// Matches any strict subdomain of the suffix (stored with its leading dot).
    Suffix(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let (host, port) = s.rsplit_once(':').ok_or("expected host:port or host:*")?;
        let port = match port {
            "*" => None,
            p => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or(format!("port {p:?} is not valid"))?,
            ),
        };
        let host = host.to_ascii_lowercase();
        let host = if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err("a wildcard must look like *.example.com".into());
            }
            HostPattern::Suffix(format!(".{suffix}"))
        } else if host.is_empty() || host.contains('*') {
            return Err("the host must be a name, an address or *.suffix".into());
        } else {
            HostPattern::Exact(host)
        };
        Ok(Pattern { host, port })
    }

    pub fn matches(&self, origin: &Origin) -> bool {
        self.port.is_none_or(|p| p == origin.port)
            && match &self.host {
                HostPattern::Exact(h) => *h == origin.host,
                HostPattern::Suffix(s) => origin.host.ends_with(s.as_str()),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_from_config_and_uris() {
        assert_eq!(
            Origin::parse_authority("Example.COM:8080")
                .unwrap()
                .to_string(),
            "example.com:8080"
        );
        assert_eq!(
            Origin::parse_authority("[::1]:443").unwrap().bare_host(),
            "::1"
        );
        assert!(
            Origin::parse_authority("example.com").is_err(),
            "port required"
        );
        assert!(Origin::parse_authority("example.com:0").is_err());
        assert!(Origin::parse_authority("example.com:99999").is_err());
        assert!(Origin::parse_authority("user:pw@example.com:80").is_err());
        let uri: Uri = "http://example.com/x".parse().unwrap();
        assert_eq!(Origin::from_uri(&uri).unwrap().port, 80);
        assert!(Origin::from_uri(&"https://example.com/".parse().unwrap()).is_err());
        assert!(Origin::from_uri(&"/relative".parse().unwrap()).is_err());
        assert!(Origin::from_uri(&"http://u:p@example.com/".parse().unwrap()).is_err());
    }

    #[test]
    fn authorities_http_accepts_but_rfc_3986_does_not_are_refused() {
        // Found by the `request_target` fuzz target: `http::Authority` takes these,
        // and its host()/port() would have read them as another origin.
        for uri in [
            "http://e[::ffff:127.0.0.1]m//",
            "http://allowed.example:[::1]/",
            "http://allowed.example:9999[::]/",
            "http://allowed.example:+80/",
            "http://[not-an-ip]/",
            "http://[::1]x/",
        ] {
            let uri: Uri = uri.parse().expect("http::Uri accepts it");
            assert!(Origin::from_uri(&uri).is_err(), "{uri}");
        }
        for authority in ["allowed.example:443[::]", "a:+443", "[zone%25eth0]:443"] {
            assert!(Origin::parse_authority(authority).is_err(), "{authority}");
        }
        let o = Origin::parse_authority("[::ffff:127.0.0.1]:8080").unwrap();
        assert_eq!(o.ip(), Some("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn patterns_match_exact_suffix_and_any_port() {
        let o = |s| Origin::parse_authority(s).unwrap();
        let p = Pattern::parse("*.example.com:443").unwrap();
        assert!(p.matches(&o("a.example.com:443")));
        assert!(
            !p.matches(&o("example.com:443")),
            "wildcard needs a subdomain"
        );
        assert!(!p.matches(&o("a.example.com:80")));
        assert!(!p.matches(&o("badexample.com:443")));
        assert!(Pattern::parse("host:*").unwrap().matches(&o("host:1")));
        assert!(Pattern::parse("host").is_err());
        assert!(Pattern::parse("*:80").is_err());
        assert!(Pattern::parse("a*b:80").is_err());
    }
}
