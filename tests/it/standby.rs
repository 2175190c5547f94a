//! Two replicas on one slot: one active, one standby; the active one is
//! killed under load and the standby takes over with nothing lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use sqlx::Connection as _;

use super::daemon::{Daemon, redis, redis_url, wait_gone};
use super::server::get;

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.events (id bigint PRIMARY KEY, body text NOT NULL);
";

fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.events"]
key = ["id"]
columns = ["id", "body"]

[caches.{prefix}_event]
key = "{prefix}:event:{{id}}"
[[caches.{prefix}_event.depends]]
table = "app.events"
"#
    )
}

/// Polls `/readyz` at `address` until its body is `body`.
async fn wait_ready(address: std::net::SocketAddr, body: &str, limit: Duration, log: impl Fn() -> String) -> Duration {
    let started = Instant::now();
    loop {
        let reply = get(address, "/readyz").await;
        if reply.status == 200 && reply.body == body {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "/readyz never said {body:?} (last: {} {:?}); log:\n{}",
            reply.status,
            reply.body,
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_standby_takes_over_from_a_killed_active_replica_with_nothing_lost() {
    let url = redis_url();
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, "").await;
    // Standbys retry the lock every 200 ms in this test.
    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        config.replace("status_interval_ms = 100", "status_interval_ms = 100\nstandby_retry_ms = 200"),
    )
    .unwrap();
    d.start().await;
    let active = d.http_address().await;
    wait_ready(active, "ready: active\n", Duration::from_secs(20), || d.log()).await;

    let mut standby = d.spawn_replica("b");
    let standby_address = standby.http_address(Duration::from_secs(20)).await;
    wait_ready(standby_address, "ready: standby\n", Duration::from_secs(20), || standby.log()).await;
    let metrics = get(standby_address, "/metrics").await.body;
    assert!(metrics.lines().any(|l| l == "evictd_active 0"), "the standby's role metric:\n{metrics}");

    // Load: each row's key is cached, then the row is inserted; every
    // committed row's key must end up gone, whoever was active.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pg, stop, prefix) = (d.db.url.clone(), stop.clone(), d.prefix.clone());
        let mut r = redis(&url).await;
        tokio::spawn(async move {
            let mut db = sqlx::PgConnection::connect(&pg).await.unwrap();
            let mut keys = Vec::new();
            let mut id: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let key = format!("{prefix}:event:{id}");
                let () = r.set(&key, "cached").await.unwrap();
                sqlx::query("INSERT INTO app.events VALUES ($1, 'x')").bind(id).execute(&mut db).await.unwrap();
                keys.push(key);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            keys
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    d.kill();
    let takeover = wait_ready(standby_address, "ready: active\n", Duration::from_secs(20), || standby.log()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let keys = writer.await.unwrap();
    assert!(keys.len() > 100, "too little load: {} rows", keys.len());
    let conn = redis(&url).await;
    wait_gone(&d, &conn, &keys, Duration::from_secs(30)).await;
    eprintln!("{} rows; the standby was active {:.2} s after the kill", keys.len(), takeover.as_secs_f64());
    let log = standby.log();
    assert!(log.contains("standby") && log.contains("active"), "the standby says what it did:\n{log}");
    standby.kill();
    d.finish().await;
}
