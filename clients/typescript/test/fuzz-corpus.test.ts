// Replays the broadcast reader's fuzz inputs (fuzz/corpus/: seeds from
// tests/vectors/broadcast.json and inputs the fuzzer kept; fuzz/regressions/:
// every input that once failed) through the harness's own check
// (fuzz/broadcast.fuzz.ts), as an ordinary test: no fuzzer and no Redis
// needed. docs/fuzzing.md says how the inputs are made.
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { check } from "../fuzz/broadcast.fuzz.js";

const FUZZ = join(dirname(fileURLToPath(import.meta.url)), "..", "fuzz");

function inputs(dir: string): string[] {
  const path = join(FUZZ, dir);
  if (!existsSync(path)) return [];
  return readdirSync(path, { withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => join(dir, e.name))
    .sort();
}

test("the fuzz corpus keeps the vector seeds", () => {
  assert.ok(inputs("corpus").length >= 12);
});

for (const input of [...inputs("corpus"), ...inputs("regressions")]) {
  test(`fuzz input ${input} is read without an unexpected error`, async () => {
    await check(readFileSync(join(FUZZ, input)));
  });
}
