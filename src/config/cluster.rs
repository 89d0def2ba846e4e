//! `[cluster]`: the gateway replicas that share one connection cap per upstream
//! (`cluster_max_connections`, a pool key), and its validation. What the members'
//! shares are, and when they change, is `crate::cluster`'s concern.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{check_at_most_max, Config};

/// Re-read the member list this often by default: CoreDNS answers for a headless
/// Service with a 5 s TTL, so reading faster only re-reads its cache.
pub const DEFAULT_CLUSTER_REFRESH: Duration = Duration::from_secs(5);
/// The shortest `refresh`: every read of a `dns:` source is a lookup.
pub const MIN_CLUSTER_REFRESH: Duration = Duration::from_millis(10);

/// `[cluster]`. With no `members`, there is no cluster: each process enforces its
/// own `max_connections`, as without this section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Where the members are listed.
    pub members: Option<Members>,
    /// This replica's address as it appears in `members` (the pod's IP). Unset,
    /// this replica is in no list: its share is 0, as for an address not listed
    /// (it is usually set from the environment, so a file without it is valid).
    #[serde(rename = "self")]
    pub self_addr: Option<IpAddr>,
    /// How often the member list is re-read.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// How long a member waits before taking a larger share; unset: derived from
    /// `refresh` and the drain bounds (see [`ClusterConfig::hold_off`]).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub hold_off: Option<Duration>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            members: None,
            self_addr: None,
            refresh: DEFAULT_CLUSTER_REFRESH,
            hold_off: None,
        }
    }
}

/// A member list source: `dns:NAME` (A/AAAA records through the system resolver)
/// or `file:PATH` (one address per line; `#` comments and blank lines ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    Dns(String),
    File(PathBuf),
}

impl std::str::FromStr for Members {
    type Err = String;

    fn from_str(s: &str) -> Result<Members, String> {
        if let Some(name) = s.strip_prefix("dns:") {
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            return match valid {
                true => Ok(Members::Dns(name.to_string())),
                false => Err(format!("{name:?} is not a DNS name")),
            };
        }
        if let Some(path) = s.strip_prefix("file:") {
            return match path.is_empty() {
                true => Err("file: needs a path".into()),
                false => Ok(Members::File(PathBuf::from(path))),
            };
        }
        Err(format!(
            "{s:?} must be \"dns:NAME\" (a headless Service) or \"file:PATH\""
        ))
    }
}

impl fmt::Display for Members {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Members::Dns(name) => write!(f, "dns:{name}"),
            Members::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl Serialize for Members {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl ClusterConfig {
    /// The hold-off in force: `hold_off`, or `2 × refresh + drain`, where `drain`
    /// is the longest a socket above a lowered cap may stay open (the longest
    /// `request_timeout`, or `proxy.drain_timeout` for a departing replica).
    ///
    /// Why that bound: a change is seen by every other member within one `refresh`
    /// of being listed (their reads run every `refresh`, and this member saw it
    /// no earlier than it was listed; the second `refresh` covers a read under way
    /// while the change lands). A member that shrank closes its sockets above the
    /// new cap as their exchanges end, within `drain`. Only after both may this
    /// member's cap grow into what the others gave up.
    pub fn hold_off(&self, config: &Config) -> Duration {
        self.hold_off.unwrap_or_else(|| {
            let exchange = config
                .upstream
                .iter()
                .map(|u| u.pool(&config.pool).request_timeout)
                .fold(config.pool.request_timeout, Duration::max);
            let drain = exchange.max(config.proxy.drain_timeout);
            self.refresh.saturating_mul(2).saturating_add(drain)
        })
    }

    /// Whether a cluster is configured.
    pub fn enabled(&self) -> bool {
        self.members.is_some()
    }
}

/// The problems of `[cluster]` and of the `cluster_max_connections` keys.
pub(super) fn validate(config: &Config, problem: &mut impl FnMut(String, String)) {
    let c = &config.cluster;
    if c.refresh < MIN_CLUSTER_REFRESH {
        problem(
            "cluster.refresh".into(),
            format!(
                "must be at least {}",
                humantime::format_duration(MIN_CLUSTER_REFRESH)
            ),
        );
    }
    check_at_most_max("cluster.refresh", c.refresh, problem);
    if let Some(hold_off) = c.hold_off {
        if hold_off < c.refresh {
            problem(
                "cluster.hold_off".into(),
                "must be at least refresh: a member must see the others' change first".into(),
            );
        }
        check_at_most_max("cluster.hold_off", hold_off, problem);
    }
    // Only where the key is written: an inherited value is [pool]'s own problem,
    // reported once at `pool.cluster_max_connections` (where it was set).
    let key = "cluster_max_connections";
    let pools = std::iter::once(("pool".to_string(), config.pool.cluster_max_connections)).chain(
        config
            .upstream
            .iter()
            .enumerate()
            .filter(|(_, u)| u.sets(key))
            .map(|(i, u)| {
                (
                    format!("upstream[{i}]"),
                    u.pool(&config.pool).cluster_max_connections,
                )
            }),
    );
    for (at, total) in pools {
        match total {
            Some(0) => problem(
                format!("{at}.cluster_max_connections"),
                "must be at least 1 when set (leave it unset for no cluster-wide cap)".into(),
            ),
            Some(_) if c.members.is_none() => problem(
                format!("{at}.cluster_max_connections"),
                "needs [cluster] members: the cap is shared by the members listed there".into(),
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_source_is_dns_or_file_and_anything_else_is_refused() {
        assert_eq!(
            "dns:gw.tether.svc.cluster.local".parse(),
            Ok(Members::Dns("gw.tether.svc.cluster.local".into()))
        );
        assert_eq!(
            "file:/etc/tether/members".parse(),
            Ok(Members::File("/etc/tether/members".into()))
        );
        for bad in ["", "dns:", "file:", "gw.local", "dns:a b", "http://x"] {
            assert!(bad.parse::<Members>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_derived_hold_off_is_two_refreshes_and_the_longest_drain() {
        let mut config = Config::default();
        config.cluster.refresh = Duration::from_secs(5);
        config.proxy.drain_timeout = Duration::from_secs(30);
        config.pool.request_timeout = Duration::from_secs(60);
        assert_eq!(config.cluster.hold_off(&config), Duration::from_secs(70));
        config.pool.request_timeout = Duration::from_secs(10);
        assert_eq!(config.cluster.hold_off(&config), Duration::from_secs(40));
        config.cluster.hold_off = Some(Duration::from_secs(12));
        assert_eq!(config.cluster.hold_off(&config), Duration::from_secs(12));
    }
}
