//! Operator actions on the admin listener, and the effective configuration.
//!
//! - `POST /admin/fail-readiness`: `/readyz` answers 503 from now on (Envoy's
//!   `/healthcheck/fail`), so a load balancer stops sending new clients while
//!   tether keeps serving the ones it has. `POST /admin/restore-readiness` undoes it
//!   (refused with 409 once draining).
//! - `POST /admin/drain`: the graceful shutdown SIGTERM starts: not ready, stop
//!   accepting, finish in-flight requests within `drain_timeout`, exit 0.
//!
//! These change state, so they take POST only (405 with `Allow: POST` otherwise)
//! and only from a loopback peer (403 otherwise): the admin listener has no
//! authentication and may be bound to a pod address for scraping.
//!
//! - `GET /debug/config`: the configuration in force (after the file, the
//!   environment and the last reload; restart-only keys at their running value) as
//!   JSON, with every value whose key names a secret redacted.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use crate::Shared;

/// What replaces a secret in `/debug/config`.
pub const REDACTED: &str = "[redacted]";

/// The response for the paths this module serves; `None` for any other path.
pub fn route<B>(
    req: &Request<B>,
    shared: &Shared,
    peer: SocketAddr,
) -> Option<Response<Full<Bytes>>> {
    let path = req.uri().path();
    if path == "/debug/config" {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Some(allow_only("GET, HEAD"));
        }
        return Some(json(&effective_config(shared)));
    }
    let action = match path {
        "/admin/fail-readiness" => Action::FailReadiness,
        "/admin/restore-readiness" => Action::RestoreReadiness,
        "/admin/drain" => Action::Drain,
        _ => return None,
    };
    Some(refusal(req.method(), peer).unwrap_or_else(|| act(action, shared, peer)))
}

#[derive(Debug, Clone, Copy)]
enum Action {
    FailReadiness,
    RestoreReadiness,
    Drain,
}

/// The refusal, unless this is a POST from a loopback peer (an IPv4-mapped
/// loopback address counts).
fn refusal(method: &Method, peer: SocketAddr) -> Option<Response<Full<Bytes>>> {
    if method != Method::POST {
        return Some(allow_only("POST"));
    }
    if !peer.ip().to_canonical().is_loopback() {
        return Some(text(
            StatusCode::FORBIDDEN,
            "admin actions are only taken from a loopback peer\n",
        ));
    }
    None
}

fn act(action: Action, shared: &Shared, peer: SocketAddr) -> Response<Full<Bytes>> {
    match action {
        Action::FailReadiness => {
            shared.set_ready(false);
            tracing::warn!(%peer, "readiness failed on the admin listener: /readyz answers 503");
            text(StatusCode::OK, "readiness failed: /readyz answers 503\n")
        }
        Action::RestoreReadiness if shared.is_draining() => text(
            StatusCode::CONFLICT,
            "draining: readiness cannot be restored\n",
        ),
        Action::RestoreReadiness => {
            shared.set_ready(true);
            tracing::info!(%peer, "readiness restored on the admin listener");
            text(StatusCode::OK, "ready\n")
        }
        Action::Drain => {
            tracing::warn!(%peer, "drain requested on the admin listener");
            shared.request_drain();
            text(StatusCode::ACCEPTED, "draining\n")
        }
    }
}

fn allow_only(methods: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(methods));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(value: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).expect("json");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The configuration in force, redacted.
pub fn effective_config(shared: &Shared) -> Value {
    let mut value = serde_json::to_value(&*shared.table().config).expect("config serializes");
    redact(&mut value);
    value
}

/// Whether a key's value is a secret: a credential by its name. (No key of today's
/// schema is one; this is for keys other branches add, e.g. a cluster token.)
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    const WORDS: [&str; 7] = [
        "password",
        "passwd",
        "secret",
        "token",
        "credential",
        "authorization",
        "cookie",
    ];
    WORDS.iter().any(|w| key.contains(w))
        || key == "key"
        || key.ends_with("_key")
        || key == "auth"
        || key.starts_with("auth_")
}

/// Replaces secrets in `value`: every value under a secret key, and the userinfo
/// of any `scheme://user:pass@host` string.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if is_secret_key(k) && !v.is_null() {
                    *v = Value::String(REDACTED.into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(s) => {
            if let Some(clean) = without_userinfo(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

fn without_userinfo(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(format!("{scheme}://{REDACTED}@{}", &rest[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_need_post_from_a_loopback_peer() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        assert!(refusal(&Method::POST, local).is_none());
        assert!(refusal(&Method::POST, mapped).is_none());
        assert!(refusal(&Method::POST, "[::1]:1".parse().unwrap()).is_none());
        let refused = refusal(&Method::POST, remote).unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let get = refusal(&Method::GET, local).unwrap();
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get.headers()[header::ALLOW], "POST");
    }

    #[test]
    fn secrets_are_redacted_by_key_name_and_userinfo() {
        let mut v = serde_json::json!({
            "cluster": {"token": "s3cr3t", "peers": ["a:1"], "shared_key": "k"},
            "upstream": [{"name": "a", "password": "p", "auth_header": "Bearer x",
                          "proxy": "http://user:pw@host:8080/x", "max_connections": 3}],
            "unset": {"secret": null}
        });
        redact(&mut v);
        let text = v.to_string();
        for secret in ["s3cr3t", "\"k\"", "\"p\"", "Bearer", "user:pw"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(v["upstream"][0]["max_connections"], 3);
        assert_eq!(v["upstream"][0]["proxy"], "http://[redacted]@host:8080/x");
        assert_eq!(v["cluster"]["peers"][0], "a:1");
        assert!(v["unset"]["secret"].is_null(), "an unset secret says so");
        let mut egress = serde_json::json!({"allow_private": true, "max_idle": 1});
        redact(&mut egress);
        assert_eq!(egress["allow_private"], true, "not a secret");
    }
}
