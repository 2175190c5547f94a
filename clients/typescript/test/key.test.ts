import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { type KeyValue, KeyTemplate, RenderError, TemplateError, formatNumber, renderKey, rustTrim } from "../src/index.js";
import { type Exact, parseExact } from "./json-exact.js";
import { REPO_ROOT } from "./support.js";

function param(json: Exact): KeyValue {
  // JSON has no NaN or infinities: {"float": "NaN" | "inf" | "-inf"}.
  if (json !== null && typeof json === "object" && !Array.isArray(json) && typeof json.float === "string") {
    return ({ NaN: NaN, inf: Infinity, "-inf": -Infinity } as Record<string, number>)[json.float];
  }
  if (json !== null && typeof json === "object" && !Array.isArray(json) && typeof json.bytes === "string") {
    return Buffer.from(json.bytes, "hex");
  }
  if (Array.isArray(json) || (json !== null && typeof json === "object")) return JSON.stringify(json);
  return json;
}

test("every key-rendering vector of the repository holds", () => {
  const doc = parseExact(readFileSync(join(REPO_ROOT, "tests/vectors/key-rendering.json"), "utf8")) as {
    cases: { name: string; template: string; params: Record<string, Exact>; key?: string; error?: string }[];
  };
  assert.ok(doc.cases.length >= 40, "the vector file lost cases");
  const failures: string[] = [];
  for (const c of doc.cases) {
    const params = Object.fromEntries(Object.entries(c.params).map(([k, v]) => [k, param(v)]));
    let got: { key: string } | { error: string };
    try {
      got = { key: KeyTemplate.parse(c.template).render(params) };
    } catch (err) {
      if (err instanceof TemplateError) got = { error: "template" };
      else if (err instanceof RenderError) got = { error: err.kind };
      else throw err;
    }
    const want = c.key !== undefined ? { key: c.key } : { error: c.error ?? "?" };
    if (JSON.stringify(got) !== JSON.stringify(want)) failures.push(`${c.name}: ${c.template} → ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
  }
  assert.deepEqual(failures, []);
});

test("numbers render as Rust prints an f64: shortest digits, never an exponent", () => {
  assert.equal(formatNumber(12.5), "12.5");
  assert.equal(formatNumber(3), "3");
  assert.equal(formatNumber(-0), "0");
  assert.equal(formatNumber(1e21), "1000000000000000000000");
  assert.equal(formatNumber(1e-7), "0.0000001");
  assert.equal(formatNumber(-1.5e-10), "-0.00000000015");
  assert.equal(formatNumber(0.1 + 0.2), "0.30000000000000004");
  assert.equal(formatNumber(1.7976931348623157e308), `17976931348623157${"0".repeat(292)}`);
  assert.equal(formatNumber(Number.NaN), "NaN");
  assert.equal(formatNumber(Number.POSITIVE_INFINITY), "inf");
  assert.equal(formatNumber(Number.NEGATIVE_INFINITY), "-inf");
  assert.equal(renderKey("n:{n}", { n: 9223372036854775807n }), "n:9223372036854775807");
});

test("trim removes Unicode White_Space as Rust does, not JavaScript's set", () => {
  assert.equal(rustTrim("\u0085a\u3000"), "a"); // NEL is whitespace in Rust, not in JS
  assert.equal(rustTrim("\uFEFFa"), "\uFEFFa"); // BOM is whitespace in JS, not in Rust
  assert.equal(renderKey("u:{h|trim}", { h: "\u00a0\u2009x\u2028" }), "u:x");
});

test("a value cannot forge a separator or a hash tag", () => {
  assert.equal(renderKey("k:{v}", { v: "a:{b}&c=d?%\u0000\u009f" }), "k:a%3A%7Bb%7D%26c%3Dd%3F%25%00%C2%9F");
});

test("parameters may be a Map and query sections skip undefined and null", () => {
  const t = KeyTemplate.parse("s:{id}:{?b,a}");
  assert.deepEqual(t.params, ["id", "b", "a"]);
  assert.equal(t.render(new Map<string, KeyValue>([["id", 1], ["a", null], ["b", true]])), "s:1:b=true");
});

test("template errors say where", () => {
  assert.throws(() => KeyTemplate.parse("user:{id"), (e: unknown) => e instanceof TemplateError && e.offset === 5);
  assert.throws(() => KeyTemplate.parse("a}b"), (e: unknown) => e instanceof TemplateError && e.offset === 1);
  assert.throws(() => KeyTemplate.parse("c:{id}").render({}), (e: unknown) => e instanceof RenderError && e.kind === "missing");
});
