//! Micro benches of the governed pool's hot paths, over in-memory connections so
//! only tether's bookkeeping is measured:
//! - checkout + check-in when an idle connection is there (hit),
//! - checkout of a fresh slot + its release when none is (miss),
//! - one reaper pass over 10,000 idle connections, none expired and all expired.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tether::config::PoolConfig;
use tether::policy::Origin;
use tether::telemetry::Telemetry;
use tether::testkit::memory::fill_idle;
use tether::upstream::{Checkout, Pool};

fn pool(config: PoolConfig) -> Pool {
    let telemetry = Telemetry::new();
    let origin = Origin::parse_authority("bench.test:80").unwrap();
    Pool::new(
        "bench",
        tether::upstream::connect::Connector::plain(origin, false),
        config,
        &telemetry,
    )
}

fn checkout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hit_pool = rt.block_on(async { pool(PoolConfig::default()) });
    let _held = rt.block_on(fill_idle(&hit_pool, 1));
    c.bench_function("checkout+checkin (hit)", |b| {
        b.to_async(&rt).iter(|| async {
            let Checkout::Reused(p) = hit_pool.checkout().await.unwrap() else {
                unreachable!()
            };
            p.check_in();
        })
    });
    let miss_pool = rt.block_on(async { pool(PoolConfig::default()) });
    c.bench_function("checkout+release (miss)", |b| {
        b.to_async(&rt).iter(|| async {
            let Checkout::Connect(slot) = miss_pool.checkout().await.unwrap() else {
                unreachable!()
            };
            drop(slot);
        })
    });
}

fn reaper(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = PoolConfig {
        max_connections: 10_000,
        max_idle: Some(10_000),
        idle_timeout: Duration::from_secs(3600),
        reap_interval: Duration::from_secs(3600),
        ..PoolConfig::default()
    };
    let pool_none = rt.block_on(async { pool(config.clone()) });
    let _held = rt.block_on(fill_idle(&pool_none, 10_000));
    let mut group = c.benchmark_group("reaper pass over 10,000 idle");
    group.sample_size(20);
    group.bench_function("none expired", |b| {
        b.iter(|| assert_eq!(pool_none.reap(), 0))
    });
    group.bench_function("all expired", |b| {
        b.iter_batched(
            || {
                let expiring = PoolConfig {
                    idle_timeout: Duration::from_nanos(1),
                    ..config.clone()
                };
                let p = rt.block_on(async { pool(expiring) });
                let held = rt.block_on(fill_idle(&p, 10_000));
                (p, held)
            },
            |(p, held)| {
                assert_eq!(p.reap(), 10_000);
                (p, held)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, checkout, reaper);
criterion_main!(benches);
