/**
 * The TypeScript agent of evictd's end-to-end client tests
 * (tests/it/clients.rs, which documents the line protocol): a process
 * holding a {@link LocalCache} kept by the {@link Subscriber}, driven over
 * stdin and stdout.
 *
 *     node --import tsx test/e2e_agent.ts --redis URL --channel C \
 *         --transport both|pubsub|stream --heartbeat-ms N
 *
 * (run from clients/typescript, so that `tsx` resolves from its
 * node_modules). It prints `ready` once subscribed, answers every command
 * line with one line, and prints `dropped <key> <unix_ms>` whenever an entry
 * it filled leaves the local cache because of the broadcast (a key, a tag, a
 * cache or a flush). Each line is one synchronous write (stdout is a pipe),
 * so an event never splits a reply.
 */

import { createInterface } from "node:readline";
import { parseArgs } from "node:util";

import { Redis } from "ioredis";

import { LocalCache } from "../src/local-cache.js";
import { Subscriber, type Transport } from "../src/subscriber.js";

function emit(line: string): void {
  process.stdout.write(`${line}\n`);
}

/** A local cache that reports each filled entry the broadcast drops. */
class WatchedCache extends LocalCache<string> {
  private readonly watched = new Set<string>();

  watch(key: string): void {
    this.watched.add(key);
  }

  private report<T>(n: T): T {
    const at = (performance.timeOrigin + performance.now()).toFixed(3);
    for (const key of this.watched) {
      if (this.has(key)) continue;
      this.watched.delete(key);
      emit(`dropped ${key} ${at}`);
    }
    return n;
  }

  override dropKey(key: string): number {
    return this.report(super.dropKey(key));
  }

  override dropTag(tag: string): number {
    return this.report(super.dropTag(tag));
  }

  override dropTagged(): number {
    return this.report(super.dropTagged());
  }

  override dropCache(cache: string): number {
    return this.report(super.dropCache(cache));
  }

  override clear(): number {
    // The constructor's fields are not set yet when a base method runs first.
    return this.watched === undefined ? super.clear() : this.report(super.clear());
  }
}

function stats(cache: WatchedCache): Record<string, unknown> {
  const m = cache.metrics;
  const h = m.commitToDrop;
  return {
    entries: cache.size,
    hits: m.hits,
    misses: m.misses,
    invalidations: m.invalidationsApplied,
    replays: m.replays,
    gaps: m.gaps,
    flushes: m.flushes,
    rejected_fills: m.fillsRejected,
    commit_to_drop: { count: h.count, p50_ms: h.quantile(0.5) ?? null, p99_ms: h.quantile(0.99) ?? null },
  };
}

async function fill(cache: WatchedCache, name: string, key: string, value: string, tags: string[]): Promise<string> {
  cache.watch(key);
  const rejected = cache.metrics.fillsRejected;
  await cache.getOrLoad(name, key, async () => value, { tags });
  return cache.metrics.fillsRejected > rejected ? "rejected" : "ok";
}

async function serve(cache: WatchedCache): Promise<void> {
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const raw of lines) {
    const words = raw.split(" ").filter((w) => w !== "");
    const [command, ...args] = words;
    if (command === undefined) continue;
    try {
      if (command === "fill" && args.length >= 3) {
        const [name, key, value, ...tags] = args as [string, string, string, ...string[]];
        emit(await fill(cache, name, key, value, tags));
      } else if (command === "get" && args.length === 1) {
        const value = cache.get(args[0] as string);
        emit(value === undefined ? "miss" : `hit ${value}`);
      } else if (command === "stats" && args.length === 0) {
        emit(`stats ${JSON.stringify(stats(cache))}`);
      } else if (command === "quit") {
        return;
      } else {
        emit(`error unknown command: ${raw.trim()}`);
      }
    } catch (err) {
      // Reported, never fatal: the harness decides.
      emit(`error ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`);
    }
  }
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      redis: { type: "string" },
      channel: { type: "string" },
      transport: { type: "string" },
      "heartbeat-ms": { type: "string" },
    },
  });
  const transport = values.transport as Transport | undefined;
  if (values.redis === undefined || values.channel === undefined || values["heartbeat-ms"] === undefined) {
    emit("error --redis, --channel, --transport and --heartbeat-ms are required");
    return 1;
  }
  if (transport !== "both" && transport !== "pubsub" && transport !== "stream") {
    emit(`error --transport must be both, pubsub or stream, not ${String(transport)}`);
    return 1;
  }
  // Entries live an hour: in these tests only the broadcast removes them.
  const hour = 3_600_000;
  const cache = new WatchedCache({ maxEntries: 100_000, ttlMs: hour, redisTtlMs: hour });
  const redis = new Redis(values.redis, { connectTimeout: 2_000, commandTimeout: 5_000, maxRetriesPerRequest: 3 });
  redis.on("error", () => {});
  let subscriber: Subscriber;
  try {
    subscriber = await Subscriber.start({
      redis,
      cache,
      channel: values.channel,
      transport,
      heartbeatMs: Number(values["heartbeat-ms"]),
      onError: (err) => process.stderr.write(`subscriber: ${err.message}\n`),
    });
  } catch (err) {
    emit(`error the subscriber did not start: ${err instanceof Error ? err.message : String(err)}`);
    return 1;
  }
  emit("ready");
  await serve(cache);
  emit("bye");
  await subscriber.close();
  redis.disconnect();
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    emit(`error ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
