//! Configuration: the structs, their documented defaults, loading and validation.
//!
//! Loading order (lowest to highest precedence): built-in defaults, the TOML file
//! (or the embedded `config/tether.toml` when none is given), then environment
//! variables `TETHER_<SECTION>__<KEY>`. Unknown keys are errors, and [`Config::validate`]
//! reports every problem at once so an operator fixes a file in one pass.
//!
//! The built-in defaults are this module's (the `pool_keys!` table, the `DEFAULT_*`
//! consts, the `Default` impls): they are typed and say why they have their value.
//! `config/tether.toml` shows every key with the same value, set or commented out;
//! `tests/defaults.rs` fails when the two part.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The commented default configuration, compiled in so `tether` runs with no file.
pub const EMBEDDED_CONFIG: &str = include_str!("../config/tether.toml");

/// Prefix of environment overrides; `__` separates nesting levels because a single
/// `_` collides with snake_case keys.
pub const ENV_PREFIX: &str = "TETHER_";

/// Forward-proxy listener: Squid's customary port, loopback so nothing is exposed by default.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:3128";
/// Admin listener (Envoy's customary admin port), loopback by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Shorter than most clients' own idle timeouts (Go: 90 s) so tether, not the
/// client, decides when a leaked connection dies.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 4096;
/// hyper's own default read buffer limit is ~400 KiB; 64 KiB is what nginx and
/// HAProxy accept by default for a request head and keeps per-connection memory small.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// The smallest `max_header_bytes` accepted: below it ordinary requests (a request
/// line, `Host` and a few headers; a registry client's `Accept` list alone can take
/// hundreds of bytes) would be refused. Every value from here up is enforced exactly.
pub const MIN_MAX_HEADER_BYTES: usize = 1024;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Transparent listener: the port Istio's sidecar uses for redirected outbound
/// traffic, on loopback because iptables `REDIRECT` of locally generated packets
/// always delivers them to 127.0.0.1.
pub const DEFAULT_TRANSPARENT_LISTEN: &str = "127.0.0.1:15001";
/// HTTP and TLS clients send their first bytes as soon as they connect; a
/// connection still silent after this is taken for a server-speaks-first protocol
/// and relayed as a tunnel.
pub const DEFAULT_PEEK_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest duration any key accepts: 100 years (humantime's `"100y"`), which
/// is "never" in practice. tether adds durations to the clock for deadlines, and
/// humantime parses values up to 584 billion years, far past where that overflows
/// (a panic on the request path).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Declares the pool keys once: generates [`PoolConfig`] (the `[pool]` table) and
/// [`UpstreamConfig`], whose `[[upstream]]` tables take the same keys as optional
/// overrides beside their own. (serde's `flatten` cannot be combined with
/// `deny_unknown_fields`, so the keys are spelled into both structs here.)
macro_rules! pool_keys {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr $(, with $serde:literal)?; )*) => {
        /// Limits of one upstream's pool. `config/tether.toml` documents each key
        /// with the default given here.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct PoolConfig {
            $( $(#[$doc])* $(#[serde(with = $serde)])? pub $name: $ty, )*
        }

        impl Default for PoolConfig {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// One `[[upstream]]`: a named origin tether may reach, with its own pool.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct UpstreamConfig {
            /// Metric label and route target; `[a-z0-9_-]`, unique.
            pub name: String,
            /// `host:port` of the origin.
            pub origin: String,
            /// Originate TLS to the origin (clients speak plain HTTP to tether).
            #[serde(default)]
            pub tls: bool,
            /// TLS server name; defaults to the origin's host.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub sni: Option<String>,
            /// Extra PEM trust anchors, added to the system roots.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub ca_file: Option<PathBuf>,
            /// Accept any certificate. Logged as a warning at start-up.
            #[serde(default)]
            pub insecure_skip_verify: bool,
            /// Which HTTP version to speak to the origin.
            #[serde(default)]
            pub protocol: Protocol,
            /// Rewrite `WWW-Authenticate` realms and `Location` headers that point at
            /// another configured upstream so the follow-up request comes through tether.
            #[serde(default = "default_true")]
            pub rewrite_realm: bool,
            $(
                #[serde(default, skip_serializing_if = "Option::is_none")]
                $(#[serde(with = $serde)])?
                pub $name: Option<$ty>,
            )*
        }

        impl UpstreamConfig {
            /// A plain upstream with every pool key taken from `[pool]`.
            pub fn new(name: impl Into<String>, origin: impl Into<String>) -> Self {
                Self {
                    name: name.into(),
                    origin: origin.into(),
                    tls: false,
                    sni: None,
                    ca_file: None,
                    insecure_skip_verify: false,
                    protocol: Protocol::default(),
                    rewrite_realm: true,
                    $( $name: None, )*
                }
            }

            /// Same name and the same way of connecting: a reload can keep the live pool.
            pub fn same_connection(&self, other: &UpstreamConfig) -> bool {
                self.name == other.name
                    && self.origin == other.origin
                    && self.tls == other.tls
                    && self.sni == other.sni
                    && self.ca_file == other.ca_file
                    && self.insecure_skip_verify == other.insecure_skip_verify
                    && self.protocol == other.protocol
                    && self.rewrite_realm == other.rewrite_realm
            }

            /// The pool limits in force for this upstream: `defaults` with this
            /// upstream's overrides applied.
            pub fn pool(&self, defaults: &PoolConfig) -> PoolConfig {
                PoolConfig { $( $name: self.$name.clone().unwrap_or_else(|| defaults.$name.clone()), )* }
            }
        }
    };
}

pool_keys! {
    /// Hard cap: connecting + active + idle (+ tunnels).
    max_connections: usize = 32;
    /// Idle sockets kept; unset means `min(16, max_connections)`.
    max_idle: Option<usize> = None;
    idle_timeout: Duration = Duration::from_secs(30), with "humantime_serde";
    reap_interval: Duration = Duration::from_secs(1), with "humantime_serde";
    max_lifetime: Duration = Duration::from_secs(600), with "humantime_serde";
    max_requests_per_connection: u64 = 1000;
    /// With a `[budget]`: sockets this upstream may always have (its floor).
    min_connections: usize = 0;
    /// Idle sockets kept open and ready (re-opened after reaping or a remote close).
    min_idle: usize = 0;
    /// Honour an upstream's `Keep-Alive: timeout=N, max=M` per connection.
    adaptive_keepalive: bool = true;
    /// Safety margin subtracted from an advertised keep-alive timeout.
    keepalive_margin: Duration = Duration::from_secs(1), with "humantime_serde";
    /// HTTP/2 streams one upstream connection carries before another opens.
    max_streams_per_connection: usize = 100;
    queue_limit: usize = 1024;
    queue_timeout: Duration = Duration::from_secs(5), with "humantime_serde";
    connect_timeout: Duration = Duration::from_secs(3), with "humantime_serde";
    response_header_timeout: Duration = Duration::from_secs(30), with "humantime_serde";
    request_timeout: Duration = Duration::from_secs(60), with "humantime_serde";
    tunnel_idle_timeout: Duration = Duration::from_secs(60), with "humantime_serde";
    min_idle_for_eviction: Duration = Duration::from_secs(1), with "humantime_serde";
}

/// Idle sockets kept per upstream when `max_idle` is not set (capped by `max_connections`).
pub const DEFAULT_MAX_IDLE: usize = 16;

impl PoolConfig {
    /// The idle limit in force: `max_idle`, or the default capped by the hard cap.
    pub fn idle_limit(&self) -> usize {
        self.max_idle
            .unwrap_or(DEFAULT_MAX_IDLE.min(self.max_connections))
    }
}

fn default_true() -> bool {
    true
}

/// The HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// ALPN offers h2 and http/1.1 over TLS; plain TCP uses HTTP/1.1.
    #[default]
    Auto,
    Http1,
    /// h2 over TLS (ALPN) or prior knowledge over plain TCP.
    Http2,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub egress: EgressConfig,
    pub pool: PoolConfig,
    pub upstream: Vec<UpstreamConfig>,
    pub route: Vec<RouteConfig>,
    pub diagnosis: DiagnosisConfig,
    pub budget: BudgetConfig,
    pub transparent: TransparentConfig,
}

/// `[budget]`: one connection budget shared by every upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Sockets open to all upstreams together; 0 = no shared budget.
    pub max_connections: usize,
}

/// `[diagnosis]`: naming the client that leaks connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnosisConfig {
    /// Clients listed at `/debug/clients`, by connections opened in the window.
    pub top_clients: usize,
    /// The sliding window connections and requests are counted over.
    #[serde(with = "humantime_serde")]
    pub leak_window: Duration,
    /// Connections a client must open in the window before it can be named.
    pub leak_min_connections: u64,
    /// ...and requests per connection below which it is named.
    pub leak_reuse_below: f64,
}

impl Default for DiagnosisConfig {
    fn default() -> Self {
        Self {
            top_clients: 20,
            leak_window: Duration::from_secs(60),
            leak_min_connections: 50,
            leak_reuse_below: 2.0,
        }
    }
}

/// `[proxy]`: the forward-proxy listener and limits on the client side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    pub max_client_connections: usize,
    pub max_header_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_PROXY_LISTEN.parse().expect("valid default"),
            client_idle_timeout: DEFAULT_CLIENT_IDLE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// `[admin]`: metrics, health and debug endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
        }
    }
}

/// `[egress]`: which origins beyond the listed upstreams may be reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// `host:port`, `*.suffix:port`, `host:*` patterns.
    pub allow: Vec<String>,
    /// Let allow patterns reach private and other special-purpose addresses
    /// (`policy::refusal` lists them).
    pub allow_private: bool,
}

/// `[[route]]`: a plain HTTP listener standing in for one upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub listen: SocketAddr,
    pub upstream: String,
}

/// `[transparent]`: a listener for connections redirected to tether by iptables,
/// for clients that cannot be pointed at a proxy at all. Off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransparentConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Destination ports `tether iptables` redirects to `listen`.
    pub ports: Vec<u16>,
    /// Relay redirected connections whose destination matches no upstream and no
    /// allow pattern, pooled per destination under the `unlisted` label.
    pub allow_unlisted: bool,
    #[serde(with = "humantime_serde")]
    pub peek_timeout: Duration,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: DEFAULT_TRANSPARENT_LISTEN.parse().expect("valid default"),
            ports: Vec::new(),
            allow_unlisted: false,
            peek_timeout: DEFAULT_PEEK_TIMEOUT,
        }
    }
}

/// One problem found while loading or validating, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ConfigError(pub Vec<Problem>);

impl Config {
    /// Defaults, then `path` (or the embedded default config when `None`), then
    /// `TETHER_` environment variables; validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) if !p.exists() => {
                return Err(ConfigError(vec![Problem {
                    path: String::new(),
                    message: format!("config file {} does not exist", p.display()),
                }]))
            }
            Some(p) => Toml::file_exact(p),
            None => Toml::string(EMBEDDED_CONFIG),
        };
        Self::from_figment(Self::figment().merge(file).merge(env()))
    }

    /// Parses a TOML document on top of the defaults (no environment); validated.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment().merge(Toml::string(toml)))
    }

    /// Defaults, then `toml`, then the environment; validated. (For tests.)
    pub fn from_toml_and_env(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment().merge(Toml::string(toml)).merge(env()))
    }

    fn figment() -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|errors| {
            ConfigError(
                errors
                    .into_iter()
                    .map(|e| Problem {
                        path: e.path.join("."),
                        message: e.kind.to_string(),
                    })
                    .collect(),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations serde cannot: limits that contradict each other, routes
    /// naming unknown upstreams, listeners sharing an address. Reports all at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });

        check_pool("pool", &self.pool, &mut problem);
        if self.proxy.max_client_connections == 0 {
            problem(
                "proxy.max_client_connections".into(),
                "must be at least 1".into(),
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
            check_pool(&at, &up.pool(&self.pool), &mut problem);
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

    /// The effective configuration as TOML, for `tether check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serializes to TOML")
    }
}

/// `TETHER_<SECTION>__<KEY>` variables. Only the scalar sections can be set this way,
/// and other `TETHER_*` variables (a script's `TETHER_BIN`, say) are not config.
fn env() -> Env {
    const SECTIONS: [&str; 7] = [
        "proxy",
        "admin",
        "egress",
        "pool",
        "diagnosis",
        "budget",
        "transparent",
    ];
    Env::prefixed(ENV_PREFIX)
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            SECTIONS.iter().any(|s| {
                key.strip_prefix(s)
                    .is_some_and(|rest| rest.starts_with("__") || rest.starts_with('.'))
            })
        })
        .split("__")
}

fn check_pool(at: &str, pool: &PoolConfig, problem: &mut impl FnMut(String, String)) {
    if pool.max_connections == 0 {
        problem(format!("{at}.max_connections"), "must be at least 1".into());
    }
    if let Some(max_idle) = pool.max_idle.filter(|m| *m > pool.max_connections) {
        problem(
            format!("{at}.max_idle"),
            format!(
                "{max_idle} exceeds max_connections ({})",
                pool.max_connections
            ),
        );
    }
    if pool.max_streams_per_connection == 0 {
        problem(
            format!("{at}.max_streams_per_connection"),
            "must be at least 1".into(),
        );
    }
    if pool.min_connections > pool.max_connections {
        problem(
            format!("{at}.min_connections"),
            format!(
                "{} exceeds max_connections ({})",
                pool.min_connections, pool.max_connections
            ),
        );
    }
    if pool.min_idle > pool.max_connections || pool.min_idle > pool.idle_limit() {
        problem(
            format!("{at}.min_idle"),
            format!("{} exceeds max_connections or max_idle", pool.min_idle),
        );
    }
    if pool.max_requests_per_connection == 0 {
        problem(
            format!("{at}.max_requests_per_connection"),
            "must be at least 1".into(),
        );
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
            problem(format!("{at}.{key}"), "must be greater than zero".into());
        }
    }
    for (key, d) in [
        ("idle_timeout", pool.idle_timeout),
        ("reap_interval", pool.reap_interval),
        ("max_lifetime", pool.max_lifetime),
        ("queue_timeout", pool.queue_timeout),
        ("connect_timeout", pool.connect_timeout),
        ("response_header_timeout", pool.response_header_timeout),
        ("request_timeout", pool.request_timeout),
        ("tunnel_idle_timeout", pool.tunnel_idle_timeout),
        ("min_idle_for_eviction", pool.min_idle_for_eviction),
        ("keepalive_margin", pool.keepalive_margin),
    ] {
        check_at_most_max(&format!("{at}.{key}"), d, problem);
    }
}

fn check_at_most_max(path: &str, d: Duration, problem: &mut impl FnMut(String, String)) {
    if d > MAX_DURATION {
        problem(
            path.to_string(),
            format!(
                "{} is longer than the maximum, {}",
                humantime::format_duration(d),
                humantime::format_duration(MAX_DURATION)
            ),
        );
    }
}
