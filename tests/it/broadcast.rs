//! The broadcast end to end: `evictd run` publishes one message per applied
//! batch, after the batch's Redis effects, with a sequence number that keeps
//! increasing across a restart under the same epoch; its applied position
//! reaches an application's commit LSN (read your writes).

use std::time::Duration;

use futures_util::StreamExt as _;

use super::daemon::{Daemon, redis_url};

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.users (id bigint PRIMARY KEY, name text NOT NULL);
";

fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.users"]
key = ["id"]
columns = ["id", "name"]

[caches.{prefix}_profile]
key = "{prefix}:user:{{id}}"
[[caches.{prefix}_profile.depends]]
table = "app.users"

[caches.{prefix}_quiet]
key = "{prefix}:quiet:{{id}}"
broadcast = false
[[caches.{prefix}_quiet.depends]]
table = "app.users"

[caches.{prefix}_by_tag]
key = "{prefix}:unused:{{id}}"
[[caches.{prefix}_by_tag.depends]]
table = "app.users"
tags = ["{prefix}-user:{{id}}"]
"#
    )
}

/// Waits for the next message on the subscription.
async fn next(messages: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) -> serde_json::Value {
    let msg = tokio::time::timeout(Duration::from_secs(20), messages.next())
        .await
        .expect("a broadcast message within 20 s")
        .expect("the subscription is open");
    let payload: String = msg.get_payload().unwrap();
    serde_json::from_str(&payload).unwrap()
}

#[tokio::test]
async fn every_batch_is_broadcast_with_a_sequence_that_survives_a_restart() {
    let url = redis_url();
    let channel = format!("evictd-test:{}", std::process::id());
    let extra = format!("[redis.primary]\nurl = \"{url}\"\nbroadcast_channel = \"{channel}\"\n");
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, &extra).await;
    let mut pubsub = redis::Client::open(url.as_str()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let mut messages = pubsub.into_on_message();
    d.start().await;

    d.sql("INSERT INTO app.users VALUES (1, 'ada')").await;
    let first = next_batch(&mut messages).await;
    assert_eq!(first["v"], 2);
    assert_eq!(first["kind"], "batch");
    assert_eq!(first["keys"], serde_json::json!([d.key("user:1")]), "broadcast caches only: {first}");
    assert_eq!(first["caches"], serde_json::json!([format!("{}_profile", d.prefix)]));
    assert_eq!(first["tags"], serde_json::json!([format!("{}-user:1", d.prefix)]));
    assert_eq!(first["position"]["kind"], "postgres");
    assert!(first["position"]["commit_lsn"].as_str().is_some_and(|l| l.contains('/')), "{first}");
    assert_eq!(first["applied"]["lsn"], first["position"]["lsn"], "the batch's commit end is applied: {first}");
    assert_eq!(first["truncated"], false);
    let seq1 = first["seq"].as_u64().unwrap();
    let epoch = first["epoch"].as_str().unwrap().to_owned();

    d.sql("UPDATE app.users SET name = 'grace' WHERE id = 1").await;
    let second = next_batch(&mut messages).await;
    let seq2 = second["seq"].as_u64().unwrap();
    assert_eq!(seq2, seq1 + 1, "one more per message");

    // A restart keeps the sequence going up under the same epoch: no
    // spurious reset for subscribers.
    assert_eq!(d.terminate(), Some(0));
    d.start().await;
    d.sql("TRUNCATE app.users").await;
    let third = next_batch(&mut messages).await;
    assert!(third["seq"].as_u64().unwrap() > seq2, "{third}");
    assert_eq!(third["epoch"], epoch.as_str(), "{third}");
    let mut flushed: Vec<String> =
        third["flush"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    flushed.sort();
    assert_eq!(flushed, [format!("{}_by_tag", d.prefix), format!("{}_profile", d.prefix)], "{third}");
    d.finish().await;
}

/// The next batch message, skipping heartbeats.
async fn next_batch(messages: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) -> serde_json::Value {
    loop {
        let message = next(messages).await;
        if message["kind"] != "heartbeat" {
            return message;
        }
    }
}

fn lsn(text: &str) -> u64 {
    text.parse::<evictd::change::Lsn>().unwrap_or_else(|e| panic!("{e}")).0
}

/// Read your writes: after COMMIT, `pg_current_wal_lsn()` on the same
/// connection; the applied position (the hash, then heartbeats) reaches it
/// within seconds, on a graph table and on a table evictd does not follow.
#[tokio::test]
async fn the_applied_position_reaches_an_applications_commit_lsn() {
    let url = redis_url();
    let channel = format!("evictd-test:{}:applied", std::process::id());
    let extra =
        format!("[redis.primary]\nurl = \"{url}\"\nbroadcast_channel = \"{channel}\"\nbroadcast_heartbeat_ms = 200\n");
    let schema = format!("{SCHEMA}CREATE TABLE app.other (id bigint PRIMARY KEY);");
    let mut d = Daemon::custom(&super::support::pg_url(), &url, &schema, graph, &extra).await;
    let mut pubsub = redis::Client::open(url.as_str()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let mut messages = pubsub.into_on_message();
    let mut redis = super::daemon::redis(&url).await;
    let applied_key = evictd::sink::redis::layout::BroadcastKeys::of(&channel).applied;
    d.start().await;

    let mut app = {
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(&d.db.url).await.unwrap()
    };
    for (i, statement) in
        ["INSERT INTO app.users VALUES (7, 'ada')", "INSERT INTO app.other VALUES (1)"].into_iter().enumerate()
    {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(&mut app).await.unwrap();
        let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut app).await.unwrap();
        let written = lsn(&text);
        let started = std::time::Instant::now();
        d.wait_for("the applied position in the hash", Duration::from_secs(10), || {
            let mut redis = redis.clone();
            let key = applied_key.clone();
            async move {
                let stored: Option<String> =
                    redis::cmd("HGET").arg(&key).arg("postgres").query_async(&mut redis).await.unwrap();
                stored.filter(|s| lsn(s) >= written)
            }
        })
        .await;
        let waited = started.elapsed();
        // A heartbeat says it too.
        let beat = loop {
            let message = next(&mut messages).await;
            // Before the first acknowledgement a fresh channel has no applied position.
            if message["kind"] == "heartbeat" && message["applied"]["lsn"].as_str().is_some_and(|l| lsn(l) >= written) {
                break message;
            }
        };
        assert_eq!(beat["applied"]["kind"], "postgres", "{beat}");
        eprintln!("statement {i}: commit {text} applied after {waited:?}");
    }
    let _ = &mut redis;
    d.finish().await;
}
