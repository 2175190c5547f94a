/**
 * evictd for Node.js: render keys exactly as evictd does, fill Redis
 * through the fill guard, register tags, and keep an in-process cache that
 * evictd's broadcast invalidates. See `docs/client-typescript.md`.
 */

export { KeyTemplate, type KeyParams, type KeyValue, RenderError, TemplateError, formatNumber, renderKey, rustTrim } from "./key.js";
export {
  type Bytes,
  GUARD_PREFIX,
  MAX_VERSION,
  NAMESPACE_PREFIX,
  TAG_PREFIX,
  guardInSlot,
  guardKey,
  namespaceKey,
  parseVersion,
  stamp,
  tagKey,
  unstamp,
  versionedKey,
} from "./layout.js";
export { FILL_BEGIN_LUA, FILL_LUA, READ_LUA, REGISTER_LUA } from "./scripts.js";
export {
  DEFAULT_STAMP_TTL_MS,
  type ReadResult,
  type ReadThroughOptions,
  type ReadThroughResult,
  VersionError,
  beginFill,
  fill,
  namespaceVersion,
  read,
  readThrough,
  readVersion,
  register,
  registerAt,
} from "./reader.js";
export type { RedisClient } from "./redis.js";
export { COMMIT_POSITION_SQL, LsnError, formatLsn, parseLsn } from "./lsn.js";
export {
  type Applied,
  type BatchMessage,
  type ChannelKeys,
  type Cursor,
  DEFAULT_CHANNEL,
  DEFAULT_HEARTBEAT_MS,
  type Decision,
  type HeartbeatMessage,
  type Message,
  MessageError,
  type Position,
  STREAM_FIELD,
  TAGS_FIELD,
  repairPlan,
  channelKeys,
  parseMessage,
  step,
} from "./broadcast.js";
export { LocalCache, type LocalCacheOptions, LocalTtlError, type LoadOptions } from "./local-cache.js";
export { Histogram, LATENCY_BUCKETS_MS, Metrics } from "./metrics.js";
export { Subscriber, type SubscriberOptions, type Transport, waitApplied } from "./subscriber.js";
