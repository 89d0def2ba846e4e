//! What a reload changes: a typed diff of two configurations, and the keys a running
//! instance cannot change (they need a restart).
//!
//! The diff compares the serialized configurations, so a key added to the structs
//! shows up in it without a change here. Tables of an array with a `name` key
//! (`[[upstream]]`) are matched by name, others (`[[route]]`) by position.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use super::Config;

/// The keys a reload cannot apply: listeners bound at start-up, the runtime's
/// threads. A reload that changes one keeps the running value, logs a warning
/// naming it, and applies the rest. (`transparent.ports` is read only by `tether iptables`.)
pub const RESTART_ONLY: [&str; 6] = [
    "proxy.listen",
    "admin.listen",
    "transparent.enabled",
    "transparent.listen",
    // The member source, `self`, `refresh` and `hold_off`: the refresh task is
    // started with them (`cluster_max_connections`, a pool key, applies at once).
    "cluster",
    // The runtime is built before the instance starts.
    "proxy.worker_threads",
];

/// One key whose value changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `pool.max_connections`, `upstream[1].max_idle`.
    pub path: String,
    pub old: String,
    pub new: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} -> {}", self.path, self.old, self.new)
    }
}

/// Everything that differs between two configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// `upstream "b"`, `route[2]`: array tables only the new configuration has.
    pub added: Vec<String>,
    /// Array tables only the old configuration has.
    pub removed: Vec<String>,
    /// Values that changed, by key path (in the new configuration's indices).
    pub changed: Vec<Change>,
}

impl ConfigDiff {
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let (old, new) = (tree(old), tree(new));
        let mut diff = ConfigDiff::default();
        let empty = serde_json::Map::new();
        let keys: std::collections::BTreeSet<&String> = old
            .as_object()
            .unwrap_or(&empty)
            .keys()
            .chain(new.as_object().unwrap_or(&empty).keys())
            .collect();
        for key in keys {
            let (a, b) = (&old[key.as_str()], &new[key.as_str()]);
            match (a.as_array(), b.as_array()) {
                (Some(a), Some(b)) if is_tables(a) || is_tables(b) => {
                    diff.tables(key, a, b);
                }
                _ => diff.values(key, a, b),
            }
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    fn tables(&mut self, key: &str, old: &[Value], new: &[Value]) {
        let named = |v: &Value| v.get("name").and_then(Value::as_str).map(str::to_owned);
        if old.iter().chain(new).all(|v| named(v).is_some()) {
            let by_name = |list: &[Value]| -> BTreeMap<String, (usize, Value)> {
                list.iter()
                    .enumerate()
                    .map(|(i, v)| (named(v).unwrap_or_default(), (i, v.clone())))
                    .collect()
            };
            let (a, b) = (by_name(old), by_name(new));
            for name in a.keys().filter(|n| !b.contains_key(*n)) {
                self.removed.push(format!("{key} {name:?}"));
            }
            for (name, (i, v)) in &b {
                match a.get(name) {
                    None => self.added.push(format!("{key} {name:?}")),
                    Some((_, old)) => self.values(&format!("{key}[{i}]"), old, v),
                }
            }
        } else {
            for (i, v) in new.iter().enumerate() {
                match old.get(i) {
                    Some(o) => self.values(&format!("{key}[{i}]"), o, v),
                    None => self.added.push(format!("{key}[{i}]")),
                }
            }
            for i in new.len()..old.len() {
                self.removed.push(format!("{key}[{i}]"));
            }
        }
    }

    fn values(&mut self, path: &str, old: &Value, new: &Value) {
        if old == new {
            return;
        }
        match (old.as_object(), new.as_object()) {
            (Some(a), Some(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let (x, y) = (
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                    );
                    self.values(&format!("{path}.{k}"), x, y);
                }
            }
            _ => self.changed.push(Change {
                path: path.to_string(),
                old: show(old),
                new: show(new),
            }),
        }
    }
}

impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            parts.push(format!("added {}", self.added.join(", ")));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", self.removed.join(", ")));
        }
        parts.extend(self.changed.iter().map(Change::to_string));
        f.write_str(&parts.join("; "))
    }
}

fn tree(config: &Config) -> Value {
    serde_json::to_value(config).expect("the configuration serializes")
}

fn is_tables(list: &[Value]) -> bool {
    list.iter().any(Value::is_object)
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "unset".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Config {
    /// Keeps `running`'s value of every [`RESTART_ONLY`] key in `self` (a reload's new
    /// configuration); returns the changes that were held back.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<Change> {
        let mut held = Vec::new();
        let mut keep = |path: &str, old: String, new: String| {
            if old != new {
                held.push(Change {
                    path: path.into(),
                    old,
                    new,
                });
            }
        };
        keep(
            RESTART_ONLY[0],
            running.proxy.listen.to_string(),
            self.proxy.listen.to_string(),
        );
        keep(
            RESTART_ONLY[1],
            running.admin.listen.to_string(),
            self.admin.listen.to_string(),
        );
        keep(
            RESTART_ONLY[2],
            running.transparent.enabled.to_string(),
            self.transparent.enabled.to_string(),
        );
        keep(
            RESTART_ONLY[3],
            running.transparent.listen.to_string(),
            self.transparent.listen.to_string(),
        );
        let cluster = |c: &super::ClusterConfig| {
            serde_json::to_string(c).expect("the cluster section serializes")
        };
        keep(
            RESTART_ONLY[4],
            cluster(&running.cluster),
            cluster(&self.cluster),
        );
        keep(
            RESTART_ONLY[5],
            running.proxy.worker_threads.to_string(),
            self.proxy.worker_threads.to_string(),
        );
        self.cluster = running.cluster.clone();
        self.proxy.worker_threads = running.proxy.worker_threads;
        self.proxy.listen = running.proxy.listen;
        self.admin.listen = running.admin.listen;
        self.transparent.enabled = running.transparent.enabled;
        self.transparent.listen = running.transparent.listen;
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    #[test]
    fn upstreams_are_matched_by_name_and_limits_listed_by_path() {
        let old = Config {
            upstream: vec![
                UpstreamConfig::new("a", "a:1"),
                UpstreamConfig::new("b", "b:1"),
            ],
            ..Config::default()
        };
        let mut new = old.clone();
        new.upstream.remove(0);
        new.upstream.push(UpstreamConfig::new("c", "c:1"));
        new.upstream[0].max_connections = Some(3);
        new.pool.idle_timeout = std::time::Duration::from_secs(5);
        let diff = ConfigDiff::between(&old, &new);
        assert_eq!(diff.added, ["upstream \"c\""]);
        assert_eq!(diff.removed, ["upstream \"a\""]);
        assert_eq!(
            diff.changed
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            [
                "pool.idle_timeout: 30s -> 5s",
                "upstream[0].max_connections: unset -> 3"
            ]
        );
        assert!(ConfigDiff::between(&new, &new).is_empty());
    }

    #[test]
    fn restart_only_keys_keep_the_running_value() {
        let running = Config::default();
        let mut new = Config::default();
        new.admin.listen = "127.0.0.1:1".parse().unwrap();
        new.pool.max_connections = 3;
        let held = new.keep_restart_only(&running);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].path, "admin.listen");
        assert_eq!(new.admin.listen, running.admin.listen);
        assert_eq!(new.pool.max_connections, 3, "the rest applies");
    }
}
