//! What the fuzz targets assert, shared with `tests/fuzz_regressions.rs` so a saved
//! input replays the very same checks under `cargo test`.
//!
//! Each check takes raw fuzzer bytes. Beyond "nothing panics", each states a property
//! the rest of tether relies on:
//!
//! - [`request_target`]: an origin parsed from a request target or a CONNECT
//!   authority is a usable, normalised pool key — non-empty lower-case host, port
//!   not 0, no userinfo — and printing it gives back the same key (tether logs it,
//!   and config `origin`s are parsed by the same function). An `[egress] allow`
//!   pattern written as an origin matches that origin.
//! - [`challenge`]: after `rewrite_realm` the challenge's realm is exactly the new
//!   URL, and rewriting its own output again changes nothing.
//! - [`config`]: a document `Config::from_toml` accepts prints (`check-config`) as
//!   TOML that loads back to the same configuration, and every duration in it can be
//!   added to `Instant::now()` (tether computes deadlines that way; an overflow there
//!   is a panic in a running proxy).
//! - [`request_head`], differentially: a request head hyper's server accepts goes
//!   through tether's head rewriting and out through hyper's client, and what comes
//!   out parses, under hyper's parser (httparse), as the same method, the same target
//!   (origin-form), the same end-to-end headers (hop-by-hop ones gone, `Host` and
//!   `Via` tether's) and the same body framing as what came in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tether::config::Config;
use tether::policy::{Origin, Pattern};

/// Request-target and authority parsing: `Origin::from_uri`, `Origin::parse_authority`,
/// `Pattern::parse` + `matches`. The input is tried as a URI, as an authority, and as
/// `pattern\norigin`.
pub fn request_target(data: &[u8]) {
    if let Ok(uri) = http::Uri::try_from(data) {
        if let Ok(origin) = Origin::from_uri(&uri) {
            assert_usable_origin(&origin, &uri.to_string());
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(origin) = Origin::parse_authority(text) {
        assert_usable_origin(&origin, text);
    }
    let (pattern, origin) = text.split_once('\n').unwrap_or((text, text));
    if let (Ok(pattern), Ok(origin)) = (Pattern::parse(pattern), Origin::parse_authority(origin)) {
        let _ = pattern.matches(&origin);
    }
}

fn assert_usable_origin(origin: &Origin, input: &str) {
    assert!(!origin.host.is_empty(), "{input:?}: empty host");
    assert_ne!(origin.port, 0, "{input:?}: port 0");
    assert!(!origin.host.contains('@'), "{input:?}: userinfo kept");
    assert_eq!(
        origin.host,
        origin.host.to_ascii_lowercase(),
        "{input:?}: host not normalised"
    );
    let printed = origin.to_string();
    assert_eq!(
        Origin::parse_authority(&printed).as_ref(),
        Ok(origin),
        "{input:?}: the printed origin {printed:?} parses to a different key"
    );
    if let Ok(pattern) = Pattern::parse(&printed) {
        assert!(
            pattern.matches(origin),
            "{input:?}: pattern {printed:?} does not match its own origin"
        );
    }
}

/// The realm the fuzz target rewrites every Bearer challenge to.
const NEW_REALM: &str = "http://127.0.0.1:32612/token?service=\"a\\b\"";

/// `WWW-Authenticate` realm rewriting on arbitrary challenge strings.
pub fn challenge(data: &[u8]) {
    let Ok(challenge) = std::str::from_utf8(data) else {
        return;
    };
    let Some(out) = tether::proxy::rewrite::rewrite_realm(challenge, |_| Some(NEW_REALM.into()))
    else {
        return;
    };
    let seen = std::cell::RefCell::new(None);
    let again = tether::proxy::rewrite::rewrite_realm(&out, |realm| {
        *seen.borrow_mut() = Some(realm.to_owned());
        Some(realm.to_owned())
    });
    assert_eq!(
        seen.borrow().as_deref(),
        Some(NEW_REALM),
        "{challenge:?} became {out:?}, whose realm is not the new one"
    );
    assert_eq!(
        again.as_deref(),
        Some(out.as_str()),
        "{challenge:?}: rewriting {out:?} to its own realm changed it"
    );
}

/// The config loader on arbitrary UTF-8.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    let printed = config.to_toml();
    match Config::from_toml(&printed) {
        Ok(reloaded) => assert_eq!(
            reloaded, config,
            "{text:?}: check-config printed {printed:?}, which loads differently"
        ),
        Err(e) => panic!("{text:?}: check-config printed {printed:?}, which does not load: {e}"),
    }
    let now = Instant::now();
    let proxy = &config.proxy;
    let mut durations = vec![
        ("proxy.client_idle_timeout", proxy.client_idle_timeout),
        ("proxy.header_read_timeout", proxy.header_read_timeout),
        ("proxy.drain_timeout", proxy.drain_timeout),
    ];
    durations.extend(config.pool.durations());
    for up in &config.upstream {
        durations.extend(up.pool(&config.pool).durations());
    }
    for (key, d) in durations {
        assert!(
            now.checked_add(d).is_some(),
            "{text:?}: {key} = {d:?} validates but overflows a deadline"
        );
    }
}

/// The `Host` the check's upstream gets, as `Upstream::host_header` would give it.
const UPSTREAM_HOST: &str = "upstream.test:8080";
/// What tether appends to `Via` (`proxy::VIA`).
const VIA: &str = "1.1 tether";
/// As many header lines as hyper's h1 parser takes (`DEFAULT_MAX_HEADERS`).
const MAX_HEADERS: usize = 100;
/// Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy-only ones: never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// A request head as httparse reads it: what each side of tether is compared on.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    target: String,
    /// Lower-case name → values in order, framing headers left out.
    headers: BTreeMap<String, Vec<Vec<u8>>>,
    framing: Framing,
}

/// How the body is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` (no header at all: 0).
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`, listing these codings.
    Chunked(Vec<String>),
    /// `Content-Length` that is not one number.
    Invalid,
}

/// Request heads through hyper's server, tether's rewriting and hyper's client.
pub fn request_head(data: &[u8]) {
    let Some((len, accepted)) = parse_head(data) else {
        return;
    };
    if accepted.method == "CONNECT" {
        return; // a tunnel, not a forwarded head
    }
    let Some(out) = RUNTIME.with(|rt| rt.block_on(forward(&data[..len]))) else {
        return; // refused, by hyper's server or by tether
    };
    let (_, forwarded) = parse_head(&out).unwrap_or_else(|| {
        panic!(
            "{:?}: tether forwarded a head hyper cannot parse: {:?}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&out)
        )
    });
    let Some(expected) = expected(accepted) else {
        panic!(
            "{:?}: a target that names no resource was forwarded as {:?}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&out)
        );
    };
    assert_eq!(
        forwarded,
        expected,
        "{:?} was forwarded as {:?}",
        String::from_utf8_lossy(data),
        String::from_utf8_lossy(&out)
    );
}

thread_local! {
    /// One runtime per fuzzing thread: building one per input would dominate the cost.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

/// httparse's reading of a request head, as hyper's server configures it, and its
/// length; `None` when it is not a complete, valid head.
fn parse_head(data: &[u8]) -> Option<(usize, Head)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = req.parse(data) else {
        return None;
    };
    let mut map: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for h in req.headers.iter() {
        map.entry(h.name.to_ascii_lowercase())
            .or_default()
            .push(h.value.to_vec());
    }
    let codings = map.remove("transfer-encoding");
    let lengths = map.remove("content-length");
    let framing = match (codings, lengths) {
        (Some(codings), _) => Framing::Chunked(
            codings
                .iter()
                .flat_map(|v| v.split(|&b| b == b','))
                .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect(),
        ),
        (None, Some(lengths)) => content_length(&lengths),
        (None, None) => Framing::Length(0),
    };
    let head = Head {
        method: req.method?.to_owned(),
        target: req.path?.to_owned(),
        headers: map,
        framing,
    };
    Some((len, head))
}

/// Every `Content-Length` line and every comma-separated item in them must be the
/// same number (RFC 9110 §8.6); hyper's server answers 400 otherwise, so such a head
/// is never compared.
fn content_length(lines: &[Vec<u8>]) -> Framing {
    let mut items = lines.iter().flat_map(|v| v.split(|&b| b == b','));
    let parse = |item: &[u8]| -> Option<u64> {
        let digits = std::str::from_utf8(item).ok()?.trim();
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let first = items.next().and_then(parse);
    match first {
        Some(n) if items.all(|item| parse(item) == Some(n)) => Framing::Length(n),
        _ => Framing::Invalid,
    }
}

/// What the upstream should see for the head a client sent (`None`: nothing, it must
/// be refused), by RFC 9110/9112 rather than by tether's code: the target in origin
/// form without a fragment, hop-by-hop headers and those `Connection` names removed,
/// `Host` naming the upstream, tether appended to `Via`, and the body framed as the
/// client framed it: the same length, or chunked with the same transfer codings.
fn expected(accepted: Head) -> Option<Head> {
    let Head {
        method,
        target,
        mut headers,
        framing,
    } = accepted;
    let named: Vec<String> = headers
        .get("connection")
        .into_iter()
        .flatten()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
    headers.insert("host".into(), vec![UPSTREAM_HOST.into()]);
    headers.entry("via".into()).or_default().push(VIA.into());
    Some(Head {
        method,
        target: origin_form(&target)?,
        headers,
        framing,
    })
}

/// RFC 9112 §3.2: an absolute-form target's path and query (`/` for an empty path);
/// an origin-form or asterisk-form one as it is; a fragment is never sent. `None`
/// for any other target (authority-form outside CONNECT, a scheme that is not http
/// or https), which names no resource here and must be refused.
fn origin_form(target: &str) -> Option<String> {
    let target = target.split('#').next().unwrap_or_default();
    if target.starts_with('/') || target == "*" {
        return Some(target.to_owned());
    }
    let (scheme, rest) = target.split_once("://")?;
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return None;
    }
    Some(match rest.find(['/', '?']) {
        Some(at) if rest[at..].starts_with('/') => rest[at..].to_owned(),
        Some(at) => format!("/{}", &rest[at..]),
        None => "/".to_owned(),
    })
}

/// Runs `head` through hyper's server, tether's rewriting (the part of
/// `proxy::prepare_request` and `Upstream::request_form` that a route or forward
/// request gets) and hyper's client, over in-memory pipes; the head the client
/// wrote, or `None` when hyper's server or tether refused the request.
async fn forward(head: &[u8]) -> Option<Vec<u8>> {
    // Every task of one input is in this set and ends with it: a task left waiting
    // on a pipe (a refused request's server, say) would pile up input after input.
    let mut tasks = tokio::task::JoinSet::new();
    let out = forward_in(head, &mut tasks).await;
    tasks.shutdown().await;
    out
}

async fn forward_in(head: &[u8], tasks: &mut tokio::task::JoinSet<()>) -> Option<Vec<u8>> {
    use http::header::{self, HeaderValue};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut client, server_io) = tokio::io::duplex(1 << 16);
    let (upstream_io, mut origin) = tokio::io::duplex(1 << 16);
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let _ = accepted_tx.send(req);
        // The response never comes: the check is over once the head is out.
        std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
    });
    let server = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(server_io), service);
    tasks.spawn(async move {
        let _ = server.await;
    });
    let head = head.to_vec();
    tasks.spawn(async move {
        let _ = client.write_all(&head).await;
        // Kept open until the input is over: an end of stream would cut a body short.
        std::future::pending::<()>().await;
        drop(client);
    });
    let within = Duration::from_secs(5);
    let received = tokio::time::timeout(within, accepted.recv()).await;
    let mut req = match received {
        Ok(Some(req)) => req,
        Ok(None) => return None, // hyper's server answered it itself (4xx)
        Err(_) => panic!("hyper's server neither took nor refused a head httparse completes"),
    };

    if tether::proxy::check_framing(req.headers()).is_err() {
        return None; // 400 or 501: tether refuses it before it picks an upstream
    }
    let headers = req.headers_mut();
    tether::proxy::strip_hop_by_hop(headers);
    headers.insert(header::HOST, HeaderValue::from_static(UPSTREAM_HOST));
    headers.append(header::VIA, HeaderValue::from_static(VIA));
    if tether::upstream::h1_form(&mut req).is_err() {
        return None; // 400 bad_target
    }

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream_io))
        .await
        .expect("handshake over a pipe");
    tasks.spawn(async move {
        let _ = conn.await;
    });
    let exchange = sender.send_request(req);
    tasks.spawn(async move {
        let _ = exchange.await;
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = tokio::time::timeout(within, async {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            if let Ok(httparse::Status::Complete(n)) =
                httparse::Request::new(&mut headers).parse(&out)
            {
                out.truncate(n);
                return true;
            }
            match origin.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match complete {
        // hyper's client gave up before writing a byte: nothing was forwarded.
        Ok(false) if out.is_empty() => None,
        // A complete head, or whatever hyper's client wrote before it gave up (which
        // then fails to parse, and the check says so).
        Ok(_) => Some(out),
        Err(_) => panic!(
            "hyper's client wrote no complete head within {within:?}: {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}
