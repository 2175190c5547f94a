// tests/vectors/broadcast.json, the language-neutral cases of what a
// subscriber does with each broadcast message (docs/broadcast.md), run whole
// from the repository root through the client's own decision (`step`) and
// gap repair (`repairPlan`).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { appliedLsn, parseMessage, repairPlan, step } from "../src/broadcast.js";
import { parseLsn } from "../src/index.js";
import { REPO_ROOT } from "./support.js";

interface Case {
  name: string;
  last: { epoch: string; seq: number };
  message: string;
  touched?: Record<string, string | number>;
  applied: string | null;
  applied_at_least?: string;
  action: string;
  drop: { keys: string[]; tags: string[]; caches: string[] };
  then: { epoch: string; seq: number };
  repair: { caches: string[]; all_tags: boolean };
}

// seq and epoch values in the file stay below 2^53: JSON.parse is exact.
const doc = JSON.parse(readFileSync(join(REPO_ROOT, "tests/vectors/broadcast.json"), "utf8")) as {
  actions: string[];
  cases: Case[];
};

test("the vector file keeps every action", () => {
  assert.ok(doc.cases.length >= 17, "the vector file lost cases");
  assert.deepEqual(new Set(doc.cases.map((c) => c.action)), new Set(doc.actions));
});

for (const c of doc.cases) {
  test(`broadcast vector: ${c.name}`, () => {
    const message = parseMessage(c.message);
    const { decision, cursor } = step({ epoch: c.last.epoch, last: BigInt(c.last.seq) }, message);
    let action: string;
    let after = cursor;
    switch (decision.action) {
      case "apply":
        action = "apply";
        break;
      case "skip":
      case "ignore":
        action = "ignore";
        break;
      case "flush":
        action = message.kind === "other-version" ? "flush_keep_state" : "flush";
        break;
      case "gap": {
        action = message.kind === "batch" ? "repair_then_apply" : "repair";
        const touched = Object.fromEntries(Object.entries(c.touched ?? {}).map(([k, v]) => [k, String(v)]));
        const plan = repairPlan(touched, decision.after);
        assert.deepEqual(plan, { caches: [...c.repair.caches].sort(), allTags: c.repair.all_tags });
        break;
      }
    }
    assert.equal(action, c.action);
    if (action === "apply" || action === "repair_then_apply") {
      assert.ok(message.kind === "batch");
      assert.deepEqual([...message.keys].sort(), [...c.drop.keys].sort());
      assert.deepEqual([...message.tags].sort(), [...c.drop.tags].sort());
      assert.deepEqual([...message.flush].sort(), [...c.drop.caches].sort());
    }
    if (action === "flush_keep_state") after = { epoch: c.last.epoch, last: BigInt(c.last.seq) };
    assert.deepEqual(after, { epoch: c.then.epoch, last: BigInt(c.then.seq) });
    const applied = message.kind === "batch" || message.kind === "heartbeat" ? appliedLsn(message) : undefined;
    assert.equal(applied, c.applied === null ? undefined : parseLsn(c.applied));
    if (c.applied_at_least !== undefined) {
      assert.ok(applied !== undefined && applied > parseLsn(c.applied_at_least));
    }
  });
}
