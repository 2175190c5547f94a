/**
 * The Lua scripts applications run, copied byte for byte from evictd's
 * `src/layout.rs` (the contract: `docs/redis-layout.md`, "Fill
 * guard" and "Tags: the registry"). `test/scripts.test.ts` compares each one
 * with the Rust source text, so the two cannot drift: change them there, then
 * copy them here.
 */

/** `KEYS[1]` the cache key, `KEYS[2]` its guard key, `ARGV[1]` the stamp TTL (ms): `{1, value}` on a hit, `{0, stamp}` on a miss (a stamp is created when there is none). */
export const READ_LUA = `
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
local stamp = redis.call('GET', KEYS[2])
if not stamp then
  local now = redis.call('TIME')
  stamp = 'r' .. now[1] .. '.' .. now[2]
  redis.call('SET', KEYS[2], stamp, 'PX', ARGV[1])
end
return {0, stamp}
`;

/** `KEYS[1]` the guard key, `ARGV[1]` the stamp TTL (ms): the current stamp, created when there is none. */
export const FILL_BEGIN_LUA = `
local stamp = redis.call('GET', KEYS[1])
if stamp then return stamp end
local now = redis.call('TIME')
stamp = 'r' .. now[1] .. '.' .. now[2]
redis.call('SET', KEYS[1], stamp, 'PX', ARGV[1])
return stamp
`;

/** `KEYS[1]` the cache key, `KEYS[2]` its guard key, `ARGV[1]` the stamp taken, `ARGV[2]` the value, `ARGV[3]` the TTL in ms (`0`: none): 1 if set, 0 if the stamp changed or expired. */
export const FILL_LUA = `
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
if ttl and ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
`;

/** `KEYS[1]` a tag registry, `ARGV[1]` the key, `ARGV[2]` its expiry (Unix ms); every registration changes the score. */
export const REGISTER_LUA = `
local at = tonumber(ARGV[2])
local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if cur and cur >= at then at = cur + 0.001 end
redis.call('ZADD', KEYS[1], string.format('%.17g', at), ARGV[1])
local expire = string.format('%d', math.ceil(at))
redis.call('PEXPIREAT', KEYS[1], expire, 'NX')
redis.call('PEXPIREAT', KEYS[1], expire, 'GT')
return 1
`;
