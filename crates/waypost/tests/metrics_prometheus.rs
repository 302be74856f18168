//! The metrics_prometheus example on memory://, scraped as Prometheus would: the metric
//! names documented in `waypost::metrics` appear at `/metrics`, and their values move.

#[allow(dead_code)]
#[path = "../../../examples/metrics_prometheus.rs"]
mod metrics_prometheus;

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypost::Config;

/// `GET /metrics`: the body of a 200 reply.
async fn scrape(addr: SocketAddr) -> String {
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    sock.read_to_string(&mut reply).await.unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_string()
}

/// The value of the series `name{labels}` in a scrape, if present.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_prometheus_on_memory_serves_the_documented_metrics() {
    let handle = PrometheusBuilder::new().install_recorder().unwrap();
    let mut demo = metrics_prometheus::start(
        &Config::from_url("memory://metrics-prometheus-test"),
        handle,
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .expect("start");

    const REGISTERED: &str = r#"waypost_registrations{status="registered"}"#;
    const PICKS: &str = r#"waypost_cache_picks_total{service="metrics-demo"}"#;
    const SNAPSHOTS: &str = r#"waypost_watch_events_total{item="instance",kind="snapshot"}"#;
    const ADDED: &str = r#"waypost_watch_events_total{item="instance",kind="added"}"#;
    const REMOVED: &str = r#"waypost_watch_events_total{item="instance",kind="removed"}"#;
    const WRITES: &str =
        r#"waypost_request_duration_seconds_count{operation="write",outcome="ok"}"#;

    let before = scrape(demo.addr).await;
    assert_eq!(value(&before, REGISTERED), Some(1.0), "{before}");
    assert!(value(&before, SNAPSHOTS) >= Some(1.0), "{before}");
    let picks = value(&before, PICKS).unwrap_or(0.0);
    let added = value(&before, ADDED).unwrap_or(0.0);

    demo.pick(5).unwrap();
    demo.add("d-2", 8002).await.unwrap();
    let after = scrape(demo.addr).await;
    assert_eq!(value(&after, PICKS), Some(picks + 5.0), "{after}");
    assert_eq!(value(&after, REGISTERED), Some(2.0), "{after}");
    assert!(value(&after, ADDED) > Some(added), "{after}");
    assert!(value(&after, WRITES) >= Some(2.0), "{after}");
    assert!(
        after.contains("# TYPE waypost_registrations gauge"),
        "{after}"
    );

    demo.deregister().await.unwrap();
    let gone = scrape(demo.addr).await;
    assert_eq!(value(&gone, REGISTERED), Some(0.0), "{gone}");
    assert!(value(&gone, REMOVED) >= Some(2.0), "{gone}");
}
