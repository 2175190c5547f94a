//! The broadcast end to end: `evictd run` publishes one message per applied
//! batch, after the batch's Redis effects, with a sequence number that keeps
//! increasing across a restart.

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
    let first = next(&mut messages).await;
    assert_eq!(first["v"], 1);
    assert_eq!(first["keys"], serde_json::json!([d.key("user:1")]), "broadcast caches only: {first}");
    assert_eq!(first["tags"], serde_json::json!([format!("{}-user:1", d.prefix)]));
    assert_eq!(first["position"]["kind"], "postgres");
    assert!(first["position"]["commit_lsn"].as_str().is_some_and(|l| l.contains('/')), "{first}");
    assert_eq!(first["truncated"], false);
    let seq1 = first["seq"].as_u64().unwrap();

    d.sql("UPDATE app.users SET name = 'grace' WHERE id = 1").await;
    let second = next(&mut messages).await;
    let seq2 = second["seq"].as_u64().unwrap();
    assert_eq!(seq2, seq1 + 1, "one more per message");

    // A restart keeps the sequence going up: it lives in Redis.
    assert_eq!(d.terminate(), Some(0));
    d.start().await;
    d.sql("TRUNCATE app.users").await;
    let third = next(&mut messages).await;
    assert!(third["seq"].as_u64().unwrap() > seq2, "{third}");
    let mut flushed: Vec<String> =
        third["flush"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    flushed.sort();
    assert_eq!(flushed, [format!("{}_by_tag", d.prefix), format!("{}_profile", d.prefix)], "{third}");
    d.finish().await;
}
