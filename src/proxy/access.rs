//! The access log: one line per exchange, written when it ends — when its response
//! body has gone out, broke off, or was abandoned by the client — so a download's
//! line carries its whole duration and byte count, not just its time to first byte.
//! (A tunnel's line is written when the tunnel closes: `upstream::tunnel`.)
//!
//! Fields are structured values (numbers as numbers) in both log formats; durations
//! are milliseconds rounded to microseconds. Only the path of the target is logged
//! (query strings carry tokens), the target authority without any userinfo, and no
//! header value at all. An [`Exchange`] holds cheap clones (the URI and authority
//! share the request's bytes), so keeping one per request allocates nothing; with
//! the access log off (`RUST_LOG` below `info` for `tether::access`, as the benches
//! run) it keeps no method or URI and works out no duration.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use tokio::time::Instant;

use crate::error::ErrorKind;
use crate::telemetry::millis;
use crate::upstream::{BodyBytes, Timing, Upstream};

/// One exchange, from its request head to the end of its response body.
pub struct Exchange {
    started: Instant,
    client: SocketAddr,
    /// The request's method and target, when the access log is on.
    logged: Option<(Method, Uri)>,
    target: Target,
    /// The upstream chosen for it, once chosen.
    pub(super) upstream: Option<Arc<Upstream>>,
    pub(super) timing: Timing,
    pub(super) request_bytes: BodyBytes,
    status: StatusCode,
    /// Why it failed, if it did.
    error: Option<ErrorKind>,
    /// When the response head was ready (the time to first byte ends there).
    head_at: Instant,
    /// Response body bytes sent to the client.
    pub(super) response_bytes: u64,
}

/// The authority the client addressed: the target's (forward, CONNECT), else `Host`.
enum Target {
    Authority(Authority),
    Host(HeaderValue),
    None,
}

impl Exchange {
    pub(super) fn new<B>(req: &Request<B>, client: SocketAddr, started: Instant) -> Exchange {
        let target = match req.uri().authority() {
            Some(authority) => Target::Authority(authority.clone()),
            None => match req.headers().get(header::HOST) {
                Some(host) => Target::Host(host.clone()),
                None => Target::None,
            },
        };
        let logged = tracing::enabled!(target: "tether::access", tracing::Level::INFO)
            .then(|| (req.method().clone(), req.uri().clone()));
        Exchange {
            started,
            client,
            logged,
            target,
            upstream: None,
            timing: Timing::default(),
            request_bytes: BodyBytes::default(),
            status: StatusCode::OK,
            error: None,
            head_at: started,
            response_bytes: 0,
        }
    }

    /// The host and port the client addressed: the target's authority, which wins
    /// over `Host` (RFC 9112 §3.2.2), else `Host` when it is text.
    pub(super) fn client_host(&self) -> Option<&str> {
        match &self.target {
            Target::Authority(authority) => Some(authority.as_str()),
            Target::Host(host) => host.to_str().ok(),
            Target::None => None,
        }
    }

    /// When the request arrived.
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    /// The response head is ready: `status`, from the upstream or, for a failure of
    /// `error`, from tether. Counted under the upstream, when one was chosen.
    pub(super) fn head(&mut self, status: StatusCode, error: Option<ErrorKind>) {
        self.status = status;
        self.error = error;
        self.head_at = self.timing.head_at.unwrap_or_else(Instant::now);
        if let Some(upstream) = &self.upstream {
            upstream.pool.metrics().responded(status, error);
        }
    }

    /// The response body broke off with `error` after its head went out.
    pub(super) fn broke_off(&mut self, error: ErrorKind) {
        if self.error.is_none() {
            self.error = Some(error);
            if let Some(upstream) = &self.upstream {
                upstream.pool.metrics().error(error);
            }
        }
    }

    /// Writes the line, if the access log is on: the exchange is over.
    pub(super) fn finish(&self) {
        let Some((method, uri)) = &self.logged else {
            return;
        };
        tracing::info!(
            target: "tether::access",
            client = %self.client,
            upstream = self.upstream.as_ref().map(|u| &*u.name),
            target = self.target.shown().map(tracing::field::display),
            method = %method,
            path = uri.path(),
            status = self.status.as_u16(),
            error = self.error.map(ErrorKind::as_str),
            queue_ms = self.upstream.as_ref().map(|_| millis(self.timing.queue)),
            connect_ms = self.timing.connect.map(millis),
            reused = self.timing.reused,
            ttfb_ms = millis(self.head_at.saturating_duration_since(self.started)),
            duration_ms = millis(self.started.elapsed()),
            bytes_in = self.request_bytes.get(),
            bytes_out = self.response_bytes,
        );
    }
}

impl Target {
    fn shown(&self) -> Option<Shown<'_>> {
        match self {
            Target::Authority(a) => Some(Shown::Authority(a)),
            Target::Host(h) => h.to_str().ok().map(Shown::Host),
            Target::None => None,
        }
    }
}

/// A target as logged: host and port, never the userinfo an absolute-form target
/// may carry (`http://user:password@host/`).
enum Shown<'a> {
    Authority(&'a Authority),
    Host(&'a str),
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shown::Authority(a) => match a.port_u16() {
                Some(port) => write!(f, "{}:{port}", a.host()),
                None => f.write_str(a.host()),
            },
            // A Host header has no userinfo (RFC 9110 §7.2); cut it anyway.
            Shown::Host(h) => f.write_str(h.rsplit('@').next().unwrap_or(h)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_target_never_carries_userinfo() {
        let req = Request::get("http://user:secret@example.com:8080/p?token=x")
            .body(())
            .unwrap();
        let exchange = Exchange::new(&req, "127.0.0.1:1".parse().unwrap(), Instant::now());
        let shown = exchange.target.shown().unwrap().to_string();
        assert_eq!(shown, "example.com:8080");
        let req = Request::get("/v2/")
            .header("host", "registry:5000")
            .body(())
            .unwrap();
        let exchange = Exchange::new(&req, "127.0.0.1:1".parse().unwrap(), Instant::now());
        assert_eq!(
            exchange.target.shown().unwrap().to_string(),
            "registry:5000"
        );
    }
}
