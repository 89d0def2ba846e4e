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

use std::time::{Duration, Instant};

use tether::config::{Config, PoolConfig};
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
    durations.extend(pool_durations(&config.pool));
    for up in &config.upstream {
        durations.extend(pool_durations(&up.pool(&config.pool)));
    }
    for (key, d) in durations {
        assert!(
            now.checked_add(d).is_some(),
            "{text:?}: {key} = {d:?} validates but overflows a deadline"
        );
    }
}

fn pool_durations(pool: &PoolConfig) -> [(&'static str, Duration); 9] {
    [
        ("idle_timeout", pool.idle_timeout),
        ("reap_interval", pool.reap_interval),
        ("max_lifetime", pool.max_lifetime),
        ("queue_timeout", pool.queue_timeout),
        ("connect_timeout", pool.connect_timeout),
        ("response_header_timeout", pool.response_header_timeout),
        ("request_timeout", pool.request_timeout),
        ("tunnel_idle_timeout", pool.tunnel_idle_timeout),
        ("min_idle_for_eviction", pool.min_idle_for_eviction),
    ]
}
