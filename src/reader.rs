//! What applications use to fill the keys evictd invalidates without
//! racing it: the fill guard (`docs/redis-layout.md`, "Fill guard").
//!
//! The race it closes: a reader misses, reads the old row, a writer
//! commits, evictd deletes the key, and *then* the reader's `SET` lands —
//! the old value stays until its TTL. With the guard, the reader takes the
//! key's stamp before reading the database ([`begin_fill`]) and sets the
//! value only if the stamp is unchanged ([`fill`]); evictd writes a new
//! stamp before every invalidation of the key, so a fill that would
//! resurrect an invalidated value is refused.
//!
//! ```no_run
//! # async fn example(con: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
//! use evictd::reader::{Read, fill, read};
//! let key = b"user:{42}:profile";
//! // 1. One round trip: the value, or on a miss the stamp (before the database).
//! match read(con, key, 60_000).await? {
//!     Read::Hit(value) => { /* serve it */ }
//!     Read::Miss { stamp } => {
//!         let value = b"{\"name\":\"Ada\"}"; // 2. read the database
//!         // 3. Guarded SET; `false`: evictd invalidated the key meanwhile:
//!         // serve the value, do not cache it.
//!         let stored = fill(con, key, &stamp, value, 300_000).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [`begin_fill`] takes the stamp alone, for readers that do their own
//! `GET` (or fill without reading first).
//!
//! A key invalidated through tags is registered with [`register`] between
//! the stamp and the database read: stamp, register, read, fill. Registered
//! after the read (or after the fill), evictd can scan the tag's registry
//! between the commit and the registration, find nothing, and the old value
//! stays for its whole TTL.
//!
//! Both calls run scripts on the key's hash slot only, so they work on a
//! Redis Cluster as on a single server.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;

pub use crate::layout::{FILL_BEGIN_LUA, FILL_LUA, READ_LUA, REGISTER_LUA, guard_key, tag_key};

static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(FILL_BEGIN_LUA));
static FILL: LazyLock<Script> = LazyLock::new(|| Script::new(FILL_LUA));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(READ_LUA));
static REGISTER: LazyLock<Script> = LazyLock::new(|| Script::new(REGISTER_LUA));

/// What [`read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Hit(Vec<u8>),
    /// A miss, with the stamp to pass to [`fill`].
    Miss {
        stamp: Vec<u8>,
    },
}

/// Reads `key`; on a miss, also takes its fill-guard stamp (as
/// [`begin_fill`] does), in the same round trip.
pub async fn read<C: ConnectionLike>(con: &mut C, key: &[u8], stamp_ttl_ms: u64) -> redis::RedisResult<Read> {
    let (hit, bytes): (i64, Vec<u8>) = READ.key(key).key(guard_key(key)).arg(stamp_ttl_ms).invoke_async(con).await?;
    Ok(if hit == 1 { Read::Hit(bytes) } else { Read::Miss { stamp: bytes } })
}

/// The current fill-guard stamp of `key`, created if there is none. Call it
/// before reading the database; `stamp_ttl_ms` should match evictd's
/// `fill_guard_ttl_ms` (a fill later than that after this call is refused).
pub async fn begin_fill<C: ConnectionLike>(con: &mut C, key: &[u8], stamp_ttl_ms: u64) -> redis::RedisResult<Vec<u8>> {
    BEGIN.key(guard_key(key)).arg(stamp_ttl_ms).invoke_async(con).await
}

/// Sets `key` to `value` (with a TTL in ms; 0 for none) only if its stamp is
/// still `stamp`. `Ok(false)`: evictd invalidated the key since
/// [`begin_fill`] (or the stamp expired); nothing was written.
pub async fn fill<C: ConnectionLike>(
    con: &mut C,
    key: &[u8],
    stamp: &[u8],
    value: &[u8],
    ttl_ms: u64,
) -> redis::RedisResult<bool> {
    let stored: i64 = FILL.key(key).key(guard_key(key)).arg(stamp).arg(value).arg(ttl_ms).invoke_async(con).await?;
    Ok(stored == 1)
}

/// Registers `key` under each of `tags` (the registry `evictd:tag:{T}`,
/// scored with the key's expiry: now + `ttl_ms`, see [`REGISTER_LUA`]),
/// one script call per tag, each on its tag's slot. Call it **after** taking the stamp ([`read`] or
/// [`begin_fill`]) and **before** reading the database, then [`fill`] with
/// the same `ttl_ms`: evictd's invalidation of a tag that runs after the
/// database read then finds the key and replaces its stamp, so a fill of
/// what was read before the commit is refused. Registered and not filled
/// (a refused fill, a reader that gave up) costs nothing: evictd deletes a
/// missing key, and the registration expires.
pub async fn register<C: ConnectionLike>(
    con: &mut C,
    key: &[u8],
    tags: &[impl AsRef<str>],
    ttl_ms: u64,
) -> redis::RedisResult<()> {
    register_at(con, key, tags, now_ms().saturating_add(ttl_ms)).await
}

/// [`register`] with the key's expiry given, as Unix time in ms: one
/// [`REGISTER_LUA`] call per tag, on the tag's slot.
pub async fn register_at<C: ConnectionLike>(
    con: &mut C,
    key: &[u8],
    tags: &[impl AsRef<str>],
    expire_at_ms: u64,
) -> redis::RedisResult<()> {
    for tag in tags {
        let () = REGISTER.key(tag_key(tag.as_ref())).arg(key).arg(expire_at_ms).invoke_async(con).await?;
    }
    Ok(())
}

/// Unix time in ms (0 before 1970: a registration then expires at once).
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
