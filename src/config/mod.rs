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
//! `tests/defaults.rs` fails when the two part. Loading is in [`load`], validation
//! in [`validate`].

mod check;
mod cluster;
mod diff;
mod env;
mod load;
mod path;
mod schema;
mod validate;

pub use cluster::{ClusterConfig, Members, DEFAULT_CLUSTER_REFRESH, MIN_CLUSTER_REFRESH};
pub use diff::{Change, ConfigDiff, RESTART_ONLY};
pub use env::names as env_names;
pub use path::{display as display_path, parse_path, Seg};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The commented default configuration, compiled in so `tether` runs with no file.
pub const EMBEDDED_CONFIG: &str = include_str!("../../config/tether.toml");

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
/// The most runtime threads `proxy.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;
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

            /// Whether this upstream sets the pool key `key` itself (else it inherits
            /// `[pool]`'s).
            pub fn sets(&self, key: &str) -> bool {
                match key {
                    $( stringify!($name) => self.$name.is_some(), )*
                    _ => false,
                }
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
    /// One cap shared by every `[cluster]` member; each takes its share of it as
    /// its cap in force. Unset: no cluster-wide cap.
    cluster_max_connections: Option<usize> = None;
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
    /// Every duration of the pool, by key: what validation bounds, and what the
    /// fuzz checks hold to a deadline that cannot overflow.
    pub fn durations(&self) -> [(&'static str, Duration); 10] {
        [
            ("idle_timeout", self.idle_timeout),
            ("reap_interval", self.reap_interval),
            ("max_lifetime", self.max_lifetime),
            ("queue_timeout", self.queue_timeout),
            ("connect_timeout", self.connect_timeout),
            ("response_header_timeout", self.response_header_timeout),
            ("request_timeout", self.request_timeout),
            ("tunnel_idle_timeout", self.tunnel_idle_timeout),
            ("min_idle_for_eviction", self.min_idle_for_eviction),
            ("keepalive_margin", self.keepalive_margin),
        ]
    }

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
    pub cluster: ClusterConfig,
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
    /// Client connections one client (peer IP) may hold; `None`: no per-client limit.
    pub max_connections_per_client: Option<usize>,
    pub max_header_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Threads of the runtime that serves every connection; 0: one per CPU core.
    pub worker_threads: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_PROXY_LISTEN.parse().expect("valid default"),
            client_idle_timeout: DEFAULT_CLIENT_IDLE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
            max_connections_per_client: None,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            worker_threads: 0,
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

/// One problem found while loading or validating: the key path it concerns
/// (`upstream[1].max_connections`), and where that value was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    /// `file:line` (`file:line:col` for a syntax error), or the environment variable
    /// that set the value; empty for a default.
    pub at: String,
}

impl Problem {
    /// A problem with `path`, not yet located (validation's; loading locates it).
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem::at("", path, message)
    }

    pub fn at(
        at: impl Into<String>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
            at: at.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.at.is_empty() {
            write!(f, "{}: ", self.at)?;
        }
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

/// The problem of a duration over [`MAX_DURATION`], if it is.
fn too_long(d: Duration) -> Option<String> {
    (d > MAX_DURATION).then(|| {
        format!(
            "{} is longer than the maximum, {}",
            humantime::format_duration(d),
            humantime::format_duration(MAX_DURATION)
        )
    })
}

/// Reports `d` at `path` if it is over [`MAX_DURATION`].
fn check_at_most_max(path: &str, d: Duration, problem: &mut impl FnMut(String, String)) {
    if let Some(m) = too_long(d) {
        problem(path.to_string(), m);
    }
}
