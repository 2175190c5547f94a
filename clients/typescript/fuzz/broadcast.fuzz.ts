/**
 * Coverage-guided fuzzing (Jazzer.js) of this client's broadcast reader: the
 * bytes of one broadcast message, decoded as the subscriber's Redis
 * connection decodes them (UTF-8), through `parseMessage`, the decision
 * `step` from several cursors, `appliedLsn` / `commitLsn`, `repairPlan`, and
 * the subscriber's own handling (pub/sub transport, a stand-in Redis that
 * answers `HGETALL touched`): what a subscriber does with a message it reads.
 *
 * Contract checked: `parseMessage` returns a message or throws
 * `MessageError` (the subscriber counts it as malformed and reads on);
 * nothing else throws, and the subscriber reports no error. Anything else
 * is a finding.
 *
 * Two entry points. {@link fuzz}, what Jazzer.js runs, is synchronous
 * (`--sync`: five times the executions of an async target): the pure
 * functions, and the subscriber's drop of a batch (`drop`, where the
 * message's times meet the metrics). {@link check}, what the tests replay,
 * adds the subscriber's whole `handle` (asynchronous: a gap awaits the
 * stand-in's `HGETALL touched`), which dispatches to those same parts.
 *
 *     scripts/fuzz.sh typescript-broadcast SECONDS     (from the repository root)
 *
 * `test/fuzz-corpus.test.ts` replays `corpus/` and `regressions/` through
 * {@link check} in the client's ordinary tests.
 */
import { appliedLsn, type BatchMessage, commitLsn, type Cursor, type Message, MessageError, parseMessage, repairPlan, step } from "../src/broadcast.js";
import { LocalCache } from "../src/local-cache.js";
import { Subscriber } from "../src/subscriber.js";

const EPOCH = "1764000000000000";
const SEQ = 1764000000000416n;

/** The `touched` hash the stand-in answers (as ioredis gives it: strings). */
const TOUCHED: Record<string, string> = { user_profile: String(SEQ + 2n), "*tags": String(SEQ - 3n), feed: "7", odd: "x7" };

/** What the harness reaches of the private subscriber. */
interface Handling {
  cursorNow: Cursor;
  handle(text: string, via: "pubsub" | "stream"): Promise<void>;
  drop(message: BatchMessage): void;
}

const errors: Error[] = [];
const cache = new LocalCache<string>({ maxEntries: 64, ttlMs: 60_000, redisTtlMs: 120_000 });
// The constructor is private (start() connects): the stand-in Redis only
// answers what handling a pub/sub message reads.
const standIn = { hgetall: async (_key: string) => TOUCHED };
const SubscriberClass = Subscriber as unknown as new (options: object) => Handling;
const subscriber = new SubscriberClass({
  redis: standIn,
  cache,
  channel: "fuzz",
  transport: "pubsub",
  onError: (err: Error) => errors.push(err),
});

function decide(message: Message): void {
  const cursors: Cursor[] = [
    { epoch: null, last: null },
    { epoch: EPOCH, last: SEQ },
  ];
  if (message.kind === "batch" || message.kind === "heartbeat") {
    cursors.push({ epoch: message.epoch, last: message.seq - 1n });
    appliedLsn(message);
    if (message.kind === "batch") commitLsn(message);
  }
  for (const cursor of cursors) {
    const { decision } = step(cursor, message);
    if (decision.action === "gap") repairPlan(TOUCHED, decision.after);
  }
}

/** One message through the reader's synchronous parts; throws on a finding. Jazzer.js's entry point. */
export function fuzz(data: Uint8Array): void {
  const text = Buffer.from(data).toString("utf8");
  let message: Message | undefined;
  try {
    message = parseMessage(text);
  } catch (err) {
    if (!(err instanceof MessageError)) throw err;
  }
  if (message === undefined) return;
  decide(message);
  if (message.kind === "batch") {
    cache.set("user_profile", "user:{42}:profile", "v", { tags: ["user:42"] });
    subscriber.drop(message);
  }
}

/** {@link fuzz}, then the subscriber's whole handling of the message; throws on a finding. */
export async function check(data: Uint8Array): Promise<void> {
  fuzz(data);
  cache.set("user_profile", "user:{42}:profile", "v", { tags: ["user:42"] });
  subscriber.cursorNow = { epoch: EPOCH, last: SEQ };
  errors.length = 0;
  await subscriber.handle(Buffer.from(data).toString("utf8"), "pubsub");
  const unexpected = errors.filter((e) => !(e instanceof MessageError));
  if (unexpected.length > 0) throw unexpected[0];
}
