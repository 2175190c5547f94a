//! The Redis key layout evictd writes and reads, and the Lua scripts that
//! touch it. `docs/redis-layout.md` is the user-facing description of the
//! same contract; change both together.
//!
//! - Namespace version of cache `NAME`: the string key `evictd:ns:NAME`.
//! - Version keys (action `bump`) and namespace keys hold a **version**: an
//!   unsigned 64-bit integer in canonical decimal (ASCII digits, no sign, no
//!   leading zeros, `0` for zero), e.g. `"4271093"`. Readers parse it as a
//!   u64; a missing key reads as "no version yet".
//! - Tag registry of tag `T`: the sorted set `evictd:tag:{T}`; member = a
//!   cache key registered under the tag, score = that key's expiry as Unix
//!   time in milliseconds (`+inf` for a key without expiry).
//!
//! - Fill guard of cache key `K`: the string key [`guard_key`]`(K)`, in `K`'s
//!   hash slot; readers create it on a miss ([`READ_LUA`], [`FILL_BEGIN_LUA`])
//!   and fill through [`FILL_LUA`], which refuses once the stamp changed;
//!   evictd replaces an existing one with [`guard_stamp`] (the batch version
//!   and a value unique to the batch's application) before it invalidates `K`.
//! - Broadcast of channel `C` ([`BroadcastKeys`]): `evictd:bc:{C}:seq`,
//!   `:epoch`, `:stream`, `:applied`, `:touched` and `:server`, all in the
//!   hash slot of `{C}`, written together by [`PUBLISH_LUA`] (format v2,
//!   `docs/broadcast.md`).
//! - Source record of a Postgres slot: the hash `evictd:source:<slot>`
//!   (`sink::redis::record`), kept by [`RECORD_LUA`].
//!
//! - Values of caches read under a namespace carry the namespace version
//!   their writer read *before* reading the database: `<ns>|<payload>`
//!   ([`stamp`], [`unstamp`]); evictd never reads or writes them.
//!
//! **Invariants** of the scripts: [`BUMP`] raises a version at every call
//! (never lowers it, never leaves it) and compares exactly for every u64 (digit strings, never Lua numbers, which
//! are doubles); [`FORGET`] removes a registration only if its score is still
//! the one evictd read, so a registration refreshed after the read survives.
//! [`PUBLISH_LUA`] never publishes a `(epoch, seq)` at or below one a
//! subscriber may have seen under the same epoch: when Redis lost the
//! sequence, restarted or was replaced since the last publish, or holds a
//! sequence below the highest the publishing process saw, it starts a new
//! epoch above every number that process knows of.

use redis::Script;

/// Prefix of namespace version keys.
pub(crate) const NAMESPACE_PREFIX: &str = "evictd:ns:";

/// Prefix of tag registries (the tag follows in braces).
pub(crate) const TAG_PREFIX: &str = "evictd:tag:";

/// The namespace version key of a cache.
pub fn namespace_key(cache: &str) -> String {
    format!("{NAMESPACE_PREFIX}{cache}")
}

/// The registry of a tag. The braces make the tag the key's Redis Cluster
/// hash tag, so a registry's slot depends on the tag alone.
pub fn tag_key(tag: &str) -> String {
    format!("{TAG_PREFIX}{{{tag}}}")
}

/// The stream of operator actions (`evictd invalidate`, `slot drop`,
/// `retire`, `dead-letters replay|purge`): one entry per
/// action and target, trimmed to about [`AUDIT_STREAM_MAX_LEN`] entries.
pub const AUDIT_STREAM: &str = "evictd:audit";

/// How many operator actions were audited, by action and outcome: a hash
/// of fields `<action>|<outcome>` to counts (`HINCRBY`), exported by every
/// running daemon as `evictd_operator_actions_total`.
pub const AUDIT_ACTIONS: &str = "evictd:audit:actions";

/// About how many entries [`AUDIT_STREAM`] keeps (`XADD MAXLEN ~`).
pub const AUDIT_STREAM_MAX_LEN: u64 = 10_000;

/// Prefix of fill-guard stamps.
pub(crate) const GUARD_PREFIX: &str = "evictd:guard:";

/// Prefix of a broadcast channel's keys (`{channel}` and a suffix follow).
pub(crate) const BROADCAST_PREFIX: &str = "evictd:bc:";

/// The fill-guard stamp of a cache key: `evictd:guard:` + the key when the
/// key has a hash tag (its tag then stays the first one), else
/// `evictd:guard:{` + key + `}` (the whole key becomes the tag). That is the
/// key's Redis Cluster hash slot whenever [`guard_in_slot`] holds; for the
/// other keys no stamp name can share the key's slot, so on a Cluster they
/// cannot be guarded (and evictd writes them no stamp).
pub fn guard_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(GUARD_PREFIX.len() + key.len() + 2);
    out.extend_from_slice(GUARD_PREFIX.as_bytes());
    if has_hash_tag(key) {
        out.extend_from_slice(key);
    } else {
        out.push(b'{');
        out.extend_from_slice(key);
        out.push(b'}');
    }
    out
}

/// Whether [`guard_key`]`(key)` hashes to `key`'s Redis Cluster slot.
///
/// It does unless `key` has no hash tag (Redis then hashes the whole key)
/// and yet cannot be made one: it contains a `}` (`product:{}:x`, where the
/// value inside `{{…}}` rendered empty; `a}b`, a tag member an application
/// registered), or it is empty. Redis ends a hash tag at the first `}`, so
/// no `{…}` can hold such a key whole.
pub fn guard_in_slot(key: &[u8]) -> bool {
    has_hash_tag(key) || (!key.is_empty() && !key.contains(&b'}'))
}

/// Whether Redis Cluster hashes `key` on a hash tag: a `{` followed later
/// by a `}` with at least one byte between them.
fn has_hash_tag(key: &[u8]) -> bool {
    key.iter()
        .position(|&b| b == b'{')
        .is_some_and(|open| key[open + 1..].iter().position(|&b| b == b'}').is_some_and(|len| len > 0))
}

/// The stamp evictd writes for an invalidation in a batch of `version`:
/// `i<version>`, or `i<version>.<nonce>`. A stamp must change at every
/// invalidation, and batch versions alone do not: Kafka replicas of one
/// group may give two batches the same version, and Postgres LSNs repeat
/// after a restore, across servers, or between two sources on one Redis.
/// The sink passes a nonce unique to each application of a batch (see
/// `RedisSink`). Readers' stamps start with `r`, so the two never collide.
pub(crate) fn guard_stamp(version: &str, instance: Option<u64>) -> String {
    match instance {
        None => format!("i{version}"),
        Some(instance) => format!("i{version}.{instance:016x}"),
    }
}

/// The keys of one broadcast channel `C`: `evictd:bc:{C}:<what>`. The
/// braces make `C` their Redis Cluster hash tag, so [`PUBLISH_LUA`] updates
/// them all in one slot (a channel never contains `}`: the config refuses
/// it, so the tag is exactly `C`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastKeys {
    /// The last sequence number given out (a decimal integer).
    pub seq: String,
    /// The sequence's first value, set with it (a decimal string).
    pub epoch: String,
    /// The stream of messages (field `m`), trimmed to about
    /// `broadcast_stream_max_len` entries.
    pub stream: String,
    /// Per source kind, the highest applied position (`postgres`: `X/Y`).
    pub applied: String,
    /// Per cache name, the `seq` of the last message that invalidated
    /// anything of it; field `*tags`: the last message with tags.
    pub touched: String,
    /// The `run_id` of the Redis server that ran the last publish: another
    /// one means Redis restarted (maybe on an older snapshot) or was
    /// replaced (a failover), so the sequence may have gone back.
    pub server: String,
}

impl BroadcastKeys {
    pub fn of(channel: &str) -> BroadcastKeys {
        let key = |what: &str| format!("{BROADCAST_PREFIX}{{{channel}}}:{what}");
        BroadcastKeys {
            seq: key("seq"),
            epoch: key("epoch"),
            stream: key("stream"),
            applied: key("applied"),
            touched: key("touched"),
            server: key("server"),
        }
    }

    /// In the order [`PUBLISH_LUA`] takes them as `KEYS`.
    pub(crate) fn script_keys(&self) -> [&str; 6] {
        [&self.seq, &self.epoch, &self.stream, &self.applied, &self.touched, &self.server]
    }
}

/// The `touched` field of messages with tags (no cache is named `*tags`:
/// cache names are identifiers).
pub const TOUCHED_TAGS: &str = "*tags";

/// A version as stored: canonical decimal.
pub(crate) fn encode_version(version: u64) -> String {
    version.to_string()
}

/// The data key of version `version` of a `bump` cache's version key:
/// `product:{42}:prices` at version 4271093 → `product:{42}:prices:v4271093`.
pub fn versioned_key(key: &str, version: u64) -> String {
    format!("{key}:v{version}")
}

/// Reads a stored version (canonical decimal; leading zeros tolerated).
/// `None` for anything else. A missing key is version 0 for readers.
pub fn parse_version(stored: &[u8]) -> Option<u64> {
    if stored.is_empty() || !stored.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(stored).ok()?.parse().ok()
}

/// A cached value stamped with the namespace version its writer read
/// before reading the database: `<ns>|<payload>`.
pub fn stamp(namespace: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{namespace}|").into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The payload of a stamped value if it was written under `namespace`,
/// the current namespace version; `None` means a miss (another namespace,
/// or not a stamped value).
pub fn unstamp(value: &[u8], namespace: u64) -> Option<&[u8]> {
    let bar = value.iter().position(|&b| b == b'|')?;
    (parse_version(&value[..bar])? == namespace).then(|| &value[bar + 1..])
}

/// Lua source of [`BUMP`].
///
/// `KEYS[1]` is a version key, `ARGV[1]` the batch version in canonical
/// decimal. The script always raises the stored version: to `ARGV[1]` if
/// that is greater than the version there (or there is none), returning 1;
/// else to the stored version plus one, returning 2 ("behind": the stored
/// version was already at or past the batch's). So a bump is never a no-op,
/// whatever the source's positions did (a restore, a failover, a switch
/// between sources, two sources on one Redis, Kafka's commit times), and a
/// stored version stays at or above the commit position of the last change
/// that bumped it. A replayed batch raises again: one extra miss, the price
/// of at-least-once delivery. Arguments after `ARGV[1]` are ignored.
/// A key that holds something else (a value that is not a decimal
/// version, or a key of another type) is left as it is and the script
/// returns 3: the sink bumps the cache's namespace instead. Leading zeros
/// of a stored value are ignored; the key's TTL, if any, is removed by `SET`
/// (evictd never gives version keys a TTL).
pub(crate) const BUMP_LUA: &str = r#"
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return false
end
local function succ(s)
  local i = #s
  while i > 0 and string.byte(s, i) == 57 do i = i - 1 end
  if i == 0 then return '1' .. string.rep('0', #s) end
  return string.sub(s, 1, i - 1) .. string.char(string.byte(s, i) + 1) .. string.rep('0', #s - i)
end
local new, reply = ARGV[1], 1
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'string' then return 3 end
local cur = redis.call('GET', KEYS[1])
if cur then
  if not string.match(cur, '^%d+$') then return 3 end
  cur = string.gsub(cur, '^0+', '')
  if cur == '' then cur = '0' end
  if not greater(new, cur) then
    new, reply = succ(cur), 2
  end
end
redis.call('SET', KEYS[1], new)
return reply
"#;

/// Lua source of [`FORGET`].
///
/// `KEYS[1]` is a tag registry; `ARGV[1]` a score bound: registrations
/// scored strictly below it are dropped (their keys expired). `ARGV[2]`,
/// `ARGV[3]`, … are `member, score` pairs as evictd read them before
/// deleting the members' keys: each is removed only if its score is still
/// that (same text, or the same number: `ZSCAN` and `ZSCORE` may print a
/// score differently). Returns the number of registrations removed.
pub const FORGET_LUA: &str = r#"
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
for i = 2, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  local now, was = tonumber(score), tonumber(ARGV[i + 1])
  if score and (score == ARGV[i + 1] or (now ~= nil and now == was)) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"#;

/// Lua source of the readers' tag registration ([`crate::reader::register`]).
///
/// `KEYS[1]` is a tag registry, `ARGV[1]` the key to register, `ARGV[2]`
/// the key's expiry as Unix time in ms. Registers the key with that score,
/// or, when the registry already holds it at that score or later (a second
/// registration within the same millisecond, or a shorter TTL), at the
/// stored score plus a thousandth of a millisecond: **every registration
/// changes the score**, so evictd's [forget step](FORGET_LUA), which removes
/// a registration only if its score is still the one it read, never removes
/// a registration made after its read. Then gives the registry an expiry if
/// it has none, or pushes it out to the new maximum. Returns 1.
pub const REGISTER_LUA: &str = r#"
local at = tonumber(ARGV[2])
local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if cur and cur >= at then at = cur + 0.001 end
redis.call('ZADD', KEYS[1], string.format('%.17g', at), ARGV[1])
local expire = string.format('%d', math.ceil(at))
redis.call('PEXPIREAT', KEYS[1], expire, 'NX')
redis.call('PEXPIREAT', KEYS[1], expire, 'GT')
return 1
"#;

/// Lua source of the readers' first step of a guarded fill, run *before*
/// reading the database.
///
/// `KEYS[1]` is [`guard_key`] of the cache key, `ARGV[1]` the stamp's time
/// to live in ms (as long as evictd's `fill_guard_ttl_ms`). Returns the
/// current stamp; when there is none, creates a fresh one
/// (`r<seconds>.<microseconds>` of the server clock) and returns it. A
/// missing stamp is never handed out as such, so a stamp that expires
/// while a reader holds it makes that reader's fill fail, never pass.
pub const FILL_BEGIN_LUA: &str = r#"
local stamp = redis.call('GET', KEYS[1])
if stamp then return stamp end
local now = redis.call('TIME')
stamp = 'r' .. now[1] .. '.' .. now[2]
redis.call('SET', KEYS[1], stamp, 'PX', ARGV[1])
return stamp
"#;

/// Lua source of a read that begins a guarded fill on a miss: the cache
/// `GET` and [`FILL_BEGIN_LUA`] in one round trip, so a guarded miss costs
/// the same round trips as an unguarded one (read, database, fill).
///
/// `KEYS[1]` is the cache key, `KEYS[2]` its [`guard_key`], `ARGV[1]` the
/// stamp's time to live in ms. Returns `{1, value}` on a hit, `{0, stamp}`
/// on a miss (the stamp as [`FILL_BEGIN_LUA`] would return it).
pub const READ_LUA: &str = r#"
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
local stamp = redis.call('GET', KEYS[2])
if not stamp then
  local now = redis.call('TIME')
  stamp = 'r' .. now[1] .. '.' .. now[2]
  redis.call('SET', KEYS[2], stamp, 'PX', ARGV[1])
end
return {0, stamp}
"#;

/// Lua source of the readers' second step: set the value only if the key
/// was not invalidated since [`FILL_BEGIN_LUA`].
///
/// `KEYS[1]` is the cache key, `KEYS[2]` its [`guard_key`]; `ARGV[1]` the
/// stamp `FILL_BEGIN_LUA` returned, `ARGV[2]` the value, `ARGV[3]` its time
/// to live in ms (`0`: none). Returns 1 if the value was set, 0 if the stamp
/// changed (evictd invalidated the key after the reader's stamp was taken,
/// so what the reader read may be stale) or expired.
pub const FILL_LUA: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
if ttl and ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"#;

/// Lua source of [`PUBLISH`](Scripts::publish): one broadcast message,
/// a batch's or a heartbeat (format v2, `docs/broadcast.md`).
///
/// `KEYS`: the channel's [`BroadcastKeys`] in order: seq, epoch, stream,
/// applied, touched, server. `ARGV`:
/// 1. the channel;
/// 2. `batch` or `heartbeat`;
/// 3. the transport: `both`, `pubsub` or `stream`;
/// 4. the stream's `MAXLEN ~` bound;
/// 5. the applied position's kind (`postgres`), or empty: no `applied`;
/// 6. this process's applied position (`X/Y`), or empty: none yet;
/// 7. the JSON after `seq` and before `applied` (`,"batch":…,"position":…`,
///    or empty);
/// 8. the JSON after `applied`, to the closing `}`;
/// 9. `1` if the message has tags, else `0`;
/// 10. the highest epoch this process saw on the channel (any script's
///     reply), or empty: none yet;
/// 11. the highest `seq` it saw in that epoch, or empty;
/// 12. and on: the caches the message touches (`caches` ∪ `flush`).
///
/// A **new sequence** starts (a new epoch, `seq` set to it) when:
/// - `lost`: `seq` or `epoch` is missing (first use, or Redis lost them);
/// - `server`: the server's `run_id` (`INFO server`) is not the one that
///   ran the last publish (the `server` key): Redis restarted, maybe on an
///   older snapshot, or another server took over; a missing `server` key
///   with a sequence there counts too (a snapshot from before it existed);
/// - `behind`: the stored `(epoch, seq)` is below ARGV 10/11: Redis went
///   back in time without a restart.
///
/// The new epoch is the server clock in µs, or one above the highest
/// sequence number stored or passed in ARGV 11 when that is higher (a
/// server whose clock is behind), so it is never one a subscriber saw and
/// never starts a second time on its own account. Digit strings are
/// compared as such, never as Lua numbers. When `INFO` is refused (an ACL),
/// the `server` rule is off.
///
/// A batch `INCR`s `seq`, writes its number into `touched` for each cache
/// (and `*tags`), then publishes and/or adds to the stream; a heartbeat
/// leaves `seq` as it is and only publishes (pub/sub transports). Both raise
/// `applied` to ARGV 6 (compared as hexadecimal digit strings, never Lua
/// numbers) and carry the hash's value, the highest any process wrote.
/// Returns `{seq, epoch, why}`: the message's `seq` (a heartbeat: the
/// current one), its epoch, and why a new sequence started (`lost`,
/// `server`, `behind`), or empty.
pub(crate) const PUBLISH_LUA: &str = r#"
local function hex_greater(a, b)
  a = string.gsub(a, '^0+', '')
  b = string.gsub(b, '^0+', '')
  if #a ~= #b then return #a > #b end
  return a > b
end
local function lsn_greater(a, b)
  local ah, al = string.match(a, '^(%x+)/(%x+)$')
  local bh, bl = string.match(b, '^(%x+)/(%x+)$')
  if not ah then return false end
  if not bh then return true end
  ah, al, bh, bl = string.upper(ah), string.upper(al), string.upper(bh), string.upper(bl)
  if hex_greater(ah, bh) then return true end
  if hex_greater(bh, ah) then return false end
  return hex_greater(al, bl)
end
local function digits(s)
  return type(s) == 'string' and string.match(s, '^[1-9]%d*$') ~= nil
end
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local function succ(s)
  local i = #s
  while i > 0 and string.byte(s, i) == 57 do i = i - 1 end
  if i == 0 then return '1' .. string.rep('0', #s) end
  return string.sub(s, 1, i - 1) .. string.char(string.byte(s, i) + 1) .. string.rep('0', #s - i)
end
local seq = redis.call('GET', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
local server = ''
local ok, info = pcall(redis.call, 'INFO', 'server')
if ok and type(info) == 'string' then server = string.match(info, 'run_id:(%x+)') or '' end
local marker = redis.call('GET', KEYS[6])
local why = ''
if not digits(seq) or not digits(epoch) then
  why = 'lost'
elseif server ~= '' and marker ~= server then
  why = 'server'
elseif digits(ARGV[10]) and digits(ARGV[11])
  and (greater(ARGV[10], epoch) or (ARGV[10] == epoch and greater(ARGV[11], seq))) then
  why = 'behind'
end
if why ~= '' then
  local now = redis.call('TIME')
  local start = now[1] .. string.format('%06d', tonumber(now[2]))
  for _, floor in ipairs({seq or '', ARGV[11]}) do
    if digits(floor) and not greater(start, floor) then start = succ(floor) end
  end
  redis.call('SET', KEYS[1], start)
  redis.call('SET', KEYS[2], start)
  epoch, seq = start, start
end
if server ~= '' and marker ~= server then redis.call('SET', KEYS[6], server) end
local batch = ARGV[2] == 'batch'
if batch then
  seq = string.format('%d', redis.call('INCR', KEYS[1]))
  for i = 12, #ARGV do
    redis.call('HSET', KEYS[5], ARGV[i], seq)
  end
  if ARGV[9] == '1' then redis.call('HSET', KEYS[5], '*tags', seq) end
end
local applied = ''
if ARGV[5] ~= '' then
  local stored = redis.call('HGET', KEYS[4], ARGV[5])
  if ARGV[6] ~= '' and (not stored or lsn_greater(ARGV[6], stored)) then
    redis.call('HSET', KEYS[4], ARGV[5], ARGV[6])
    stored = ARGV[6]
  end
  if stored then
    applied = ',"applied":{"kind":"' .. ARGV[5] .. '","lsn":"' .. stored .. '"}'
  end
end
local message = '{"v":2,"kind":"' .. ARGV[2] .. '","epoch":"' .. epoch .. '","seq":' .. seq
  .. ARGV[7] .. applied .. ARGV[8]
if ARGV[3] ~= 'stream' then redis.call('PUBLISH', ARGV[1], message) end
if batch and ARGV[3] ~= 'pubsub' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'm', message)
end
return {tonumber(seq), epoch, why}
"#;

/// Lua source of the source record's upkeep, before the acknowledgement of
/// every batch of a Postgres session (`sink::redis::record`).
///
/// `KEYS[1]` is the record (`evictd:source:<slot>`); `ARGV[1]` the batch
/// version to record as `highest_version`, or empty: none; `ARGV[2]` now in
/// Unix ms (`last_streamed_ms` with it); `ARGV[3]` and on: every field of
/// the record as the session wrote it, `name, value` pairs. A record that
/// is not there (Redis restarted empty, was flushed, evicted it) is written
/// again whole from those pairs first, and the script returns 1; else 0.
pub(crate) const RECORD_LUA: &str = r#"
local restored = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  restored = 1
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'highest_version', ARGV[1], 'last_streamed_ms', ARGV[2])
end
return restored
"#;

/// The scripts evictd runs, built once per sink.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) bump: Script,
    pub(crate) forget: Script,
    pub(crate) publish: Script,
    pub(crate) record: Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            bump: Script::new(BUMP_LUA),
            forget: Script::new(FORGET_LUA),
            publish: Script::new(PUBLISH_LUA),
            record: Script::new(RECORD_LUA),
        }
    }

    pub(crate) fn all(&self) -> [&Script; 4] {
        [&self.bump, &self.forget, &self.publish, &self.record]
    }
}

impl Default for Scripts {
    fn default() -> Scripts {
        Scripts::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn versions_are_canonical_decimal() {
        assert_eq!(encode_version(0), "0");
        assert_eq!(encode_version(42), "42");
        assert_eq!(encode_version(u64::MAX), "18446744073709551615");
    }

    #[test]
    fn readers_parse_versions_and_stamps() {
        assert_eq!(parse_version(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_version(b"0042"), Some(42));
        assert_eq!(parse_version(b"18446744073709551616"), None);
        assert_eq!(parse_version(b"-1"), None);
        assert_eq!(parse_version(b""), None);
        assert_eq!(versioned_key("product:{42}:prices", 7), "product:{42}:prices:v7");
        let value = stamp(17, b"{\"a\":1|2}");
        assert_eq!(value, b"17|{\"a\":1|2}");
        assert_eq!(unstamp(&value, 17), Some(&b"{\"a\":1|2}"[..]));
        assert_eq!(unstamp(&value, 18), None);
        assert_eq!(unstamp(b"no stamp", 0), None);
    }

    #[test]
    fn a_tag_registry_hashes_on_its_tag_alone() {
        assert_eq!(tag_key("user:42"), "evictd:tag:{user:42}");
        assert_eq!(Slot::for_key(tag_key("user:42")), Slot::for_key("user:42"));
        assert_eq!(namespace_key("product_detail"), "evictd:ns:product_detail");
    }

    #[test]
    fn a_guard_lives_in_its_keys_slot() {
        for key in ["user:{42}:profile", "user:42:profile", "{x}", "x{", "p:{{a}}", "q?a=1&b=2", "x}{y}"] {
            assert!(guard_in_slot(key.as_bytes()), "{key}");
            let guard = guard_key(key.as_bytes());
            assert_eq!(
                Slot::for_key(&guard),
                Slot::for_key(key.as_bytes()),
                "{key} → {}",
                String::from_utf8_lossy(&guard)
            );
        }
        // Issue 11, item 7: no stamp name can share these keys' slots.
        for key in ["product:{}:x", "a}b", "{}{a}", "m}", ""] {
            assert!(!guard_in_slot(key.as_bytes()), "{key}");
            assert_ne!(Slot::for_key(guard_key(key.as_bytes())), Slot::for_key(key.as_bytes()), "{key}");
        }
        assert_eq!(guard_key(b"user:{42}:profile"), b"evictd:guard:user:{42}:profile");
        assert_eq!(guard_key(b"user:42"), b"evictd:guard:{user:42}");
        assert_eq!(guard_stamp("17", None), "i17");
        assert_eq!(guard_stamp("17", Some(0xab)), "i17.00000000000000ab");
        let keys = BroadcastKeys::of("evictd:invalidations");
        assert_eq!(keys.seq, "evictd:bc:{evictd:invalidations}:seq");
        assert_eq!(keys.touched, "evictd:bc:{evictd:invalidations}:touched");
        assert_eq!(keys.server, "evictd:bc:{evictd:invalidations}:server");
        for key in keys.script_keys() {
            assert_eq!(Slot::for_key(key), Slot::for_key("evictd:invalidations"), "{key}");
        }
    }

    proptest::proptest! {
        /// Every key either has its stamp in its own slot or is flagged:
        /// never a stamp in another slot that evictd would write.
        #[test]
        fn a_guard_is_in_its_keys_slot_or_the_key_is_flagged(
            key in proptest::collection::vec(proptest::sample::select(b"{}ab:".to_vec()), 0..12),
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..4),
        ) {
            let mut key = key;
            key.extend(noise);
            if guard_in_slot(&key) {
                proptest::prop_assert_eq!(Slot::for_key(guard_key(&key)), Slot::for_key(&key));
            }
        }
    }
}
