import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import * as scripts from "../src/scripts.js";
import { REPO_ROOT } from "./support.js";

// The Lua scripts are the contract with evictd: the TypeScript copies must be
// the Rust source text, byte for byte.
test("the Lua scripts are byte for byte those of src/layout.rs", () => {
  const rust = readFileSync(join(REPO_ROOT, "src/layout.rs"), "utf8");
  const names = ["READ_LUA", "FILL_BEGIN_LUA", "FILL_LUA", "REGISTER_LUA"] as const;
  for (const name of names) {
    const m = new RegExp(`pub const ${name}: &str = r#"([\\s\\S]*?)"#;`).exec(rust);
    assert.ok(m?.[1] !== undefined, `${name} not found in layout.rs`);
    assert.equal(scripts[name], m[1], `${name} drifted from layout.rs`);
  }
  assert.deepEqual(Object.keys(scripts).sort(), [...names].sort());
});
