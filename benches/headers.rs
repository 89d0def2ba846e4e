//! Micro bench of the header work every request and response pays:
//! `strip_hop_by_hop` on an origin's usual response head (nginx's, with
//! `Connection: keep-alive`), on a client's usual request head (no hop-by-hop
//! header at all), and on a head that names a header in `Connection`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tether::proxy::strip_hop_by_hop;

fn head(fields: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in fields {
        headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

fn strip(c: &mut Criterion) {
    let heads = [
        (
            "nginx response",
            head(&[
                ("server", "nginx/1.22.1"),
                ("date", "Tue, 01 Dec 2026 17:00:00 GMT"),
                ("content-type", "application/octet-stream"),
                ("content-length", "1024"),
                ("last-modified", "Tue, 01 Dec 2026 12:00:00 GMT"),
                ("connection", "keep-alive"),
                ("etag", "\"6937f2a0-400\""),
                ("accept-ranges", "bytes"),
            ]),
        ),
        (
            "client request",
            head(&[
                ("host", "registry.test"),
                ("user-agent", "containerd/1.7"),
                ("accept", "*/*"),
                ("authorization", "Bearer t0ken"),
            ]),
        ),
        (
            "connection naming a header",
            head(&[
                ("host", "registry.test"),
                ("connection", "keep-alive, x-trace-hop"),
                ("keep-alive", "timeout=5"),
                ("x-trace-hop", "1"),
                ("accept", "*/*"),
            ]),
        ),
    ];
    let mut group = c.benchmark_group("strip_hop_by_hop");
    for (what, headers) in heads {
        group.bench_function(what, |b| {
            b.iter_batched_ref(|| headers.clone(), strip_hop_by_hop, BatchSize::SmallInput)
        });
    }
    group.finish();
}

criterion_group!(benches, strip);
criterion_main!(benches);
