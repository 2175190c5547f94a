// Test support: the servers the tests need (a missing one fails, never
// skips), unique names, waiting on conditions with a deadline.

import { randomBytes } from "node:crypto";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { Cluster, Redis } from "ioredis";

/** The repository's root (clients/typescript/test → ../../..). */
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

function required(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") {
    throw new Error(`${name} is not set: the tests need a real server (see clients/typescript/test.sh)`);
  }
  return value;
}

export function redisUrl(): string {
  return required("EVICTD_TEST_REDIS_URL");
}

export function clusterUrls(): string[] {
  return required("EVICTD_TEST_REDIS_CLUSTER_URLS")
    .split(",")
    .map((u) => u.trim())
    .filter((u) => u !== "");
}

/** A standalone connection; fails fast if the server is not there. */
export async function connect(name = "evictd-ts-test"): Promise<Redis> {
  const redis = new Redis(redisUrl(), { lazyConnect: true, connectionName: name, maxRetriesPerRequest: 3 });
  await redis.connect();
  return redis;
}

export async function connectCluster(): Promise<Cluster> {
  const nodes = clusterUrls().map((u) => {
    const url = new URL(u);
    return { host: url.hostname, port: Number(url.port) };
  });
  const cluster = new Cluster(nodes, { lazyConnect: true, redisOptions: { maxRetriesPerRequest: 3 } });
  await cluster.connect();
  await cluster.ping();
  return cluster;
}

/** A name unique to this test run. */
export function unique(prefix: string): string {
  return `${prefix}-${process.pid}-${randomBytes(4).toString("hex")}`;
}

/** Waits until `check()` holds, or fails after `timeoutMs` with `what`. */
export async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
