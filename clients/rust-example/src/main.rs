//! An application that depends on evictd's client alone (no rdkafka, sqlx
//! or HTTP server): it reads `user:{id}:profile` through a local cache kept
//! coherent by the broadcast subscriber, and fills Redis through the fill
//! guard on a miss. The "database" is a function; Redis is real.
//!
//! ```sh
//! cargo run -p evictd-rust-example -- redis://127.0.0.1:6479
//! ```

use std::time::Duration;

use evictd::key::KeyTemplate;
use evictd::reader::{Read, fill, read, register};
use evictd::subscriber::{Load, LocalCache, Servers, Subscriber, SubscriberConfig, Transport};
use redis::aio::MultiplexedConnection;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long values live in Redis, and the fill guard's stamp.
const REDIS_TTL: Duration = Duration::from_secs(300);
const STAMP_TTL_MS: u64 = 60_000;

/// Redis, read through the fill guard: a hit, or the database's value
/// stored only if evictd did not invalidate the key meanwhile.
async fn through_redis(con: &mut MultiplexedConnection, key: &str, tags: &[String]) -> Result<String, Error> {
    let stamp = match read(con, key.as_bytes(), STAMP_TTL_MS).await? {
        Read::Hit(value) => return Ok(String::from_utf8(value)?),
        Read::Miss { stamp } => stamp,
    };
    // Stamp, register, read the database, fill: in that order.
    register(con, key.as_bytes(), tags, REDIS_TTL.as_millis() as u64).await?;
    let value = database(key);
    let _stored = fill(con, key.as_bytes(), &stamp, value.as_bytes(), REDIS_TTL.as_millis() as u64).await?;
    Ok(value)
}

fn database(key: &str) -> String {
    format!("{{\"profile\":\"{key}\"}}")
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "redis://127.0.0.1:6479".to_owned());
    let con = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;

    // 10-20 s local TTLs, in front of 300 s in Redis.
    let local: LocalCache<String> = LocalCache::builder()
        .max_entries(50_000)
        .ttl(Duration::from_secs(10), Duration::from_secs(10))
        .redis_ttl(REDIS_TTL)
        .build();
    let subscriber =
        Subscriber::start(SubscriberConfig::new(Servers::Standalone(url), Transport::Stream), local.clone()).await?;

    let template = KeyTemplate::parse("user:{{{id}}}:profile")?;
    for id in [1_i64, 2, 1] {
        let key = template.render_map(&[("id".to_owned(), evictd::change::Value::Int(id))].into())?;
        let tags = vec![format!("user:{id}")];
        let load = Load::new("user_profile", key.clone()).tags(tags.clone());
        let mut con = con.clone();
        let value = local
            .get_or_load(&load, || async move { through_redis(&mut con, &key, &tags).await })
            .await
            .map_err(|e| e.to_string())?;
        println!("{value}");
    }

    // Read your writes: after a COMMIT, `SELECT pg_current_wal_lsn()` on the
    // same connection gives the LSN to wait for.
    let lsn = "0/0".parse()?;
    let applied = subscriber.wait_applied(lsn, Duration::from_millis(100)).await;
    println!("applied 0/0: {applied}; {:?}", subscriber.stats());
    subscriber.stop().await;
    Ok(())
}
