//! The access log: one line per exchange, written at its end with every byte and
//! where the time went; one line per tunnel when it closes; JSON values, no
//! secrets, no debug text.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn the_access_line_of_a_download_is_written_at_its_end_with_every_byte() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    route(&mut config, "a");
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let listener = tether.route_addrs[0];

    let reply = route_get(listener, "/stream/1048576?token=secret").await;
    assert_eq!(reply.body.len(), 1 << 20);
    let body = Bytes::from(vec![b'y'; 300_000]);
    let post = Request::post("/echo")
        .header("host", "x")
        .header("authorization", "Bearer secret")
        .body(Full::new(body))
        .unwrap();
    assert_eq!(send(listener, post).await.status, StatusCode::OK);

    assert!(
        eventually(WAIT, || async { access_lines(&logs).len() >= 2 }).await,
        "two access lines"
    );
    let lines = access_lines(&logs);
    let download = &lines[0];
    assert_eq!(download["upstream"], "a");
    assert_eq!(download["status"], 200);
    assert_eq!(download["path"], "/stream/1048576");
    assert_eq!(download["bytes_out"], 1048576);
    assert_eq!(download["reused"], false);
    assert!(download.get("error").is_none(), "{download}");
    let ttfb = download["ttfb_ms"].as_f64().unwrap();
    let duration = download["duration_ms"].as_f64().unwrap();
    assert!(duration >= ttfb, "{duration} >= {ttfb}");
    for field in ["ttfb_ms", "duration_ms", "queue_ms", "connect_ms"] {
        let ms = download[field].as_f64().unwrap();
        assert_eq!(
            (ms * 1000.0).round() / 1000.0,
            ms,
            "{field} has at most 3 decimals"
        );
    }
    let upload = &lines[1];
    assert_eq!(upload["bytes_in"], 300_000, "{upload}");
    assert_eq!(upload["reused"], true, "{upload}");

    let all = String::from_utf8(logs.bytes()).unwrap();
    assert!(
        !all.contains("secret"),
        "no token or Authorization in the log"
    );
    let ready: serde_json::Value = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["fields"]["message"] == "tether is ready")
        .expect("the startup line");
    let routes = ready["fields"]["routes"].as_str().unwrap();
    assert_eq!(routes, listener.to_string(), "no debug text: {ready}");
    assert!(ready["fields"].get("transparent").is_none(), "{ready}");
    tether.shutdown().await;
}

#[tokio::test]
async fn an_abandoned_download_is_logged_as_client_aborted_when_the_client_leaves() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    route(&mut config, "a");
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let mut client = TcpStream::connect(tether.route_addrs[0]).await.unwrap();
    client
        .write_all(b"GET /gated/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    client.read_exact(&mut first).await.unwrap();
    drop(client);
    let line = &first_access_line(&logs, "the line is written when the client leaves").await;
    assert_eq!(line["error"], "client_aborted", "{line}");
    assert_eq!(line["status"], 200);
    let text = tether.metrics();
    assert_eq!(
        value(
            &text,
            "tether_upstream_errors_total",
            &[("upstream", "a"), ("kind", "client_aborted")]
        ),
        1.0
    );
    tether.shutdown().await;
}

#[tokio::test]
async fn a_tunnel_is_logged_when_it_closes_with_its_bytes_and_reason() {
    let origin = Origin::start().await;
    let config = support::config(&[("a", &origin)]);
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let target = origin.authority();
    let mut stream = tunnel(tether.proxy_addr, &target).await.unwrap();
    let request = b"GET /bytes/5000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    assert!(response.ends_with(&[b'x'; 5000]));
    drop(stream);

    let line = &first_access_line(&logs, "the tunnel's line").await;
    assert_eq!(line["message"], "tunnel closed");
    assert_eq!(line["upstream"], "a");
    assert_eq!(line["target"], target.as_str());
    assert_eq!(line["close"], "remote_closed");
    assert_eq!(line["bytes_in"], request.len());
    assert_eq!(line["bytes_out"], response.len());
    assert!(line["duration_ms"].is_number());
    tether.shutdown().await;
}

/// The line names the path the origin got, not the client's target: a fragment-only
/// absolute-form target goes out as `/` (RFC 9110 §4.2.4, the fragment is never sent).
#[tokio::test]
async fn the_access_log_names_the_path_the_origin_got_for_a_fragment_only_target() {
    let origin = Origin::start().await;
    let config = support::config(&[("a", &origin)]);
    let (logs, _guard) = Captured::install_json();
    let tether = start(config).await;
    let authority = origin.authority();
    let mut client = TcpStream::connect(tether.proxy_addr).await.unwrap();
    let request = format!(
        "GET http://{authority}#x HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let line = &first_access_line(&logs, "an access line").await;
    assert_eq!(line["path"], "/", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    tether.shutdown().await;
}
