//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! `/debug/pools` and `/debug/clients` (JSON), and the status page at `/`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

const STATUS_PAGE: &str = include_str!("status.html");

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(ok) => ok,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &shared)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shared.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => with_type(
            shared.telemetry.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/debug/pools" => json(&pools_json(shared)),
        "/debug/clients" => json(&serde_json::json!({ "clients": shared.downstream.clients() })),
        "/" => with_type(
            STATUS_PAGE.replace("/*SNAPSHOT*/null", &pools_json(shared).to_string()),
            "text/html; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Every pool: limits, counts by state, queue depth, one entry per socket.
pub fn pools_json(shared: &Shared) -> serde_json::Value {
    let pools: Vec<_> = shared
        .all_upstreams()
        .iter()
        .map(|u| u.pool.snapshot())
        .collect();
    serde_json::json!({
        "downstream": { "open": shared.downstream.open() },
        "pools": pools,
    })
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    with_type(
        serde_json::to_string_pretty(value).expect("json"),
        "application/json",
    )
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = with_type(body.to_string(), "text/plain; charset=utf-8");
    *resp.status_mut() = status;
    resp
}

fn with_type(body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
