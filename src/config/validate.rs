//! Validation: every problem of a configuration at once, each with its key path.

use std::collections::HashSet;
use std::time::Duration;

use super::*;

impl Config {
    /// Checks the relations serde cannot: limits that contradict each other, routes
    /// naming unknown upstreams, listeners sharing an address. Reports all at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem =
            |path: String, message: String| problems.push(Problem::new(path, message));

        // A value an upstream inherits is blamed on `pool.<key>`, where it was
        // written; a `[pool]` value wrong in itself is reported once, not per upstream.
        let mut pool_problems = Vec::new();
        check_pool(&self.pool, &mut |key, message| {
            pool_problems.push(key);
            problem(format!("pool.{key}"), message)
        });
        if self.proxy.max_client_connections == 0 {
            problem(
                "proxy.max_client_connections".into(),
                "must be at least 1".into(),
            );
        }
        if self.proxy.max_connections_per_client == Some(0) {
            problem(
                "proxy.max_connections_per_client".into(),
                "must be at least 1 when set (leave it unset for no per-client limit)".into(),
            );
        }
        if self.proxy.max_header_bytes < MIN_MAX_HEADER_BYTES {
            problem(
                "proxy.max_header_bytes".into(),
                format!(
                    "must be at least {MIN_MAX_HEADER_BYTES}: a smaller limit refuses ordinary requests"
                ),
            );
        }
        if self.proxy.worker_threads > MAX_WORKER_THREADS {
            problem(
                "proxy.worker_threads".into(),
                format!("must be at most {MAX_WORKER_THREADS} (0: one per CPU core)"),
            );
        }
        for (key, d) in [
            ("client_idle_timeout", self.proxy.client_idle_timeout),
            ("header_read_timeout", self.proxy.header_read_timeout),
        ] {
            if d.is_zero() {
                problem(format!("proxy.{key}"), "must be greater than zero".into());
            }
        }
        for (key, d) in [
            ("client_idle_timeout", self.proxy.client_idle_timeout),
            ("header_read_timeout", self.proxy.header_read_timeout),
            ("drain_timeout", self.proxy.drain_timeout),
        ] {
            check_at_most_max(&format!("proxy.{key}"), d, &mut problem);
        }

        let mut names = HashSet::new();
        let mut origins = HashSet::new();
        for (i, up) in self.upstream.iter().enumerate() {
            let at = format!("upstream[{i}]");
            if up.name.is_empty()
                || !up
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                problem(
                    format!("{at}.name"),
                    format!(
                        "{:?} must be non-empty and use only a-z, 0-9, '-', '_'",
                        up.name
                    ),
                );
            } else if !names.insert(up.name.as_str()) {
                problem(
                    format!("{at}.name"),
                    format!("upstream {:?} is defined twice", up.name),
                );
            }
            match crate::policy::origin::Origin::parse_authority(&up.origin) {
                Ok(origin) => {
                    if !origins.insert(origin) {
                        problem(
                            format!("{at}.origin"),
                            format!("origin {:?} is listed by two upstreams", up.origin),
                        );
                    }
                }
                Err(e) => problem(format!("{at}.origin"), format!("{:?}: {e}", up.origin)),
            }
            if !up.tls && (up.sni.is_some() || up.ca_file.is_some() || up.insecure_skip_verify) {
                problem(
                    format!("{at}.tls"),
                    "sni, ca_file and insecure_skip_verify need tls = true".into(),
                );
            }
            if let Some(ca) = &up.ca_file {
                if !ca.is_file() {
                    problem(
                        format!("{at}.ca_file"),
                        format!("{} is not a readable file", ca.display()),
                    );
                }
            }
            check_pool(&up.pool(&self.pool), &mut |key, message| {
                if up.sets(key) {
                    problem(format!("{at}.{key}"), message);
                } else if !pool_problems.contains(&key) {
                    problem(
                        format!("pool.{key}"),
                        format!(
                            "{message} in upstream {:?} ({at}), which inherits {key} from [pool]",
                            up.name
                        ),
                    );
                }
            });
        }

        for (i, route) in self.route.iter().enumerate() {
            if !names.contains(route.upstream.as_str()) {
                problem(
                    format!("route[{i}].upstream"),
                    format!("no upstream is named {:?}", route.upstream),
                );
            }
        }

        let mut listeners: Vec<(String, SocketAddr)> = vec![
            ("proxy.listen".into(), self.proxy.listen),
            ("admin.listen".into(), self.admin.listen),
        ];
        if self.transparent.enabled {
            listeners.push(("transparent.listen".into(), self.transparent.listen));
        }
        listeners.extend(
            self.route
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("route[{i}].listen"), r.listen)),
        );
        for (i, (path, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue; // the kernel picks a distinct port for each
            }
            if let Some((first, _)) = listeners[..i].iter().find(|(_, a)| a == addr) {
                problem(path.clone(), format!("{addr} is already used by {first}"));
            }
        }

        if self.budget.max_connections > 0 {
            let floors: usize = self
                .upstream
                .iter()
                .map(|u| u.pool(&self.pool).min_connections)
                .sum();
            if floors > self.budget.max_connections {
                problem(
                    "budget.max_connections".into(),
                    format!(
                        "{} is below the sum of the upstreams' min_connections ({floors})",
                        self.budget.max_connections
                    ),
                );
            }
        }
        if self.diagnosis.top_clients == 0 {
            problem("diagnosis.top_clients".into(), "must be at least 1".into());
        }
        if self.diagnosis.leak_window < Duration::from_secs(1) {
            problem("diagnosis.leak_window".into(), "must be at least 1s".into());
        }
        check_at_most_max(
            "diagnosis.leak_window",
            self.diagnosis.leak_window,
            &mut problem,
        );
        check_at_most_max(
            "transparent.peek_timeout",
            self.transparent.peek_timeout,
            &mut problem,
        );

        for (i, pattern) in self.egress.allow.iter().enumerate() {
            if let Err(e) = crate::policy::origin::Pattern::parse(pattern) {
                problem(format!("egress.allow[{i}]"), format!("{pattern:?}: {e}"));
            }
        }

        self.validate_transparent(&mut problem);
        super::cluster::validate(self, &mut problem);

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    fn validate_transparent(&self, problem: &mut impl FnMut(String, String)) {
        let t = &self.transparent;
        if t.peek_timeout.is_zero() {
            problem(
                "transparent.peek_timeout".into(),
                "must be greater than zero".into(),
            );
        }
        let mut seen = HashSet::new();
        for (i, &port) in t.ports.iter().enumerate() {
            let at = format!("transparent.ports[{i}]");
            if port == 0 {
                problem(at, "port 0 is not valid".into());
            } else if port == t.listen.port() {
                problem(
                    at,
                    format!(
                        "{port} is the transparent listener's own port: redirecting it would loop"
                    ),
                );
            } else if !seen.insert(port) {
                problem(at, format!("{port} is listed twice"));
            }
        }
    }
}

/// Checks one pool's limits; `problem` gets the key at fault and the message.
fn check_pool(pool: &PoolConfig, problem: &mut impl FnMut(&'static str, String)) {
    if pool.max_connections == 0 {
        problem("max_connections", "must be at least 1".into());
    }
    if let Some(max_idle) = pool.max_idle.filter(|m| *m > pool.max_connections) {
        problem(
            "max_idle",
            format!(
                "{max_idle} exceeds max_connections ({})",
                pool.max_connections
            ),
        );
    }
    if pool.max_streams_per_connection == 0 {
        problem("max_streams_per_connection", "must be at least 1".into());
    }
    if pool.min_connections > pool.max_connections {
        problem(
            "min_connections",
            format!(
                "{} exceeds max_connections ({})",
                pool.min_connections, pool.max_connections
            ),
        );
    }
    if pool.min_idle > pool.max_connections || pool.min_idle > pool.idle_limit() {
        problem(
            "min_idle",
            format!("{} exceeds max_connections or max_idle", pool.min_idle),
        );
    }
    if pool.max_requests_per_connection == 0 {
        problem("max_requests_per_connection", "must be at least 1".into());
    }
    for (key, d) in [
        ("idle_timeout", pool.idle_timeout),
        ("reap_interval", pool.reap_interval),
        ("max_lifetime", pool.max_lifetime),
        ("connect_timeout", pool.connect_timeout),
        ("response_header_timeout", pool.response_header_timeout),
        ("request_timeout", pool.request_timeout),
        ("tunnel_idle_timeout", pool.tunnel_idle_timeout),
    ] {
        if d.is_zero() {
            problem(key, "must be greater than zero".into());
        }
    }
    for (key, d) in pool.durations() {
        if let Some(m) = too_long(d) {
            problem(key, m);
        }
    }
}
