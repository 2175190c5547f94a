//! The HTTP server over real TCP: each endpoint's status and body as the
//! health state changes, and shutdown through the token. The client is a few
//! lines of HTTP/1.1 over a `TcpStream`, so no HTTP client crate is needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd::change::Operation;
use evictd::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};
use evictd::server::{DRAIN_TIMEOUT, Health, HealthThresholds, Role, ServerLimits, ServerState, serve, serve_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest any single step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    state: ServerState,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(thresholds: HealthThresholds) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state =
        ServerState { metrics: Arc::new(Metrics::new()), health: Arc::new(Health::new(thresholds, ["primary"])) };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, state.clone(), shutdown.clone()));
    Running { addr, state, shutdown, task }
}

fn relaxed() -> HealthThresholds {
    HealthThresholds { heartbeat_timeout: Duration::from_secs(60), max_lag_bytes: 1000 }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn request(path: &str, close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: evictd\r\n{connection}\r\n")
}

/// Reads one reply (the server always sends a Content-Length here).
async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
            let headers: Vec<(String, String)> = lines
                .map(|l| l.split_once(':').unwrap())
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().unwrap())
                .expect("a Content-Length header");
            if buf.len() >= end + 4 + length {
                let body = String::from_utf8(buf[end + 4..end + 4 + length].to_vec()).unwrap();
                return Reply { status, headers, body };
            }
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-reply after {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One GET over a fresh connection (also used by the daemon tests).
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request(path, true).as_bytes()).await.unwrap();
        read_reply(&mut stream).await
    };
    tokio::time::timeout(STEP, exchange).await.expect("a reply in time")
}

/// Polls `path` until its status is `status`, failing after [`STEP`].
async fn wait_for_status(addr: SocketAddr, path: &str, status: u16) -> Reply {
    let deadline = Instant::now() + STEP;
    loop {
        let reply = get(addr, path).await;
        if reply.status == status {
            return reply;
        }
        assert!(Instant::now() < deadline, "{path} still answers {reply:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all_good(health: &Health) {
    health.set_source_connected(true);
    health.set_sink_reachable("primary", true);
    health.set_lag_bytes(10);
}

#[tokio::test]
async fn metrics_are_served_as_openmetrics_text() {
    let server = start(relaxed()).await;
    server.state.metrics.changes_received("public.users", Operation::Insert, 2);
    let reply = get(server.addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    assert!(reply.body.contains("\nevictd_changes_received_total{table=\"public.users\",op=\"insert\"} 2\n"));
    assert!(reply.body.contains(&format!("evictd_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))));
    assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);
}

#[tokio::test]
async fn readyz_names_every_failed_check_until_all_pass() {
    let server = start(relaxed()).await;
    let health = &server.state.health;

    let reply = get(server.addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (503, "source: not connected\nsink primary: unreachable\n"));

    all_good(health);
    let reply = get(server.addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ready: active\n"));

    health.set_source_connected(false);
    let reply = get(server.addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (503, "source: not connected\n"));

    health.set_source_connected(true);
    health.set_lag_bytes(5000);
    let reply = get(server.addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (503, "lag: 5000 bytes, over the limit of 1000\n"));
}

#[tokio::test]
async fn a_standby_reports_ready_so_a_deployment_can_roll() {
    let server = start(relaxed()).await;
    server.state.health.set_role(Role::Standby);
    let reply = get(server.addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ready: standby\n"));
    // Liveness does not depend on the role.
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn healthz_fails_when_the_heartbeat_goes_stale_and_recovers_on_the_next() {
    let thresholds = HealthThresholds { heartbeat_timeout: Duration::from_millis(300), max_lag_bytes: 1000 };
    let server = start(thresholds).await;
    let health = &server.state.health;

    health.heartbeat();
    let reply = get(server.addr, "/healthz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));

    let reply = wait_for_status(server.addr, "/healthz", 503).await;
    assert!(reply.body.starts_with("run loop: no heartbeat for "), "{}", reply.body);
    assert!(reply.body.ends_with(" s, over the limit of 0.3 s\n"), "{}", reply.body);
    // A wedged loop is not a readiness problem: readiness keeps its own checks.
    all_good(health);
    assert_eq!(get(server.addr, "/readyz").await.status, 200);

    health.heartbeat();
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn other_paths_and_methods_are_refused() {
    let server = start(relaxed()).await;
    assert_eq!(get(server.addr, "/").await.status, 404);
    let exchange = async {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let post = "POST /metrics HTTP/1.1\r\nHost: evictd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        stream.write_all(post.as_bytes()).await.unwrap();
        read_reply(&mut stream).await
    };
    let reply = tokio::time::timeout(STEP, exchange).await.unwrap();
    assert_eq!(reply.status, 405);
}

#[tokio::test]
async fn cancelling_the_token_closes_idle_connections_and_returns_at_once() {
    let server = start(relaxed()).await;
    // A scraper's keep-alive connection, idle after its first request.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(request("/healthz", false).as_bytes()).await.unwrap();
    assert_eq!(tokio::time::timeout(STEP, read_reply(&mut idle)).await.unwrap().status, 200);

    let started = Instant::now();
    server.shutdown.cancel();
    let result = tokio::time::timeout(STEP, server.task).await.expect("serve returns");
    result.unwrap().unwrap();
    assert!(started.elapsed() < DRAIN_TIMEOUT, "took {:?}: waited for the idle connection", started.elapsed());

    let mut rest = Vec::new();
    let n = tokio::time::timeout(STEP, idle.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(n, 0, "the idle connection was closed without another reply");
    assert!(TcpStream::connect(server.addr).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn a_stalled_request_delays_shutdown_by_the_drain_timeout_at_most() {
    let server = start(relaxed()).await;
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(b"GET /metrics HTTP/1.1\r\nHost: evi").await.unwrap();
    // Make sure the server has accepted it before shutting down.
    assert_eq!(get(server.addr, "/healthz").await.status, 200);

    let started = Instant::now();
    server.shutdown.cancel();
    let result = tokio::time::timeout(DRAIN_TIMEOUT + STEP, server.task).await.expect("serve returns");
    result.unwrap().unwrap();
    assert!(started.elapsed() < DRAIN_TIMEOUT + Duration::from_secs(2), "took {:?}", started.elapsed());
}

async fn start_with(limits: ServerLimits) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state =
        ServerState { metrics: Arc::new(Metrics::new()), health: Arc::new(Health::new(relaxed(), ["primary"])) };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_with(listener, state.clone(), limits, shutdown.clone()));
    Running { addr, state, shutdown, task }
}

/// Reads until the server closes the connection (EOF or reset); how long
/// that took.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut chunk)).await.expect("the server closes the connection") {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

/// Issue 15, item 6: a client that sends half a request head (slowloris)
/// is cut off once the header timeout passes, and its slot is free again:
/// with one slot, `/healthz` answers right after.
#[tokio::test]
async fn a_client_sending_half_a_request_is_cut_off_after_the_header_timeout_and_frees_its_slot() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(5),
        max_connections: 1,
    };
    let server = start_with(limits).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: evi").await.unwrap();
    let closed_after = until_closed(&mut slow, STEP).await;
    assert!(closed_after >= Duration::from_millis(250), "closed after {closed_after:?}, before the timeout");
    assert!(closed_after < Duration::from_secs(3), "closed only after {closed_after:?}");
    // The one slot is free again (once the connection's task ended).
    wait_for_status(server.addr, "/healthz", 200).await;
    // A connection that sends nothing at all is cut off the same way.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let closed_after = until_closed(&mut silent, STEP).await;
    assert!(closed_after >= Duration::from_millis(250), "closed after {closed_after:?}");
    wait_for_status(server.addr, "/healthz", 200).await;
}

/// Issue 15, item 6: with `max_connections` open, one more connection is
/// answered 503 and closed (and counted); once one of them closes,
/// `/healthz` answers again.
#[tokio::test]
async fn past_the_connection_cap_one_more_is_refused_and_healthz_answers_once_a_slot_frees() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(5),
        max_connections: 2,
    };
    let server = start_with(limits).await;
    // Two keep-alive connections, each answered once (so both hold a slot), then idle.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(request("/healthz", false).as_bytes()).await.unwrap();
        assert_eq!(tokio::time::timeout(STEP, read_reply(&mut stream)).await.unwrap().status, 200);
        held.push(stream);
    }
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let _ = third.write_all(request("/healthz", true).as_bytes()).await;
    let reply = tokio::time::timeout(STEP, read_reply(&mut third)).await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (503, "too many HTTP connections\n"));
    until_closed(&mut third, STEP).await;
    let text = server.state.metrics.encode().unwrap();
    assert!(text.contains("\nevictd_http_connections_refused_total 1\n"), "{text}");

    drop(held.pop());
    let reply = wait_for_status(server.addr, "/healthz", 200).await;
    assert_eq!(reply.body, "ok\n");
    // The connection still held keeps working.
    let mut kept = held.pop().unwrap();
    kept.write_all(request("/healthz", false).as_bytes()).await.unwrap();
    assert_eq!(tokio::time::timeout(STEP, read_reply(&mut kept)).await.unwrap().status, 200);
}

/// Issue 15, item 6: a client that asks for an answer larger than the
/// sockets' buffers and stops reading it is cut off once the request
/// timeout passes, freeing its slot.
#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_cut_off_after_the_request_timeout() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_millis(1500),
        max_connections: 1,
    };
    let server = start_with(limits).await;
    // About 16 MB of metrics: more than loopback's socket buffers hold.
    let long = "x".repeat(300);
    for i in 0..50_000 {
        server.state.metrics.changes_received(&format!("s.{long}{i}"), Operation::Insert, 1);
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server.addr).await.unwrap();
    stalled.write_all(request("/metrics", false).as_bytes()).await.unwrap();
    // Never read: the server's writes stall, then the request times out.
    let started = Instant::now();
    let reply = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(started.elapsed() < Duration::from_secs(20), "the stalled client still holds the only slot");
        let attempt = async {
            let mut stream = TcpStream::connect(server.addr).await.ok()?;
            stream.write_all(request("/healthz", true).as_bytes()).await.ok()?;
            Some(read_reply(&mut stream).await)
        };
        match tokio::time::timeout(STEP, attempt).await {
            Ok(Some(reply)) if reply.status == 200 => break reply,
            _ => continue,
        }
    };
    assert_eq!(reply.body, "ok\n");
    assert!(started.elapsed() >= Duration::from_millis(1000), "freed after {:?}", started.elapsed());
    drop(stalled);
}
