// A STAND-IN for evictd's broadcast publisher (format v2), for the tests
// only: the daemon does not publish v2 yet. It writes exactly what
// docs/broadcast.md says, in one script: the sequence and epoch (started
// from the Redis clock in µs), the `touched` hash (before publishing), the
// `applied` hash, XADD to the stream, PUBLISH on the channel.

import { type ChannelKeys, type RedisClient, channelKeys } from "../src/index.js";

const PUBLISH_V2_STAND_IN = `
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  local start = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('SET', KEYS[1], start)
  redis.call('SET', KEYS[2], start)
end
local epoch = redis.call('GET', KEYS[2])
local seq
if ARGV[6] == 'heartbeat' then seq = redis.call('GET', KEYS[1]) else seq = string.format('%d', redis.call('INCR', KEYS[1])) end
if ARGV[6] == 'batch' then
  for _, name in ipairs(cjson.decode(ARGV[4])) do redis.call('HSET', KEYS[4], name, seq) end
  if ARGV[5] == '1' then redis.call('HSET', KEYS[4], '*tags', seq) end
end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[5], 'postgres', ARGV[7]) end
local msg = '{"v":2,"kind":"' .. ARGV[6] .. '","epoch":"' .. epoch .. '","seq":' .. seq .. ARGV[3]
if ARGV[6] == 'batch' and (ARGV[2] == 'both' or ARGV[2] == 'stream') then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'm', msg)
end
if ARGV[2] == 'both' or ARGV[2] == 'pubsub' then redis.call('PUBLISH', ARGV[1], msg) end
return seq
`;

export interface Batch {
  caches?: string[];
  keys?: string[];
  tags?: string[];
  flush?: string[];
  appliedLsn?: string;
  commitLsn?: string;
}

/** `lost`: the message's state is written (seq, touched) but it is never delivered. */
export type Delivery = "both" | "pubsub" | "stream" | "lost";

export class StandInPublisher {
  readonly keys: ChannelKeys;
  private batchNo = 0;

  constructor(
    private readonly redis: RedisClient,
    channel: string,
    private readonly delivery: Delivery = "both",
  ) {
    this.keys = channelKeys(channel);
  }

  async batch(b: Batch, delivery: Delivery = this.delivery): Promise<bigint> {
    this.batchNo += 1;
    const lsn = b.commitLsn ?? "0/0";
    const rest =
      `,"batch":${this.batchNo},"position":{"kind":"postgres","commit_lsn":"${lsn}","lsn":"${lsn}"}` +
      (b.appliedLsn !== undefined ? `,"applied":{"kind":"postgres","lsn":"${b.appliedLsn}"}` : "") +
      `,"caches":${JSON.stringify([...(b.caches ?? [])].sort())},"keys":${JSON.stringify(b.keys ?? [])},"tags":${JSON.stringify(b.tags ?? [])}` +
      `,"flush":${JSON.stringify(b.flush ?? [])},"truncated":false,"committed_at_ms":${Date.now() - 1},"published_at_ms":${Date.now()}}`;
    const touched = [...new Set([...(b.caches ?? []), ...(b.flush ?? [])])];
    return this.run("batch", rest, touched, (b.tags ?? []).length > 0, b.appliedLsn ?? "", delivery);
  }

  async heartbeat(appliedLsn?: string, delivery: Delivery = this.delivery): Promise<bigint> {
    const rest = (appliedLsn !== undefined ? `,"applied":{"kind":"postgres","lsn":"${appliedLsn}"}` : "") + `,"published_at_ms":${Date.now()}}`;
    return this.run("heartbeat", rest, [], false, appliedLsn ?? "", delivery);
  }

  /** What a Redis that lost its data does to the sequence: a new epoch at the next message. */
  async loseSequence(): Promise<void> {
    await this.redis.del(this.keys.seq, this.keys.epoch);
  }

  private async run(kind: string, rest: string, touched: string[], tags: boolean, applied: string, delivery: Delivery): Promise<bigint> {
    const k = this.keys;
    const reply = await this.redis.eval(
      PUBLISH_V2_STAND_IN,
      5,
      k.seq,
      k.epoch,
      k.stream,
      k.touched,
      k.applied,
      k.channel,
      delivery,
      rest,
      JSON.stringify(touched),
      tags ? "1" : "0",
      kind,
      applied,
    );
    return BigInt(reply as string);
  }
}
