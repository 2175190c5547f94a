/**
 * The Redis connection this client takes: an ioredis `Redis` or `Cluster`.
 * Scripts run with `EVALSHA`, falling back to `EVAL` when the server answers
 * `NOSCRIPT` (a restart, `SCRIPT FLUSH`, a new Cluster node): every script
 * touches one hash slot, so both route to that slot's node.
 */

import { createHash } from "node:crypto";

import type { Cluster, Redis } from "ioredis";

export type RedisClient = Redis | Cluster;

const shas = new Map<string, string>();

function sha1(script: string): string {
  let sha = shas.get(script);
  if (sha === undefined) {
    sha = createHash("sha1").update(script, "utf8").digest("hex");
    shas.set(script, sha);
  }
  return sha;
}

/** Runs `script` with `keys` and `args`; replies in Buffers (values may be binary). */
export async function runScript(
  redis: RedisClient,
  script: string,
  keys: readonly (string | Buffer)[],
  args: readonly (string | Buffer | number)[],
): Promise<unknown> {
  const argv = [keys.length, ...keys, ...args];
  try {
    return await redis.callBuffer("EVALSHA", [sha1(script), ...argv]);
  } catch (err) {
    if (!(err instanceof Error) || !err.message.startsWith("NOSCRIPT")) throw err;
    return await redis.callBuffer("EVAL", [script, ...argv]);
  }
}
