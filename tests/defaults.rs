//! One source of defaults: the code (`Config::default()`: the `pool_keys!` table and
//! the `DEFAULT_*` consts in `src/config.rs`). The embedded `config/tether.toml` is
//! held to it: every key the file sets has its built-in default, every key commented
//! out shows it, and every key of every section is there, set or commented, so the
//! file documents every knob. Its copy among the fuzz seeds stays identical.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use tether::config::{
    AdminConfig, BudgetConfig, ClusterConfig, Config, DiagnosisConfig, EgressConfig, PoolConfig,
    ProxyConfig, RouteConfig, TransparentConfig, UpstreamConfig, EMBEDDED_CONFIG,
};

/// The field names a derived `Deserialize` asks for: serde hands them to
/// `deserialize_struct`, so this records them and stops. Renames and new fields are
/// seen exactly as the loader sees them, `None`-valued options included.
fn fields<T: for<'de> Deserialize<'de>>() -> BTreeSet<&'static str> {
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("field names recorded")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    struct Names<'a>(&'a mut Option<&'static [&'static str]>);
    impl<'de> Deserializer<'de> for Names<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    let mut names = None;
    let _ = T::deserialize(Names(&mut names));
    names
        .expect("a struct with named fields")
        .iter()
        .copied()
        .collect()
}

/// Every section of `Config` and the keys its struct takes. `[[upstream]]` takes
/// the pool keys as overrides too.
fn schema() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let schema = BTreeMap::from([
        ("proxy", fields::<ProxyConfig>()),
        ("admin", fields::<AdminConfig>()),
        ("egress", fields::<EgressConfig>()),
        ("pool", fields::<PoolConfig>()),
        ("upstream", fields::<UpstreamConfig>()),
        ("route", fields::<RouteConfig>()),
        ("diagnosis", fields::<DiagnosisConfig>()),
        ("budget", fields::<BudgetConfig>()),
        ("transparent", fields::<TransparentConfig>()),
        ("cluster", fields::<ClusterConfig>()),
    ]);
    assert_eq!(
        schema.keys().copied().collect::<BTreeSet<_>>(),
        fields::<Config>(),
        "a section of Config is missing from this test's schema"
    );
    schema
}

/// Sections that hold defaults (not the lists an operator writes).
const DEFAULT_SECTIONS: [&str; 8] = [
    "proxy",
    "admin",
    "egress",
    "pool",
    "diagnosis",
    "budget",
    "transparent",
    "cluster",
];

/// A `key = value` line of the file, set or commented out, in the section above it.
#[derive(Debug)]
struct KeyLine {
    line: usize,
    section: String,
    key: String,
    /// `key = value` as TOML, the comment mark removed.
    text: String,
    commented: bool,
}

/// Reads the file as a person does: a `[section]` or `[[section]]` header, commented
/// out or not, opens a section; `key = value` and `# key = value` lines belong to it.
/// Prose in comments (`# Unset: 16, or max_connections ...`) has no ` = ` after a
/// bare lower-case key, so it is not taken for a key.
fn key_lines(file: &str) -> Vec<KeyLine> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, raw) in file.lines().enumerate() {
        let (commented, line) = match raw.trim().strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, raw.trim()),
        };
        let header = line
            .strip_prefix("[[")
            .and_then(|l| l.strip_suffix("]]"))
            .or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')));
        if let Some(name) = header.filter(|n| is_key(n)) {
            section = name.to_string();
            continue;
        }
        if let Some((key, _)) = line.split_once(" = ").filter(|(k, _)| is_key(k)) {
            out.push(KeyLine {
                line: i + 1,
                section: section.clone(),
                key: key.to_string(),
                text: line.to_string(),
                commented,
            });
        }
    }
    out
}

fn is_key(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// `config` as serde sees it, section by section: every key with its value.
fn sections(config: &Config) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(config).expect("Config serializes") {
        serde_json::Value::Object(map) => map,
        other => panic!("Config serialized as {other}"),
    }
}

/// What is in force, with values a key leaves to the code spelled out: an unset
/// `max_idle` is `min(DEFAULT_MAX_IDLE, max_connections)`.
fn in_force(mut config: Config) -> Config {
    config.pool.max_idle = Some(config.pool.idle_limit());
    config
}

/// Each key of a defaults section whose value in `mine` is not the one in `theirs`.
fn differences(mine: &Config, theirs: &Config) -> Vec<String> {
    let (mine, theirs) = (sections(mine), sections(theirs));
    let mut found = Vec::new();
    for section in DEFAULT_SECTIONS {
        for (key, value) in mine[section].as_object().expect("a table") {
            let other = &theirs[section][key.as_str()];
            if value != other {
                found.push(format!("{section}.{key} = {value}, not {other}"));
            }
        }
    }
    found
}

#[test]
fn every_key_the_embedded_config_sets_has_its_built_in_default() {
    let mut embedded = Config::from_toml(EMBEDDED_CONFIG).expect("the embedded config loads");
    // The quick start's `local` upstream is an example, not a default.
    assert!(Config::default().upstream.is_empty() && Config::default().route.is_empty());
    embedded.upstream.clear();
    embedded.route.clear();
    assert_eq!(
        differences(&embedded, &Config::default()),
        Vec::<String>::new(),
        "keys set to other than the built-in default"
    );
    assert_eq!(embedded, Config::default());
}

#[test]
fn keys_commented_out_in_the_embedded_config_show_their_built_in_defaults() {
    let commented: Vec<KeyLine> = key_lines(EMBEDDED_CONFIG)
        .into_iter()
        .filter(|k| k.commented && DEFAULT_SECTIONS.contains(&k.section.as_str()))
        .collect();
    assert!(!commented.is_empty(), "max_idle is commented out in [pool]");
    let defaults = sections(&in_force(Config::default()));
    // The [cluster] keys and cluster_max_connections go together (a cluster cap
    // needs members): each is loaded with the [cluster] lines.
    let cluster: String = commented
        .iter()
        .filter(|k| k.section == "cluster")
        .map(|k| format!("{}\n", k.text))
        .collect();
    for k in commented {
        let toml = match (k.section.as_str(), k.key.as_str()) {
            ("cluster", _) => format!("[cluster]\n{cluster}"),
            (_, "cluster_max_connections") => {
                format!("[cluster]\n{cluster}[{}]\n{}\n", k.section, k.text)
            }
            _ => format!("[{}]\n{}\n", k.section, k.text),
        };
        let uncommented = Config::from_toml(&toml)
            .unwrap_or_else(|e| panic!("line {}: {:?} does not load: {e}", k.line, k.text));
        // A key unset by default (`max_connections_per_client`) has no TOML value
        // to show: its commented line is the recommended value, which must be valid.
        if defaults[k.section.as_str()][k.key.as_str()].is_null() {
            uncommented
                .validate()
                .unwrap_or_else(|e| panic!("line {}: {:?} is invalid: {e}", k.line, k.text));
            continue;
        }
        assert_eq!(
            differences(&in_force(uncommented), &in_force(Config::default())),
            Vec::<String>::new(),
            "line {}: uncommenting {:?} changes what is in force",
            k.line,
            k.text
        );
    }
}

#[test]
fn the_embedded_config_documents_every_key_and_only_real_ones() {
    let schema = schema();
    let lines = key_lines(EMBEDDED_CONFIG);
    let mut documented: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for k in &lines {
        match schema.get(k.section.as_str()) {
            Some(keys) if keys.contains(k.key.as_str()) => {
                documented
                    .entry(k.section.as_str())
                    .or_default()
                    .insert(k.key.as_str());
            }
            _ => unknown.push(format!("line {}: [{}] {}", k.line, k.section, k.key)),
        }
    }

    let pool = &schema["pool"];
    let mut missing = Vec::new();
    for (section, keys) in &schema {
        for key in keys {
            // `[pool]` documents the keys an `[[upstream]]` may override.
            let pool_override = *section == "upstream" && pool.contains(key);
            let there = documented.get(section).is_some_and(|d| d.contains(key));
            if !there && !pool_override {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(
        unknown.is_empty() && missing.is_empty(),
        "keys tether does not take: {unknown:?}; keys the file does not show: {missing:?}"
    );
}

#[test]
fn an_upstream_given_only_name_and_origin_is_upstream_config_new() {
    // The loader's defaults (serde attributes) and the constructor's are spelled
    // apart in src/config.rs; they must be the same defaults.
    let config = Config::from_toml("[[upstream]]\nname = \"a\"\norigin = \"a.test:80\"\n")
        .expect("a minimal upstream loads");
    assert_eq!(config.upstream, [UpstreamConfig::new("a", "a.test:80")]);
}

#[test]
fn the_fuzz_seed_is_a_copy_of_the_embedded_config() {
    let seed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/config/embedded.toml");
    let seed = std::fs::read_to_string(&seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
    assert!(
        seed == EMBEDDED_CONFIG,
        "fuzz/seeds/config/embedded.toml differs from config/tether.toml: copy it over"
    );
}
