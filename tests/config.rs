//! Configuration loading, precedence and validation, and the `check-config` command.
// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::process::Command;

use figment::Jail;
use tether::config::{Config, EMBEDDED_CONFIG};

fn tether_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    // The test's own environment must not leak TETHER_ overrides into the binary.
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn jail_err(e: tether::config::ConfigError) -> figment::Error {
    figment::Error::from(e.to_string())
}

#[test]
fn env_overrides_beat_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "tether.toml",
            r#"
            [pool]
            max_connections = 8
            idle_timeout = "20s"
            [proxy]
            listen = "127.0.0.1:4000"
            "#,
        )?;
        jail.set_env("TETHER_POOL__MAX_CONNECTIONS", "3");
        jail.set_env("TETHER_PROXY__CLIENT_IDLE_TIMEOUT", "5s");
        let config = Config::load(Some(Path::new("tether.toml"))).map_err(jail_err)?;
        assert_eq!(config.pool.max_connections, 3, "env beats file");
        assert_eq!(
            config.pool.idle_timeout.as_secs(),
            20,
            "file beats defaults"
        );
        assert_eq!(config.proxy.client_idle_timeout.as_secs(), 5);
        assert_eq!(config.proxy.listen.port(), 4000);
        assert_eq!(config.pool.queue_limit, 1024, "defaults fill the rest");
        Ok(())
    });
}

#[test]
fn the_embedded_default_is_valid_and_used_without_a_file() {
    Jail::expect_with(|_| {
        let config = Config::load(None).map_err(jail_err)?;
        assert_eq!(config, Config::from_toml(EMBEDDED_CONFIG).unwrap());
        assert_eq!(config.proxy.listen.to_string(), "127.0.0.1:3128");
        assert_eq!(config.upstream[0].name, "local");
        Ok(())
    });
}

#[test]
fn a_missing_explicit_config_file_is_an_error() {
    let err = Config::load(Some(Path::new("/nonexistent/tether.toml"))).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn unknown_keys_are_errors_with_their_path() {
    let err = Config::from_toml("[pool]\nmax_conections = 3\n").unwrap_err();
    assert_eq!(err.0[0].path, "pool.max_conections");
    assert_eq!(err.0[0].at, "<toml>:2");
    assert!(
        err.0[0].message.contains("did you mean `max_connections`"),
        "{err}"
    );
    let err =
        Config::from_toml("[[upstream]]\nname = \"a\"\norigin = \"a:1\"\nbogus = 1\n").unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
}

#[test]
fn durations_are_human_strings() {
    let config =
        Config::from_toml("[pool]\nidle_timeout = \"1m 30s\"\nqueue_timeout = \"250ms\"\n")
            .unwrap();
    assert_eq!(config.pool.idle_timeout.as_secs(), 90);
    assert_eq!(config.pool.queue_timeout.as_millis(), 250);
    assert!(Config::from_toml("[pool]\nidle_timeout = \"soon\"\n").is_err());
}

#[test]
fn durations_past_100_years_are_refused_rather_than_overflowing_deadlines() {
    // tether adds durations to the clock; "300000000000y" parsed, validated, and then
    // panicked on the request path ("overflow when adding duration to instant").
    let err = Config::from_toml(
        "[pool]\nrequest_timeout = \"300000000000y\"\n[proxy]\ndrain_timeout = \"101y\"\n\
         [[upstream]]\nname = \"a\"\norigin = \"a:80\"\nreap_interval = \"200y\"\n",
    )
    .unwrap_err();
    let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"pool.request_timeout"), "{err}");
    assert!(paths.contains(&"proxy.drain_timeout"), "{err}");
    assert!(paths.contains(&"upstream[0].reap_interval"), "{err}");
    assert!(Config::from_toml("[pool]\nmax_lifetime = \"100y\"\n").is_ok());
}

#[test]
fn upstream_overrides_apply_to_its_pool_only() {
    let config = Config::from_toml(
        r#"
        [pool]
        max_connections = 10
        [[upstream]]
        name = "a"
        origin = "a.example:80"
        max_connections = 2
        idle_timeout = "5s"
        [[upstream]]
        name = "b"
        origin = "b.example:80"
        "#,
    )
    .unwrap();
    let a = config.upstream[0].pool(&config.pool);
    let b = config.upstream[1].pool(&config.pool);
    assert_eq!(
        (a.max_connections, a.idle_timeout.as_secs(), a.idle_limit()),
        (2, 5, 2)
    );
    assert_eq!((b.max_connections, b.idle_timeout.as_secs()), (10, 30));
}

const BAD: &str = r#"
[proxy]
listen = "127.0.0.1:7000"
[admin]
listen = "127.0.0.1:7000"
[pool]
max_connections = 4
max_idle = 9
[[upstream]]
name = "Registry!"
origin = "no-port"
[[upstream]]
name = "auth"
origin = "auth:1"
sni = "auth"
[[route]]
listen = "127.0.0.1:7001"
upstream = "missing"
[egress]
allow = ["*:80"]
"#;

#[test]
fn validation_reports_every_problem_at_once() {
    let err = Config::from_toml(BAD).unwrap_err();
    let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "pool.max_idle",
        "upstream[0].name",
        "upstream[0].origin",
        "upstream[1].tls",
        "route[0].upstream",
        "admin.listen",
        "egress.allow[0]",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
}

#[test]
fn max_header_bytes_too_small_for_ordinary_requests_is_refused_naming_the_minimum() {
    let err = Config::from_toml("[proxy]\nmax_header_bytes = 1023\n").unwrap_err();
    let problem = err
        .0
        .iter()
        .find(|p| p.path == "proxy.max_header_bytes")
        .unwrap_or_else(|| panic!("max_header_bytes not refused: {err}"));
    assert!(
        problem.message.contains("at least 1024"),
        "{}",
        problem.message
    );
    let config = Config::from_toml("[proxy]\nmax_header_bytes = 1024\n").unwrap();
    assert_eq!(
        config.proxy.max_header_bytes, 1024,
        "the minimum itself is fine"
    );
}

#[test]
fn worker_threads_beyond_the_maximum_is_refused_and_a_reload_keeps_the_running_value() {
    let err = Config::from_toml("[proxy]\nworker_threads = 1025\n").unwrap_err();
    let problem = err
        .0
        .iter()
        .find(|p| p.path == "proxy.worker_threads")
        .unwrap_or_else(|| panic!("worker_threads not refused: {err}"));
    assert!(
        problem.message.contains("at most 1024"),
        "{}",
        problem.message
    );
    let running = Config::from_toml("[proxy]\nworker_threads = 2\n").unwrap();
    let mut reloaded = Config::from_toml("[proxy]\nworker_threads = 4\n").unwrap();
    let held = reloaded.keep_restart_only(&running);
    assert_eq!(
        reloaded.proxy.worker_threads, 2,
        "the runtime keeps its threads"
    );
    assert!(
        held.iter().any(|c| c.path == "proxy.worker_threads"),
        "{held:?}"
    );
}

#[test]
fn max_connections_per_client_is_unset_by_default_and_at_least_1_when_set() {
    assert_eq!(Config::default().proxy.max_connections_per_client, None);
    let err = Config::from_toml("[proxy]\nmax_connections_per_client = 0\n").unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|p| p.path == "proxy.max_connections_per_client"),
        "0 not refused: {err}"
    );
    let config = Config::from_toml("[proxy]\nmax_connections_per_client = 1\n").unwrap();
    assert_eq!(config.proxy.max_connections_per_client, Some(1));
}

#[test]
fn check_config_prints_every_error_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD).unwrap();
    let out = tether_bin()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().filter(|l| l.starts_with("error: ")).count() >= 7,
        "{stderr}"
    );
    assert!(
        stderr.contains("route[0].upstream: no upstream is named \"missing\""),
        "{stderr}"
    );
}

#[test]
fn check_config_prints_the_effective_config() {
    let out = tether_bin()
        .args(["check-config"])
        .env("TETHER_POOL__MAX_CONNECTIONS", "5")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = Config::from_toml(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(effective.pool.max_connections, 5);
    assert_eq!(effective.upstream[0].origin, "127.0.0.1:8080");
}

#[test]
fn check_config_rejects_a_missing_file() {
    let out = tether_bin()
        .args(["check-config", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn every_shipped_config_passes_check_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for dir in [
        "config",
        "deploy/sidecar",
        "deploy/sidecar/transparent",
        "deploy/gateway",
    ] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let out = tether_bin()
                    .arg("check-config")
                    .arg("--config")
                    .arg(&path)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 1);
}

#[test]
fn the_transparent_listener_is_off_by_default_and_its_ports_are_checked() {
    let config = Config::from_toml("").unwrap();
    assert!(!config.transparent.enabled);
    assert_eq!(config.transparent.listen.to_string(), "127.0.0.1:15001");
    assert!(!config.transparent.allow_unlisted);
    let err = Config::from_toml(
        r#"
        [proxy]
        listen = "127.0.0.1:15001"
        [transparent]
        enabled = true
        ports = [443, 0, 443, 15001]
        peek_timeout = "0s"
        "#,
    )
    .unwrap_err();
    let mut paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "transparent.listen",
            "transparent.peek_timeout",
            "transparent.ports[1]",
            "transparent.ports[2]",
            "transparent.ports[3]",
        ],
        "{err}"
    );
    assert!(err.to_string().contains("would loop"), "{err}");
}

#[test]
fn the_transparent_section_can_be_set_from_the_environment() {
    Jail::expect_with(|jail| {
        jail.set_env("TETHER_TRANSPARENT__ENABLED", "true");
        jail.set_env("TETHER_TRANSPARENT__ALLOW_UNLISTED", "true");
        let config = Config::from_toml_and_env("").map_err(jail_err)?;
        assert!(config.transparent.enabled && config.transparent.allow_unlisted);
        Ok(())
    });
}

/// `tether --version` names the commit it was built from, so an operator can tell
/// which code a running binary is.
#[test]
fn the_version_names_the_commit_the_binary_was_built_from() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    assert!(
        version.starts_with(&format!("tether {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(head) if head.status.success() => {
            let head = String::from_utf8(head.stdout).unwrap();
            assert!(
                version.contains(&format!("(commit {}", head.trim())),
                "{version} names HEAD {head}"
            );
        }
        _ => eprintln!("no git checkout here: the commit itself is not checked"),
    }
}

/// The file the environment tests override: two named upstreams.
const TWO_UPSTREAMS: &str = r#"
[pool]
max_connections = 16

[[upstream]]
name = "registry"
origin = "registry.example:443"
tls = true

[[upstream]]
name = "auth-server"
origin = "auth.example:443"
tls = true
max_connections = 4
"#;

fn check_config_with_env(toml: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = tether_bin();
    cmd.args(["check-config", "--config"]).arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn an_upstream_is_overridden_from_the_environment_by_its_name() {
    let out = check_config_with_env(
        TWO_UPSTREAMS,
        &[
            ("TETHER_UPSTREAM__REGISTRY__MAX_CONNECTIONS", "8"),
            // `-` in a name is written `_`; any key of the table, durations too.
            ("TETHER_UPSTREAM__AUTH_SERVER__IDLE_TIMEOUT", "7s"),
            (
                "TETHER_EGRESS__ALLOW",
                "[\"*.example:443\", \"b.example:80\"]",
            ),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let effective = Config::from_toml(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let registry = &effective.upstream[0];
    assert_eq!(registry.name, "registry");
    assert_eq!(registry.pool(&effective.pool).max_connections, 8);
    let auth = &effective.upstream[1];
    assert_eq!(
        auth.pool(&effective.pool).max_connections,
        4,
        "file value kept"
    );
    assert_eq!(auth.idle_timeout, Some(std::time::Duration::from_secs(7)));
    assert_eq!(effective.pool.max_connections, 16, "[pool] untouched");
    assert_eq!(effective.egress.allow, ["*.example:443", "b.example:80"]);
}

#[test]
fn a_tether_variable_that_matches_no_key_is_an_error_naming_it_with_a_suggestion() {
    let out = check_config_with_env(
        TWO_UPSTREAMS,
        &[
            ("TETHER_POOL_MAX_CONNECTIONS", "8"),
            ("TETHER_POLL__MAX_CONNECTIONS", "1"),
            ("TETHER_UPSTREAM__REGSTRY__MAX_CONNECTIONS", "2"),
            ("TETHER_UPSTREAM__0__MAX_CONNECTIONS", "2"),
            ("TETHER_POOL", "3"),
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "error: TETHER_POOL_MAX_CONNECTIONS: matches no configuration key; \
         did you mean TETHER_POOL__MAX_CONNECTIONS?",
        "error: TETHER_POLL__MAX_CONNECTIONS: matches no configuration key; \
         did you mean TETHER_POOL__MAX_CONNECTIONS?",
        "error: TETHER_UPSTREAM__REGSTRY__MAX_CONNECTIONS: no [[upstream]] is named \"regstry\"",
        "did you mean REGISTRY?",
        "error: TETHER_UPSTREAM__0__MAX_CONNECTIONS: no [[upstream]] is named \"0\"",
        "error: TETHER_POOL: names the table pool, not a key in it",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in\n{stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), 5, "{stderr}");
}

#[test]
fn an_environment_value_of_the_wrong_type_or_out_of_range_names_the_variable() {
    let out = check_config_with_env(
        TWO_UPSTREAMS,
        &[
            ("TETHER_UPSTREAM__REGISTRY__MAX_CONNECTIONS", "lots"),
            ("TETHER_UPSTREAM__AUTH_SERVER__MIN_CONNECTIONS", "9"),
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "error: TETHER_UPSTREAM__REGISTRY__MAX_CONNECTIONS: upstream[0].max_connections: \
             invalid type: found string \"lots\", expected usize"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "error: TETHER_UPSTREAM__AUTH_SERVER__MIN_CONNECTIONS: upstream[1].min_connections: \
             9 exceeds max_connections (4)"
        ),
        "{stderr}"
    );
}

#[test]
fn the_running_proxy_takes_per_upstream_overrides_too() {
    // `tether run` loads through the same path as check-config: a wrong variable
    // stops it with exit 64 before it binds anything.
    let out = tether_bin()
        .env("TETHER_POLL__MAX_CONNECTIONS", "1")
        .env("TETHER_PROXY__LISTEN", "127.0.0.1:0")
        .env("TETHER_ADMIN__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TETHER_POLL__MAX_CONNECTIONS"), "{stderr}");
}
