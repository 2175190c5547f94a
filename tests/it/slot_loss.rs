//! Issue 11, item 2: a lost slot (dropped, a failover without failover
//! slots, a restore) must never be silently recreated at the current WAL
//! position once evictd has streamed from it: the changes in between would
//! never be invalidated.

use std::time::Duration;

use redis::AsyncCommands as _;
use sqlx::Connection as _;

use super::daemon::{Daemon, exists, fill, redis, redis_url, wait_gone};

/// Streams one change, then stops the daemon cleanly.
async fn stream_once(d: &mut Daemon, r: &mut redis::aio::MultiplexedConnection) {
    d.start().await;
    let item = d.key("item:1");
    fill(r, std::slice::from_ref(&item)).await;
    d.sql("INSERT INTO app.items VALUES (1, 1, 'boots', NULL)").await;
    wait_gone(d, r, &[item], Duration::from_secs(30)).await;
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
}

async fn drop_slot(d: &Daemon) {
    let mut conn = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    // The slot can stay active for a moment after the exit.
    for _ in 0..100 {
        if sqlx::query("SELECT pg_drop_replication_slot($1)").bind(&d.slot).execute(&mut conn).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot drop slot {}", d.slot);
}

async fn slot_exists(d: &Daemon) -> bool {
    let mut conn = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)")
        .bind(&d.slot)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_first_run_creates_the_slot_and_records_the_source() {
    let url = redis_url();
    let mut d = Daemon::new(&url).await;
    let mut r = redis(&url).await;
    assert!(!slot_exists(&d).await);
    stream_once(&mut d, &mut r).await;
    assert!(slot_exists(&d).await);
    let record: std::collections::HashMap<String, String> =
        r.hgetall(format!("evictd:source:{}", d.slot)).await.unwrap();
    assert_eq!(record.get("slot"), Some(&d.slot), "{record:?}");
    assert!(record.get("system_identifier").is_some_and(|s| s.parse::<u64>().is_ok()), "{record:?}");
    assert!(record.get("timeline").is_some_and(|t| t.parse::<u32>().is_ok_and(|t| t >= 1)), "{record:?}");
    d.finish().await;
}

#[tokio::test]
async fn a_lost_slot_that_evictd_streamed_before_refuses_to_start() {
    let url = redis_url();
    let mut d = Daemon::new(&url).await;
    let mut r = redis(&url).await;
    stream_once(&mut d, &mut r).await;
    drop_slot(&d).await;
    // Meanwhile a change evictd will never see.
    d.sql("UPDATE app.items SET name = 'lost' WHERE id = 1").await;

    d.spawn();
    let code = d.wait_exit(Duration::from_secs(20)).await;
    let log = d.log();
    assert_eq!(code, Some(1), "{log}");
    let slot = format!("slot `{}` that evictd streamed from system ", d.slot);
    assert!(log.contains(&slot) && log.contains("is gone"), "the message says what happened: {log}");
    assert!(log.contains("on_slot_loss = \"flush\""), "the message says what to do: {log}");
    assert!(log.contains("stopping") && log.contains("do what the error says"), "the policy's hint is logged: {log}");
    assert!(!slot_exists(&d).await, "the slot was recreated");
    // `check` reports it too, before anyone runs the daemon into it.
    let out = super::support::evictd(&["check", "--config", d.config.to_str().unwrap()]);
    let stderr = super::support::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&slot) && stderr.contains("is gone"), "{stderr}");
    assert!(!slot_exists(&d).await, "check created the slot");
    d.finish().await;
}

#[tokio::test]
async fn a_lost_slot_with_on_slot_loss_flush_bumps_every_namespace_then_streams() {
    let url = redis_url();
    let mut d = Daemon::new(&url).await;
    let config = std::fs::read_to_string(&d.config).unwrap();
    let config = config.replace("create_slot = true\n", "create_slot = true\non_slot_loss = \"flush\"\n");
    std::fs::write(&d.config, config).unwrap();
    let mut r = redis(&url).await;
    stream_once(&mut d, &mut r).await;
    drop_slot(&d).await;
    let namespaces = [format!("evictd:ns:{}_item", d.prefix), format!("evictd:ns:{}_owner_items", d.prefix)];
    // Far above this server's LSNs, as left by another cluster.
    for ns in &namespaces {
        let () = r.set(ns, "900000000000").await.unwrap();
    }

    d.start().await;
    // The flush runs once the new slot is held, before the first batch.
    for ns in &namespaces {
        let conn = r.clone();
        d.wait_for(&format!("{ns} to be bumped"), Duration::from_secs(20), || {
            let mut conn = conn.clone();
            async move {
                let version: String = conn.get(ns).await.ok()?;
                (version != "900000000000").then_some(version)
            }
        })
        .await;
        let version: String = r.get(ns).await.unwrap();
        assert_eq!(version, "900000000001", "{ns} was raised once: {}", d.log());
    }
    // Logged once the sink confirmed the bumps, a moment after they landed.
    d.wait_for("the flush in the log", Duration::from_secs(10), || async {
        d.log().contains("bumped every cache's namespace").then_some(())
    })
    .await;
    // And it streams: a change after the restart is invalidated.
    let item = d.key("item:2");
    fill(&mut r, std::slice::from_ref(&item)).await;
    d.sql("INSERT INTO app.items VALUES (2, 1, 'socks', NULL)").await;
    wait_gone(&d, &r, std::slice::from_ref(&item), Duration::from_secs(30)).await;
    assert!(!exists(&mut r, &item).await);

    // The record now describes the new slot: a restart streams without a flush.
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    for ns in &namespaces {
        let () = r.set(ns, "5").await.unwrap();
    }
    d.start().await;
    // A change streamed after the restart: any flush would have come first.
    let item = d.key("item:3");
    fill(&mut r, std::slice::from_ref(&item)).await;
    d.sql("INSERT INTO app.items VALUES (3, 1, 'hat', NULL)").await;
    wait_gone(&d, &r, std::slice::from_ref(&item), Duration::from_secs(30)).await;
    for ns in &namespaces {
        let version: String = r.get(ns).await.unwrap();
        assert_eq!(version, "5", "{ns} was bumped again");
    }
    d.finish().await;
}
