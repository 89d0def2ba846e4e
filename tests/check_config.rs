//! `tether check-config` on files with many mistakes of every kind: one run lists
//! them all, each with `file:line` (or the variable that set it) and the key path
//! in one style, a suggestion for misspelt keys, and inherited values blamed where
//! they were written.

use std::process::{Command, Output};

/// Eleven mistakes in a file, of every kind that can coexist with a parse.
const MISTAKES: &str = r#"[proxy]
listen = "127.0.0.1:3128"
max_client_connections = "many"
client_idle_timout = "30s"

[pool]
max_conections = 8
max_idle = 4
idle_timeout = 5

[admin]
listen = "127.0.0.1:3128"

[[upstream]]
name = "registry"
origin = "registry.example:443"
max_connections = 2
tls = "yes"

[[upstream]]
name = "Bad Name"
origin = "nohost"
max_connections = 0

[[route]]
listen = "127.0.0.1:0"
upstream = "regsitry"

[egress]
allow = ["ok.example:443", "bad pattern"]
colour = "blue"
"#;

fn check(toml: &str, env: &[(&str, &str)]) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir.path())
        .args(["check-config", "--config", "tether.toml"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[test]
fn every_mistake_of_every_kind_is_listed_in_one_run_with_where_it_was_written() {
    let (out, stderr) = check(
        MISTAKES,
        &[
            ("TETHER_POOL_MAX_CONNECTIONS", "8"),
            ("TETHER_DIAGNOSIS__TOP_CLIENTS", "0"),
            ("TETHER_UPSTREAM__REGISTRY__QUEUE_LIMIT", "-1"),
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let expected = [
        "error: tether.toml:3: proxy.max_client_connections: invalid type: found string \"many\", expected usize",
        "error: tether.toml:4: proxy.client_idle_timout: unknown key; did you mean `client_idle_timeout`?",
        "error: tether.toml:7: pool.max_conections: unknown key; did you mean `max_connections`?",
        // Set only in [pool]: blamed there, naming the upstream that inherits it.
        "error: tether.toml:8: pool.max_idle: 4 exceeds max_connections (2) in upstream \"registry\" (upstream[0]), which inherits max_idle from [pool]",
        "error: tether.toml:8: pool.max_idle: 4 exceeds max_connections (0) in upstream \"Bad Name\" (upstream[1]), which inherits max_idle from [pool]",
        "error: tether.toml:9: pool.idle_timeout: invalid type: found signed int `5`, expected a duration",
        "error: tether.toml:12: admin.listen: 127.0.0.1:3128 is already used by proxy.listen",
        "error: tether.toml:18: upstream[0].tls: invalid type: found string \"yes\", expected a boolean",
        "error: tether.toml:21: upstream[1].name: \"Bad Name\" must be non-empty and use only a-z, 0-9, '-', '_'",
        "error: tether.toml:22: upstream[1].origin: \"nohost\": a port is required (host:port)",
        "error: tether.toml:23: upstream[1].max_connections: must be at least 1",
        "error: tether.toml:27: route[0].upstream: no upstream is named \"regsitry\"",
        "error: tether.toml:30: egress.allow[1]: \"bad pattern\": expected host:port or host:*",
        "error: tether.toml:31: egress.colour: unknown key (keys here: allow, allow_private)",
        "error: TETHER_DIAGNOSIS__TOP_CLIENTS: diagnosis.top_clients: must be at least 1",
        "error: TETHER_POOL_MAX_CONNECTIONS: matches no configuration key; did you mean TETHER_POOL__MAX_CONNECTIONS?",
        "error: TETHER_UPSTREAM__REGISTRY__QUEUE_LIMIT: upstream[0].queue_limit: invalid value signed int `-1`, expected usize",
    ];
    assert_eq!(stderr.lines().collect::<Vec<_>>(), expected, "\n{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_syntax_error_has_its_line_and_column_and_the_environment_is_still_checked() {
    let (out, stderr) = check(
        "[pool]\nmax_connections = 8\nidle_timeout = \"5s\n[proxy]\n",
        &[("TETHER_POLL__MAX_CONNECTIONS", "1")],
    );
    assert_eq!(out.status.code(), Some(64));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "error: tether.toml:3:19: TOML syntax: invalid basic string",
            "error: TETHER_POLL__MAX_CONNECTIONS: matches no configuration key; did you mean TETHER_POOL__MAX_CONNECTIONS?",
        ],
        "\n{stderr}"
    );
}

#[test]
fn an_upstream_missing_a_required_key_does_not_hide_the_others() {
    let (out, stderr) = check(
        "[[upstream]]\nname = \"a\"\n\n[[upstream]]\nname = \"b\"\norigin = \"b:1\"\nmax_idle = 9\nmax_connections = 2\n",
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "error: tether.toml:1: upstream[0]: missing field `origin`",
            "error: tether.toml:7: upstream[1].max_idle: 9 exceeds max_connections (2)",
        ],
        "\n{stderr}"
    );
}
