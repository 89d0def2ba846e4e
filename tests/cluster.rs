//! Cluster-wide caps: three tether instances on 127.0.0.1, 127.0.0.2 and
//! 127.0.0.3 share `cluster_max_connections = 6` to one origin through a member
//! file, under load, while a member leaves and comes back. What the origin holds
//! is counted on its own side, every 2 ms.

mod support;

use std::net::IpAddr;
use std::sync::Arc;

use support::cluster::{
    cluster_config, held, start_member, table, write_members, Load, Sample, Sampler,
};
use support::{eventually, metric, Origin, WAIT};
use tether::Running;

const TOTAL: usize = 6;

fn ips() -> [IpAddr; 3] {
    [1, 2, 3].map(|n| IpAddr::from([127, 0, 0, n]))
}

/// Waits until the instances' caps are `caps` and each holds its cap under load.
async fn settled(members: &[Arc<Running>], caps: &[usize]) {
    let ok = eventually(WAIT, || async {
        members
            .iter()
            .zip(caps)
            .all(|(m, &cap)| held(m) == (cap, cap))
    })
    .await;
    let now: Vec<_> = members.iter().map(|m| held(m)).collect();
    assert!(
        ok,
        "expected caps {caps:?} held under load, have (open, cap) {now:?}"
    );
}

fn gauge(running: &Running, name: &str) -> f64 {
    metric(&running.metrics(), name, &[]).unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_one_cap_and_hand_it_over_only_once_a_leaver_is_gone() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("members");
    let ips = ips();
    write_members(&file, &ips);
    let mut members = Vec::new();
    for ip in ips {
        members.push(start_member(cluster_config(&origin, ip, &file, TOTAL)).await);
    }
    let routes: Vec<_> = members.iter().map(|m| m.route_addrs[0]).collect();
    let sampler = Sampler::start(members.clone(), origin.clone());
    let load = Load::start(&routes, 4, "/delay/5");

    sampler.phase("3 members");
    settled(&members, &[2, 2, 2]).await;
    for m in &members {
        assert_eq!(gauge(m, "tether_cluster_members"), 3.0);
    }

    // 127.0.0.3 leaves the list while it still runs: it gives up its share at once
    // and drains; the others take it over only after the hold-off.
    sampler.phase("127.0.0.3 removed");
    write_members(&file, &ips[..2]);
    settled(&members, &[3, 3, 0]).await;
    assert_eq!(gauge(&members[2], "tether_cluster_self_missing"), 1.0);
    assert_eq!(gauge(&members[0], "tether_cluster_members"), 2.0);

    // It comes back: the others shrink first, it takes its share after.
    sampler.phase("127.0.0.3 back");
    write_members(&file, &ips);
    settled(&members, &[2, 2, 2]).await;
    assert_eq!(gauge(&members[2], "tether_cluster_self_missing"), 0.0);

    let samples = sampler.stop().await;
    load.stop().await;
    println!("{}", table(&samples));
    check(&samples);
    assert!(samples.len() > 100, "only {} samples", samples.len());
}

/// What every sample must show.
fn check(samples: &[Sample]) {
    let mut previous = None;
    for s in samples {
        let open: Vec<usize> = s.members.iter().map(|m| m.0).collect();
        let sum: usize = open.iter().sum();
        assert!(
            s.origin <= TOTAL && sum <= TOTAL,
            "at {} ms ({}): the origin holds {}, the members {open:?}",
            s.at_ms,
            s.phase,
            s.origin
        );
        match s.phase {
            // The others go above 2 only once the leaver holds nothing.
            "127.0.0.3 removed" => assert!(
                open[0].max(open[1]) <= 2 || open[2] == 0,
                "at {} ms: {open:?} while 127.0.0.3 still holds sockets",
                s.at_ms
            ),
            // The returning member takes sockets only once the others are at 2.
            "127.0.0.3 back" => assert!(
                open[2] == 0 || (open[0] <= 2 && open[1] <= 2),
                "at {} ms: 127.0.0.3 holds sockets before the others shrank: {open:?}",
                s.at_ms
            ),
            _ => {}
        }
        // Every member is within its cap, except one whose cap was just lowered,
        // which only lets its exchanges finish: above its cap it never opens more.
        for (i, &(open, cap)) in s.members.iter().enumerate() {
            let before = previous.map_or(0, |p: &Sample| p.members[i].0);
            assert!(
                open <= cap || open <= before,
                "at {} ms ({}): member {} went from {before} to {open} sockets above its cap {cap}",
                s.at_ms,
                s.phase,
                i + 1
            );
        }
        previous = Some(s);
    }
}
