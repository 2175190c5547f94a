//! How an application reads and fills keys that evictd invalidates, as laid
//! out in `docs/redis-layout.md`: a `delete` cache read under its namespace
//! version and filled through the fill guard, a `bump` cache read through
//! its version key, and a key registered under tags before the database
//! read and filled through the guard.
//!
//! ```sh
//! scripts/services/redis-start.sh
//! cargo run --example redis_reader -- redis://127.0.0.1:6479
//! ```
//!
//! The "database" is a function; the Redis side is real. The example runs
//! on a standalone Redis; on a Cluster, send the commands that name
//! different slots separately (the registration of each tag is one
//! transaction on that tag's slot).

use evictd::reader::{Read, begin_fill, fill, read, register};
use evictd::sink::redis::layout::{namespace_key, parse_version, stamp, unstamp, versioned_key};
use redis::aio::MultiplexedConnection;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The version stored at `key`; a missing key is version 0.
async fn version(con: &mut MultiplexedConnection, key: &str) -> Result<u64> {
    let stored: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(con).await?;
    match stored {
        None => Ok(0),
        Some(s) => parse_version(&s).ok_or_else(|| format!("{key} does not hold a version").into()),
    }
}

/// `product_detail` (action delete): the key is exactly the rendered
/// template; the value carries the namespace version it was filled under.
async fn product_detail(con: &mut MultiplexedConnection, id: u64) -> Result<Vec<u8>> {
    let key = format!("product:{{{id}}}:detail");
    // Read the namespace version BEFORE the database: a bump that lands
    // after the database read then makes this fill unreachable.
    let ns = version(con, &namespace_key("product_detail")).await?;
    // The fill guard: on a miss, `read` also takes the key's stamp, so the
    // fill below is refused if evictd invalidates the key meanwhile.
    let guard_stamp = match read(con, key.as_bytes(), 60_000).await? {
        Read::Hit(value) => match unstamp(&value, ns) {
            Some(payload) => return Ok(payload.to_vec()),
            // Filled under an older namespace: a miss; take a stamp.
            None => begin_fill(con, key.as_bytes(), 60_000).await?,
        },
        Read::Miss { stamp } => stamp,
    };
    let payload = database(&format!("product {id}"));
    // `false`: invalidated while we read the database; serve it uncached.
    let _cached = fill(con, key.as_bytes(), &guard_stamp, &stamp(ns, &payload), 300_000).await?;
    Ok(payload)
}

/// `sku_price` (action bump): the rendered key is the VERSION key; the
/// data lives at `<key>:v<version>`, which evictd never touches.
async fn sku_price(con: &mut MultiplexedConnection, sku: u64, currency: &str) -> Result<Vec<u8>> {
    let version_key = format!("sku:{{{sku}}}:price:{currency}");
    let ns = version(con, &namespace_key("sku_price")).await?;
    let v = version(con, &version_key).await?;
    let data_key = versioned_key(&version_key, v);
    let cached: Option<Vec<u8>> = redis::cmd("GET").arg(&data_key).query_async(con).await?;
    if let Some(payload) = cached.as_deref().and_then(|c| unstamp(c, ns)) {
        return Ok(payload.to_vec());
    }
    let payload = database(&format!("price of {sku} in {currency}"));
    // Old versions stay unreachable and expire with the TTL given here.
    redis::cmd("SET").arg(&data_key).arg(stamp(ns, &payload)).arg("PX").arg(3_600_000).exec_async(con).await?;
    Ok(payload)
}

/// `search_results` (tags): take the key's stamp, register the key under
/// each tag (scored with its expiry; each registry expires with its
/// longest-lived key), THEN read the database and fill through the guard.
/// Registered before the read, the key is found by evictd's invalidation of
/// any commit the read missed, and that stale fill is refused.
async fn search(con: &mut MultiplexedConnection, category: u64, query: &str) -> Result<Vec<u8>> {
    let key = format!("search:category={category}&page=1&q={query}");
    let ns = version(con, &namespace_key("search_results")).await?;
    let stamp_taken = match read(con, key.as_bytes(), 60_000).await? {
        Read::Hit(cached) => match unstamp(&cached, ns) {
            Some(payload) => return Ok(payload.to_vec()),
            // Filled under an older namespace: a miss. Take a stamp of our own.
            None => begin_fill(con, key.as_bytes(), 60_000).await?,
        },
        Read::Miss { stamp } => stamp,
    };
    let ttl_ms: u64 = 300_000;
    let tags = [format!("category:{category}"), "product:7".to_owned(), "product:9".to_owned()];
    register(con, key.as_bytes(), &tags, ttl_ms).await?;
    let payload = database(&format!("search {query:?} in category {category}"));
    // `false`: a tag was invalidated since the stamp; serve, do not cache.
    fill(con, key.as_bytes(), &stamp_taken, &stamp(ns, &payload), ttl_ms).await?;
    Ok(payload)
}

fn database(what: &str) -> Vec<u8> {
    format!("{{\"value\": \"{what}\"}}").into_bytes()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "redis://127.0.0.1:6479".to_owned());
    let mut con = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let show = |what: &str, v: Vec<u8>| println!("{what}: {}", String::from_utf8_lossy(&v));
    show("product 42", product_detail(&mut con, 42).await?);
    show("product 42 again (cached)", product_detail(&mut con, 42).await?);
    show("sku 101 EUR", sku_price(&mut con, 101, "EUR").await?);
    show("search", search(&mut con, 3, "trail shoes").await?);
    Ok(())
}
