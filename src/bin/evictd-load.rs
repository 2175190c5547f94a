//! `evictd-load`: drives row changes into Postgres at a given rate and
//! measures, through Redis keyspace notifications, how long each takes from
//! commit to its key being gone.
//!
//! It updates `shop.products` (the e-commerce example schema), one row per
//! transaction by default (`--per-tx N`: N rows per transaction, one
//! `UPDATE … WHERE id = ANY($1)`), each changed row invalidating
//! `product:{<id>}:detail`. Before a change it caches that key; the moment
//! Redis reports the key deleted is the invalidation. Prints one JSON line
//! of figures.
//!
//! `--once` times a single change instead (no set-up, no settling): it
//! caches one key, commits one update and waits until the key is gone,
//! printing the Unix times of both, so that a caller can measure from
//! another event (e.g. a restart of evictd).
//!
//! ```text
//! evictd-load --pg postgres://… --redis redis://… --rate 1000 --seconds 10
//! evictd-load --pg postgres://… --redis redis://… --rate 10000 --writers 8 --per-tx 4
//! evictd-load --pg postgres://… --redis redis://… --once
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use redis::AsyncCommands as _;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
#[command(about = "Drive row changes into Postgres and time their invalidation in Redis")]
struct Args {
    /// Postgres URL of the database holding the e-commerce example schema.
    #[arg(long)]
    pg: String,
    /// Redis URL evictd invalidates.
    #[arg(long)]
    redis: String,
    /// Changes per second in total; 0 = as fast as the writers go.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to drive changes.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 4)]
    writers: u64,
    /// Distinct rows to update (created on the first run, ids from 1 000 000).
    #[arg(long, default_value_t = 10_000)]
    rows: u64,
    /// How long to wait after the last change for stragglers.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
    /// Rows changed per transaction (one `UPDATE … WHERE id = ANY($1)`).
    #[arg(long, default_value_t = 1)]
    per_tx: u64,
    /// Time one change of an existing row: cache its key, commit, wait
    /// (at most --drain-seconds) until the key is gone.
    #[arg(long)]
    once: bool,
}

const FIRST_ID: u64 = 1_000_000;

fn key(id: u64) -> String {
    format!("product:{{{id}}}:detail")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    if args.once {
        return once(&args).await;
    }
    let per_tx = args.per_tx.max(1);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(args.writers + 1).unwrap_or(8))
        .connect(&args.pg)
        .await?;
    sqlx::query(
        "INSERT INTO shop.products (id, slug, brand_id, category_id, name, description, status, updated_at)
         SELECT g, 'load-' || g, 1, 1, 'load ' || g, '', 'active', now() FROM generate_series($1::bigint, $2::bigint) g
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(FIRST_ID as i64)
    .bind((FIRST_ID + args.rows - 1) as i64)
    .execute(&pool)
    .await?;
    // Let evictd digest the set-up (the first run inserts the rows) before
    // measuring: wait until every logical slot has confirmed the WAL so far.
    let settle_until = Instant::now() + Duration::from_secs(60);
    let now: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&pool).await?;
    while Instant::now() < settle_until {
        let caught_up: Option<bool> = sqlx::query_scalar(
            "SELECT bool_and(confirmed_flush_lsn >= $1::pg_lsn) FROM pg_replication_slots WHERE slot_type = 'logical'",
        )
        .bind(&now)
        .fetch_one(&pool)
        .await?;
        if caught_up.unwrap_or(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client = redis::Client::open(args.redis.as_str())?;
    let mut control = client.get_multiplexed_async_connection().await?;
    let () = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("Kg").query_async(&mut control).await?;
    // When each key was committed (by the writer) and seen deleted (by the listener).
    let committed: Arc<Mutex<HashMap<u64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe("__keyspace@*__:product:{*}:detail").await?;
    let listener = {
        let committed = committed.clone();
        let latencies = latencies.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let seen = Instant::now();
                let payload: String = msg.get_payload().unwrap_or_default();
                if payload != "del" {
                    continue;
                }
                let channel = msg.get_channel_name();
                let Some(id) =
                    channel.split('{').nth(1).and_then(|s| s.split('}').next()).and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                if let Some(at) = committed.lock().await.remove(&id) {
                    latencies.lock().await.push(seen.saturating_duration_since(at));
                }
            }
        })
    };

    let started = Instant::now();
    let end = started + Duration::from_secs(args.seconds);
    let sent = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let pool = pool.clone();
        let client = client.clone();
        let committed = committed.clone();
        let sent = sent.clone();
        let per_writer = if args.rate == 0 { 0 } else { (args.rate / args.writers).max(1) };
        let rows = args.rows;
        let writers_n = args.writers;
        writers.push(tokio::spawn(async move {
            let mut cache = client.get_multiplexed_async_connection().await?;
            let mut n: u64 = 0;
            // One transaction of `per_tx` rows every `interval`.
            let interval = if per_writer == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(per_tx as f64 / per_writer as f64)
            };
            let mut next = Instant::now();
            let mut ids = Vec::with_capacity(per_tx as usize);
            while Instant::now() < end {
                // Ids are spread over the writers, and no id is reused
                // while its last change may still be in flight.
                ids.clear();
                for _ in 0..per_tx {
                    ids.push(FIRST_ID + (w + n * writers_n) % rows);
                    n += 1;
                }
                if let [id] = ids.as_slice() {
                    let () = cache.set(key(*id), "cached").await?;
                    sqlx::query("UPDATE shop.products SET name = name || '.', updated_at = now() WHERE id = $1")
                        .bind(*id as i64)
                        .execute(&pool)
                        .await?;
                } else {
                    let mut pipe = redis::pipe();
                    for id in &ids {
                        pipe.set(key(*id), "cached").ignore();
                    }
                    let () = pipe.query_async(&mut cache).await?;
                    let bound: Vec<i64> = ids.iter().map(|id| *id as i64).collect();
                    sqlx::query(
                        "UPDATE shop.products SET name = name || '.', updated_at = now() WHERE id = ANY($1::bigint[])",
                    )
                    .bind(bound)
                    .execute(&pool)
                    .await?;
                }
                let at = Instant::now();
                let mut committed = committed.lock().await;
                for id in &ids {
                    committed.insert(*id, at);
                }
                drop(committed);
                sent.fetch_add(per_tx, Ordering::Relaxed);
                if !interval.is_zero() {
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let drive = started.elapsed();
    let sent = sent.load(Ordering::Relaxed);
    let drain_until = Instant::now() + Duration::from_secs(args.drain_seconds);
    while Instant::now() < drain_until && !committed.lock().await.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener.abort();
    // A deletion can beat the writer's own bookkeeping (the notification
    // arrives before the commit time is recorded): such a change is not
    // missing, only untimed. Missing means the key is still there.
    let left: Vec<u64> = committed.lock().await.keys().copied().collect();
    let mut missing = 0usize;
    for id in &left {
        let present: bool = control.exists(key(*id)).await?;
        if present {
            missing += 1;
        }
    }
    let untimed = left.len() - missing;
    let mut lat = latencies.lock().await.clone();
    lat.sort();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i.min(lat.len() - 1)].as_secs_f64() * 1000.0
    };
    println!(
        "{{\"target_rate\": {}, \"per_tx\": {per_tx}, \"changes\": {sent}, \"commit_rate\": {:.0}, \"invalidated\": {}, \"untimed\": {untimed}, \"not_invalidated\": {missing}, \"invalidation_rate\": {:.0}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}, \"max_ms\": {:.2}}}",
        args.rate,
        sent as f64 / drive.as_secs_f64(),
        lat.len(),
        (lat.len() + untimed) as f64 / drive.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    Ok(())
}

/// `--once`: one change, timed from its commit (and printed as Unix times,
/// for a caller that measures from something else) until its key is gone.
async fn once(args: &Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use futures_util::StreamExt as _;
    let id = FIRST_ID;
    let db = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&args.pg).await?;
    let client = redis::Client::open(args.redis.as_str())?;
    let mut control = client.get_multiplexed_async_connection().await?;
    let () = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("Kg").query_async(&mut control).await?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(format!("__keyspace@0__:{}", key(id))).await?;
    let () = control.set(key(id), "cached").await?;
    sqlx::query("UPDATE shop.products SET name = name || '.', updated_at = now() WHERE id = $1")
        .bind(id as i64)
        .execute(&db)
        .await?;
    let committed = unix_ns();
    let mut stream = pubsub.into_on_message();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_seconds);
    let gone = loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(msg)) => {
                let payload: String = msg.get_payload().unwrap_or_default();
                if payload == "del" {
                    break Some(unix_ns());
                }
            }
            Ok(None) | Err(_) => break None,
        }
    };
    db.close().await;
    match gone {
        Some(gone) => println!(
            "{{\"commit_unix_ns\": {committed}, \"gone_unix_ns\": {gone}, \"commit_to_gone_ms\": {:.2}}}",
            (gone - committed) as f64 / 1e6
        ),
        None => println!("{{\"commit_unix_ns\": {committed}, \"gone_unix_ns\": null, \"commit_to_gone_ms\": null}}"),
    }
    Ok(())
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
