//! `[cluster]` and `cluster_max_connections`: what loads, what is refused with its
//! key path, and the environment override a Deployment sets `self` with.
// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use figment::Jail;
use tether::config::{Config, Members};

fn jail_err(e: tether::config::ConfigError) -> figment::Error {
    figment::Error::from(e.to_string())
}

#[test]
fn a_cluster_cap_is_a_pool_key_an_upstream_overrides() {
    let config = Config::from_toml(
        r#"
        [cluster]
        members = "file:/etc/tether/members"
        self = "10.1.2.3"
        refresh = "2s"
        [pool]
        cluster_max_connections = 16
        [[upstream]]
        name = "registry"
        origin = "registry.test:443"
        cluster_max_connections = 6
        [[upstream]]
        name = "auth"
        origin = "auth.test:443"
        "#,
    )
    .expect("loads");
    assert_eq!(
        config.cluster.members,
        Some(Members::File("/etc/tether/members".into()))
    );
    assert_eq!(config.cluster.refresh, Duration::from_secs(2));
    let pools: Vec<_> = config
        .upstream
        .iter()
        .map(|u| u.pool(&config.pool).cluster_max_connections)
        .collect();
    assert_eq!(pools, [Some(6), Some(16)]);
    assert_eq!(
        Config::default().pool.cluster_max_connections,
        None,
        "no cluster cap unless asked for"
    );
}

#[test]
fn cluster_problems_are_reported_together_with_their_key_paths() {
    let err = Config::from_toml(
        r#"
        [cluster]
        members = "dns:gw.tether.svc.cluster.local"
        refresh = "1ms"
        hold_off = "0s"
        [[upstream]]
        name = "a"
        origin = "a.test:80"
        cluster_max_connections = 0
        "#,
    )
    .unwrap_err();
    let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
    for path in [
        "cluster.refresh",
        "cluster.hold_off",
        "upstream[0].cluster_max_connections",
    ] {
        assert!(paths.contains(&path), "{path} not reported: {err}");
    }
    let err = Config::from_toml("[pool]\ncluster_max_connections = 8\n").unwrap_err();
    assert_eq!(err.0[0].path, "pool.cluster_max_connections");
    assert!(err.0[0].message.contains("[cluster] members"), "{err}");
    // Inherited by an upstream, a bad [pool] value is reported once, where it was
    // written, not again under every upstream that inherits it.
    let err = Config::from_toml(
        "[pool]\ncluster_max_connections = 0\n[[upstream]]\nname = \"a\"\norigin = \"a.test:80\"\n",
    )
    .unwrap_err();
    let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["pool.cluster_max_connections"], "{err}");
}

#[test]
fn a_members_source_other_than_dns_or_file_is_refused() {
    let err =
        Config::from_toml("[cluster]\nmembers = \"10.0.0.1,10.0.0.2\"\nself = \"10.0.0.1\"\n")
            .unwrap_err();
    assert_eq!(err.0[0].path, "cluster.members", "{err}");
    assert!(err.to_string().contains("dns:NAME"), "{err}");
    let err = Config::from_toml("[cluster]\nmembers = \"dns:gw\"\nself = \"pod-0\"\n").unwrap_err();
    assert_eq!(err.0[0].path, "cluster.self", "{err}");
}

#[test]
fn self_comes_from_the_environment_as_the_downward_api_sets_it() {
    Jail::expect_with(|jail| {
        jail.set_env("TETHER_CLUSTER__SELF", "10.244.1.7");
        jail.set_env("TETHER_CLUSTER__MEMBERS", "dns:gw.tether.svc.cluster.local");
        let config = Config::from_toml_and_env("[pool]\ncluster_max_connections = 16\n")
            .map_err(jail_err)?;
        assert_eq!(
            config.cluster.self_addr,
            Some("10.244.1.7".parse().unwrap())
        );
        assert_eq!(
            config.cluster.members,
            Some(Members::Dns("gw.tether.svc.cluster.local".into()))
        );
        Ok(())
    });
}
