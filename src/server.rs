//! The HTTP server for operators: `GET /metrics`, `GET /healthz`,
//! `GET /readyz`; and [`Health`], the state the probes read.
//!
//! The run loop reports into [`Health`] (atomics, shared by `Arc`) through
//! its setters; the handlers only read it. The decisions are pure
//! ([`Health::liveness_at`], [`Health::readiness`]) and tested without I/O.
//!
//! - `/healthz` answers "is the process alive and its run loop turning?":
//!   200 `ok` while the loop's last [`Health::heartbeat`] is recent, 503 once
//!   it is older than [`HealthThresholds::heartbeat_timeout`]. It checks
//!   nothing external, so a Postgres or Redis outage never gets evictd
//!   restarted in a loop. The loop must beat while it waits (for a sink, a
//!   reconnect, a standby's lease), not only when changes flow.
//! - `/readyz` answers "can this replica do its job?": 200 `ready: active` when the
//!   source is connected, every sink reachable and the lag at most
//!   [`HealthThresholds::max_lag_bytes`]; otherwise 503 with one line per
//!   failed check. A standby answers 200 `ready: standby` whatever its
//!   connections, so that a Deployment with one active and one standby
//!   replica can roll and a node can be drained.
//! - `/metrics` is [`Metrics::encode`], OpenMetrics text. `prometheus-client`
//!   writes OpenMetrics 1.0 (counter families typed without `_total`,
//!   `# UNIT`, `# EOF`), so it is labelled as such; labelled `text/plain;
//!   version=0.0.4`, Prometheus would parse it with the classic parser, which
//!   would not match the counters' `# TYPE` lines to their samples.
//!
//! The sinks' reachability in [`Health`] is also the `evictd_sink_up` gauge
//! ([`Health::export_to`]), so that `/readyz` and the metric never disagree.
//!
//! [`serve_with`] takes its listener (bound by the caller), its
//! [`ServerLimits`] and a shutdown token, as mini-redis's `server::run`
//! does. Each connection is served by hyper's HTTP/1.1 with keep-alive.
//! **Invariants:** a connection holds one of `max_connections` slots from
//! accept to close, and one more is answered 503 and closed at once
//! (refused, not queued: a flood then costs no memory or descriptors past
//! the cap, and the client learns at once); no connection outlives its
//! limits: a request head must arrive within `header_read_timeout` (an idle
//! keep-alive connection waits for one too), and once it is read the answer
//! must be produced and written within `request_timeout`, so a client that
//! sends half a request, or stops reading, cannot hold a slot. The routes
//! only read: nothing served changes any state.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service as _, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::{HealthThresholds, ServerLimits};
pub use crate::metrics::Role;
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};

/// How long connections still open at shutdown get to finish their request
/// before [`serve`] returns anyway (a scrape takes milliseconds; a client
/// that stalls mid-request must not hold up the process's exit).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What the run loop last reported. Each field is independent, so relaxed
/// atomics suffice: a probe may see one update before another, never a torn
/// value.
#[derive(Debug)]
pub struct Health {
    thresholds: HealthThresholds,
    /// `heartbeat_ms` counts from here.
    epoch: Instant,
    heartbeat_ms: AtomicU64,
    source_connected: AtomicBool,
    /// One entry per configured sink target, fixed at creation.
    sinks: Box<[(String, AtomicBool)]>,
    lag_bytes: AtomicU64,
    standby: AtomicBool,
    /// Where the sinks' reachability is mirrored (`evictd_sink_up`), once
    /// [`Health::export_to`] was called.
    metrics: OnceLock<Arc<Metrics>>,
}

/// `/healthz`'s verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    Alive,
    /// The run loop has not beaten for `silent_for`.
    Stale {
        silent_for: Duration,
        timeout: Duration,
    },
}

/// The header by which `/readyz` names the replica's role (`active` or
/// `standby`) when it is ready, for probes that do not read bodies.
pub(crate) const ROLE_HEADER: &str = "x-evictd-role";

/// `/readyz`'s verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readiness {
    Ready,
    Standby,
    /// Every failed check, in a stable order: source, sinks, lag.
    NotReady(Vec<Unready>),
}

/// One failed readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unready {
    SourceDisconnected,
    SinkUnreachable(String),
    Lagging { bytes: u64, max: u64 },
}

impl fmt::Display for Unready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unready::SourceDisconnected => f.write_str("source: not connected"),
            Unready::SinkUnreachable(target) => write!(f, "sink {target}: unreachable"),
            Unready::Lagging { bytes, max } => write!(f, "lag: {bytes} bytes, over the limit of {max}"),
        }
    }
}

impl Health {
    /// A fresh state for the given sink targets: source not connected, no
    /// sink reachable yet, role active, heartbeat now. Readiness needs
    /// positive reports; liveness starts with the benefit of the doubt.
    pub fn new<S: Into<String>>(thresholds: HealthThresholds, sinks: impl IntoIterator<Item = S>) -> Health {
        Health {
            thresholds,
            epoch: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            source_connected: AtomicBool::new(false),
            sinks: sinks.into_iter().map(|s| (s.into(), AtomicBool::new(false))).collect(),
            lag_bytes: AtomicU64::new(0),
            standby: AtomicBool::new(false),
            metrics: OnceLock::new(),
        }
    }

    /// Mirrors each sink's reachability in `metrics` (`evictd_sink_up`),
    /// from its current value on; the first call wins.
    pub fn export_to(&self, metrics: Arc<Metrics>) {
        for (target, reachable) in self.sinks.iter() {
            metrics.set_sink_up(target, reachable.load(Ordering::Relaxed));
        }
        let _ = self.metrics.set(metrics);
    }

    fn mirror(&self, target: &str, reachable: bool) {
        if let Some(metrics) = self.metrics.get() {
            metrics.set_sink_up(target, reachable);
        }
    }

    /// The run loop is turning: called on every iteration of its `select!`.
    pub fn heartbeat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_source_connected(&self, connected: bool) {
        self.source_connected.store(connected, Ordering::Relaxed);
    }

    /// Records whether `target` answered its last command or probe. A name
    /// that is not one of the targets given to [`Health::new`] is a bug in
    /// the caller; it is logged and ignored.
    pub fn set_sink_reachable(&self, target: &str, reachable: bool) {
        match self.sinks.iter().find(|(name, _)| name == target) {
            Some((_, flag)) => {
                flag.store(reachable, Ordering::Relaxed);
                self.mirror(target, reachable);
            }
            None => tracing::warn!(target, "reachability reported for an unknown sink target"),
        }
    }

    /// Every sink confirmed a batch: all are reachable.
    pub(crate) fn set_all_sinks_reachable(&self) {
        for (target, flag) in &self.sinks {
            flag.store(true, Ordering::Relaxed);
            self.mirror(target, true);
        }
    }

    /// Source lag in bytes (Postgres: server WAL end − acknowledged LSN).
    pub fn set_lag_bytes(&self, bytes: u64) {
        self.lag_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn set_role(&self, role: Role) {
        self.standby.store(role == Role::Standby, Ordering::Relaxed);
    }

    /// Whether the run loop has beaten recently enough, as of `now`.
    pub(crate) fn liveness_at(&self, now: Instant) -> Liveness {
        let last = self.epoch + Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        let silent_for = now.saturating_duration_since(last);
        let timeout = self.thresholds.heartbeat_timeout;
        if silent_for > timeout { Liveness::Stale { silent_for, timeout } } else { Liveness::Alive }
    }

    /// Whether this replica can do its job, and if not, every reason.
    pub(crate) fn readiness(&self) -> Readiness {
        if self.standby.load(Ordering::Relaxed) {
            return Readiness::Standby;
        }
        let mut failed = Vec::new();
        if !self.source_connected.load(Ordering::Relaxed) {
            failed.push(Unready::SourceDisconnected);
        }
        for (target, reachable) in self.sinks.iter() {
            if !reachable.load(Ordering::Relaxed) {
                failed.push(Unready::SinkUnreachable(target.clone()));
            }
        }
        let bytes = self.lag_bytes.load(Ordering::Relaxed);
        if bytes > self.thresholds.max_lag_bytes {
            failed.push(Unready::Lagging { bytes, max: self.thresholds.max_lag_bytes });
        }
        if failed.is_empty() { Readiness::Ready } else { Readiness::NotReady(failed) }
    }
}

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct ServerState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// The routes, without a listener (for tests that call the router directly).
pub(crate) fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the routes on `listener` with the default [`ServerLimits`]
/// until `shutdown` is cancelled (see [`serve_with`]).
pub async fn serve(listener: TcpListener, state: ServerState, shutdown: CancellationToken) -> std::io::Result<()> {
    serve_with(listener, state, ServerLimits::default(), shutdown).await
}

/// Serves the routes on `listener` until `shutdown` is cancelled, within
/// `limits`; then stops accepting, closes idle connections, lets open
/// requests finish for at most [`DRAIN_TIMEOUT`] and returns.
///
/// Cancel `shutdown` last, once the run loop has flushed and acknowledged,
/// so that the probes keep answering while it does.
pub async fn serve_with(
    listener: TcpListener,
    state: ServerState,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let metrics = state.metrics.clone();
    let service = TowerToHyperService::new(router(state));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut last_refusal_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: the listener stays,
                // and accepting again at once would spin.
                tracing::warn!(%error, "cannot accept an HTTP connection");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_connection_refused();
            if last_refusal_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                last_refusal_logged = Some(Instant::now());
                tracing::warn!(
                    max = limits.max_connections,
                    "HTTP connection refused: server.max_connections are open"
                );
            }
            refuse(stream);
            continue;
        };
        connections.spawn(connection(stream, service.clone(), limits, shutdown.clone(), slot));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait()).await.is_err() {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "HTTP connections still open at shutdown were dropped");
    }
    Ok(())
}

/// How long accepting pauses after an error (such as `EMFILE`).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The answer to a connection past `max_connections`, written only if the
/// socket takes it at once: a refusal must not wait on the client.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 26\r\nConnection: close\r\n\r\ntoo many HTTP connections\n";

fn refuse(stream: TcpStream) {
    let _ = stream.try_write(REFUSAL);
    // Dropped: closed without reading the request.
}

/// One connection, HTTP/1.1 with keep-alive, holding its `slot` until it
/// closes: when the client closes it, when a head does not arrive within
/// the header timeout (an idle keep-alive connection too), when a request
/// passes its timeout while its answer is written, or at shutdown (idle at
/// once, busy after [`DRAIN_TIMEOUT`]).
async fn connection(
    stream: TcpStream,
    router: TowerToHyperService<Router>,
    limits: ServerLimits,
    shutdown: CancellationToken,
    slot: OwnedSemaphorePermit,
) {
    let deadline = RequestDeadline::default();
    let io = TokioIo::new(Deadlined { inner: stream, deadline: deadline.clone(), sleep: None });
    let service = service_fn(move |request: axum::http::Request<Incoming>| {
        deadline.start(limits.request_timeout);
        let answer = router.call(request);
        async move {
            match tokio::time::timeout(limits.request_timeout, answer).await {
                Ok(answer) => answer,
                Err(_) => Ok((StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response()),
            }
        }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(DRAIN_TIMEOUT, conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(error) = result {
        // A client's problem (timeouts, resets, bad requests), not ours.
        tracing::debug!(%error, "HTTP connection ended");
    }
    drop(slot);
}

/// When the request being answered on a connection must be written by:
/// set as each request's head is read, read by [`Deadlined`]'s writes.
#[derive(Debug, Clone, Default)]
struct RequestDeadline(Arc<std::sync::Mutex<Option<tokio::time::Instant>>>);

impl RequestDeadline {
    fn start(&self, timeout: Duration) {
        let at = tokio::time::Instant::now().checked_add(timeout);
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = at;
    }

    fn get(&self) -> Option<tokio::time::Instant> {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A socket whose writes fail with `TimedOut` once they wait past the
/// current request's deadline: a client that stops reading its answer
/// cannot hold the connection (and its slot) beyond the request timeout.
struct Deadlined {
    inner: TcpStream,
    deadline: RequestDeadline,
    /// Armed while a write waits.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadlined {
    /// `Pending` from the socket: waits on the deadline too.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let Some(at) = self.deadline.get() else { return Poll::Pending };
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its answer within the request timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn wrote<T>(&mut self, cx: &mut Context<'_>, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Pending => self.stalled(cx).map(Err),
            ready => {
                self.sleep = None;
                ready
            }
        }
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn metrics(State(state): State<ServerState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not encode the metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "could not encode the metrics\n").into_response()
        }
    }
}

async fn healthz(State(state): State<ServerState>) -> Response {
    health_response(state.health.liveness_at(Instant::now()))
}

async fn readyz(State(state): State<ServerState>) -> Response {
    readiness_response(state.health.readiness())
}

fn health_response(liveness: Liveness) -> Response {
    match liveness {
        Liveness::Alive => (StatusCode::OK, "ok\n").into_response(),
        Liveness::Stale { silent_for, timeout } => {
            let body = format!(
                "run loop: no heartbeat for {:.1} s, over the limit of {:.1} s\n",
                silent_for.as_secs_f64(),
                timeout.as_secs_f64()
            );
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
    }
}

fn readiness_response(readiness: Readiness) -> Response {
    match readiness {
        Readiness::Ready => (StatusCode::OK, [(ROLE_HEADER, "active")], "ready: active\n").into_response(),
        Readiness::Standby => (StatusCode::OK, [(ROLE_HEADER, "standby")], "ready: standby\n").into_response(),
        Readiness::NotReady(failed) => {
            let body: String = failed.iter().map(|f| format!("{f}\n")).collect();
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        let thresholds = HealthThresholds { heartbeat_timeout: Duration::from_secs(10), max_lag_bytes: 1000 };
        Health::new(thresholds, ["primary", "eu"])
    }

    fn all_good(h: &Health) {
        h.set_source_connected(true);
        h.set_sink_reachable("primary", true);
        h.set_sink_reachable("eu", true);
        h.set_lag_bytes(1000);
    }

    #[test]
    fn a_fresh_state_is_alive_but_not_ready_until_everything_reported() {
        let h = health();
        assert_eq!(h.liveness_at(Instant::now()), Liveness::Alive);
        assert_eq!(
            h.readiness(),
            Readiness::NotReady(vec![
                Unready::SourceDisconnected,
                Unready::SinkUnreachable("primary".into()),
                Unready::SinkUnreachable("eu".into()),
            ])
        );
    }

    #[test]
    fn ready_when_connected_reachable_and_lag_at_the_limit() {
        let h = health();
        all_good(&h);
        assert_eq!(h.readiness(), Readiness::Ready);
    }

    #[test]
    fn each_failed_check_is_named() {
        let h = health();
        all_good(&h);
        h.set_sink_reachable("eu", false);
        h.set_lag_bytes(1001);
        let Readiness::NotReady(failed) = h.readiness() else { panic!("expected not ready") };
        let lines: Vec<String> = failed.iter().map(ToString::to_string).collect();
        assert_eq!(lines, ["sink eu: unreachable", "lag: 1001 bytes, over the limit of 1000"]);
    }

    #[test]
    fn a_standby_is_ready_whatever_its_connections() {
        let h = health();
        h.set_role(Role::Standby);
        assert_eq!(h.readiness(), Readiness::Standby);
        h.set_role(Role::Active);
        assert!(matches!(h.readiness(), Readiness::NotReady(_)));
    }

    #[test]
    fn an_unknown_sink_target_changes_nothing() {
        let h = health();
        all_good(&h);
        h.set_sink_reachable("nowhere", false);
        assert_eq!(h.readiness(), Readiness::Ready);
    }

    #[test]
    fn exported_reachability_is_the_sink_up_gauge_from_its_current_value_on() {
        let h = health();
        h.set_sink_reachable("primary", true);
        let metrics = Arc::new(Metrics::new());
        h.export_to(metrics.clone());
        let text = metrics.encode().unwrap();
        assert!(text.contains("evictd_sink_up{target=\"primary\"} 1\n"), "{text}");
        assert!(text.contains("evictd_sink_up{target=\"eu\"} 0\n"), "{text}");
        h.set_sink_reachable("primary", false);
        h.set_all_sinks_reachable();
        h.set_sink_reachable("eu", false);
        let text = metrics.encode().unwrap();
        assert!(text.contains("evictd_sink_up{target=\"primary\"} 1\n"), "{text}");
        assert!(text.contains("evictd_sink_up{target=\"eu\"} 0\n"), "{text}");
    }

    #[test]
    fn liveness_goes_stale_after_the_timeout_and_a_heartbeat_revives_it() {
        let h = health();
        let later = Instant::now() + Duration::from_secs(11);
        assert!(matches!(h.liveness_at(later), Liveness::Stale { timeout, .. } if timeout == Duration::from_secs(10)));
        assert_eq!(h.liveness_at(Instant::now() + Duration::from_secs(9)), Liveness::Alive);
        h.heartbeat();
        assert_eq!(h.liveness_at(Instant::now()), Liveness::Alive);
    }

    #[test]
    fn a_clock_before_the_last_heartbeat_counts_as_alive() {
        let h = health();
        h.heartbeat();
        let earlier = Instant::now().checked_sub(Duration::from_secs(60)).unwrap_or_else(Instant::now);
        assert_eq!(h.liveness_at(earlier), Liveness::Alive);
    }
}
