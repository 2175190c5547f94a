/**
 * Key rendering: a key template and parameter values become a cache key,
 * byte for byte as evictd renders it (`src/key.rs` is the reference,
 * `tests/vectors/key-rendering.json` the conformance vectors,
 * `dependency-graphs/README.md` "Key templates" the user documentation).
 *
 * Where JavaScript and Rust differ, this module follows Rust:
 * - numbers render as Rust prints an `f64` (shortest round-trip digits, never
 *   an exponent: `1e21` → `1000000000000000000000`, `1e-7` → `0.0000001`;
 *   `-0` → `0`; `NaN`, `inf`, `-inf`); integers beyond 2^53 must be passed as
 *   `bigint`, since a `number` has already lost their digits;
 * - `trim` removes exactly Unicode's White_Space characters (Rust's
 *   `str::trim`), which is not `String.prototype.trim`'s set (JavaScript
 *   trims U+FEFF and keeps U+0085);
 * - control characters are Unicode's Cc category (U+0000–U+001F,
 *   U+007F–U+009F), percent-encoded as their UTF-8 bytes.
 *
 * Invariant (as in Rust): a value can never forge a separator or a hash tag,
 * because `%` `:` `{` `}` `&` `=` `?` and control characters in values are
 * percent-encoded.
 */

import { createHash } from "node:crypto";

/** A parameter value. `undefined` (or a missing property) is an absent value. */
export type KeyValue = string | number | bigint | boolean | Uint8Array | null | undefined;

/** Parameters by name. */
export type KeyParams = Readonly<Record<string, KeyValue>> | ReadonlyMap<string, KeyValue>;

type Normaliser = "lower" | "upper" | "trim" | "sha256";
const NORMALISERS: ReadonlySet<string> = new Set(["lower", "upper", "trim", "sha256"]);

interface Placeholder {
  readonly param: string;
  readonly normalisers: readonly Normaliser[];
}

type Segment =
  | { readonly kind: "literal"; readonly text: string }
  | { readonly kind: "placeholder"; readonly ph: Placeholder }
  | { readonly kind: "query"; readonly entries: readonly Placeholder[] };

/** A template that does not parse. `offset` is an index into the template string. */
export class TemplateError extends Error {
  override readonly name = "TemplateError";
  constructor(
    readonly template: string,
    readonly offset: number,
    message: string,
  ) {
    super(`${message} (at ${offset} in \`${template}\`)`);
  }
}

/**
 * A key that cannot be rendered: `missing` (no value for a path placeholder)
 * or `null` (a path placeholder is NULL: nothing is cached under it).
 */
export class RenderError extends Error {
  override readonly name = "RenderError";
  constructor(
    readonly kind: "missing" | "null",
    readonly param: string,
  ) {
    super(kind === "missing" ? `no value for placeholder \`${param}\`` : `placeholder \`${param}\` is NULL`);
  }
}

/** A parsed key template; parse once, render many times. */
export class KeyTemplate {
  /** Distinct parameter names, in order of first appearance. */
  readonly params: readonly string[];

  private constructor(
    readonly source: string,
    private readonly segments: readonly Segment[],
    params: readonly string[],
  ) {
    this.params = params;
  }

  /** Parses a template; throws {@link TemplateError}. */
  static parse(source: string): KeyTemplate {
    const parser = new Parser(source);
    const segments = parser.run();
    return new KeyTemplate(source, segments, parser.params);
  }

  /** Renders a key; throws {@link RenderError} for an absent or NULL path parameter. */
  render(params: KeyParams): string {
    const get = lookup(params);
    let out = "";
    for (const segment of this.segments) {
      switch (segment.kind) {
        case "literal":
          out += segment.text;
          break;
        case "placeholder": {
          const value = get(segment.ph.param);
          if (value === undefined) throw new RenderError("missing", segment.ph.param);
          if (value === null) throw new RenderError("null", segment.ph.param);
          out += valueText(value, segment.ph.normalisers);
          break;
        }
        case "query": {
          let first = true;
          for (const ph of segment.entries) {
            const value = get(ph.param);
            if (value === undefined || value === null) continue;
            if (!first) out += "&";
            first = false;
            out += `${ph.param}=${valueText(value, ph.normalisers)}`;
          }
          break;
        }
      }
    }
    return out;
  }

  toString(): string {
    return this.source;
  }
}

/** Parses `template` and renders it once. */
export function renderKey(template: string, params: KeyParams): string {
  return KeyTemplate.parse(template).render(params);
}

function lookup(params: KeyParams): (name: string) => KeyValue {
  if (params instanceof Map) return (name) => params.get(name);
  const record = params as Readonly<Record<string, KeyValue>>;
  return (name) => (Object.prototype.hasOwnProperty.call(record, name) ? record[name] : undefined);
}

function valueText(value: Exclude<KeyValue, null | undefined>, normalisers: readonly Normaliser[]): string {
  let text = rawText(value);
  for (const n of normalisers) text = normalise(n, text);
  return escape(text);
}

function rawText(value: Exclude<KeyValue, null | undefined>): string {
  if (typeof value === "string") return value;
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "number") return formatNumber(value);
  return Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("hex");
}

/**
 * A number as Rust's `Display` prints an `f64` (and, for integers, as it
 * prints an `i64`: the two agree on every integer a double holds): the
 * shortest digits that read back as the same double, without an exponent.
 */
export function formatNumber(x: number): string {
  if (Number.isNaN(x)) return "NaN";
  if (x === Infinity) return "inf";
  if (x === -Infinity) return "-inf";
  if (x === 0) return "0";
  const sign = x < 0 ? "-" : "";
  // JavaScript's Number#toString gives the shortest round-trip digits, with
  // an exponent outside 1e-7..1e21; move the point instead.
  const [mantissa = "", exponent] = Math.abs(x).toString().split("e");
  const [whole = "", fraction = ""] = mantissa.split(".");
  let digits = whole + fraction;
  let point = whole.length + (exponent === undefined ? 0 : Number.parseInt(exponent, 10));
  while (digits.length > 1 && digits.startsWith("0")) {
    digits = digits.slice(1);
    point -= 1;
  }
  let text: string;
  if (point <= 0) text = `0.${"0".repeat(-point)}${digits}`;
  else if (point >= digits.length) text = digits + "0".repeat(point - digits.length);
  else text = `${digits.slice(0, point)}.${digits.slice(point)}`;
  return sign + text;
}

function normalise(n: Normaliser, text: string): string {
  switch (n) {
    case "lower":
      return text.toLowerCase();
    case "upper":
      return text.toUpperCase();
    case "trim":
      return rustTrim(text);
    case "sha256":
      return createHash("sha256").update(text, "utf8").digest("hex");
  }
}

/** Unicode White_Space: what Rust's `char::is_whitespace` and `str::trim` use. */
export function isRustWhitespace(cp: number): boolean {
  return (
    (cp >= 0x09 && cp <= 0x0d) ||
    cp === 0x20 ||
    cp === 0x85 ||
    cp === 0xa0 ||
    cp === 0x1680 ||
    (cp >= 0x2000 && cp <= 0x200a) ||
    cp === 0x2028 ||
    cp === 0x2029 ||
    cp === 0x202f ||
    cp === 0x205f ||
    cp === 0x3000
  );
}

/** Rust's `str::trim`: strips White_Space (every listed character is one UTF-16 unit). */
export function rustTrim(text: string): string {
  let start = 0;
  let end = text.length;
  while (start < end && isRustWhitespace(text.charCodeAt(start))) start += 1;
  while (end > start && isRustWhitespace(text.charCodeAt(end - 1))) end -= 1;
  return text.slice(start, end);
}

function isReserved(cp: number): boolean {
  return (
    cp === 0x25 || // %
    cp === 0x3a || // :
    cp === 0x7b || // {
    cp === 0x7d || // }
    cp === 0x26 || // &
    cp === 0x3d || // =
    cp === 0x3f || // ?
    cp <= 0x1f ||
    (cp >= 0x7f && cp <= 0x9f)
  );
}

function escape(text: string): string {
  let out = "";
  for (const ch of text) {
    const cp = ch.codePointAt(0) ?? 0;
    if (!isReserved(cp)) {
      out += ch;
      continue;
    }
    for (const byte of Buffer.from(ch, "utf8")) out += `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

class Parser {
  /** Distinct names, in order of first appearance. */
  readonly params: string[] = [];
  private pos = 0;

  constructor(private readonly src: string) {}

  private fail(offset: number, message: string): never {
    throw new TemplateError(this.src, offset, message);
  }

  run(): Segment[] {
    const segments: Segment[] = [];
    let literal = "";
    const src = this.src;
    while (this.pos < src.length) {
      const c = src[this.pos];
      if (c === "{" && src[this.pos + 1] === "{") {
        literal += "{";
        this.pos += 2;
      } else if (c === "}" && src[this.pos + 1] === "}") {
        literal += "}";
        this.pos += 2;
      } else if (c === "}") {
        this.fail(this.pos, "unmatched `}` (write `}}` for a literal brace)");
      } else if (c === "{") {
        if (literal !== "") {
          segments.push({ kind: "literal", text: literal });
          literal = "";
        }
        const open = this.pos;
        const close = src.indexOf("}", open);
        if (close < 0) this.fail(open, "unclosed `{` (write `{{` for a literal brace)");
        const body = src.slice(open + 1, close);
        if (body.startsWith("?")) segments.push(this.query(body.slice(1), open + 2));
        else segments.push({ kind: "placeholder", ph: this.placeholder(body, open + 1) });
        this.pos = close + 1;
      } else {
        literal += c;
        this.pos += 1;
      }
    }
    if (literal !== "") segments.push({ kind: "literal", text: literal });
    return segments;
  }

  private query(body: string, offset: number): Segment {
    if (rustTrim(body) === "") this.fail(offset, "empty query section `{?}`");
    const entries: Placeholder[] = [];
    const names: string[] = [];
    let at = offset;
    for (const part of body.split(",")) {
      const name = rustTrim(part.split("|")[0] ?? "");
      if (name === "") this.fail(at, "empty parameter name in a query section `{?…}` (a stray comma?)");
      if (names.includes(name)) this.fail(at, `parameter \`${name}\` appears twice in one query section`);
      names.push(name);
      entries.push(this.placeholder(part, at));
      at += part.length + 1;
    }
    entries.sort((a, b) => (a.param < b.param ? -1 : a.param > b.param ? 1 : 0));
    return { kind: "query", entries };
  }

  private placeholder(body: string, offset: number): Placeholder {
    const parts = body.split("|");
    const name = rustTrim(parts[0] ?? "");
    if (name === "") this.fail(offset, "empty placeholder `{}` (write `{{}}` for literal braces)");
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
      this.fail(offset, `\`${name}\` is not a placeholder name (letters, digits and \`_\`, not starting with a digit)`);
    }
    const normalisers: Normaliser[] = [];
    for (const raw of parts.slice(1)) {
      const n = rustTrim(raw);
      if (!NORMALISERS.has(n)) this.fail(offset, `unknown normaliser \`${n}\` (expected lower, upper, trim or sha256)`);
      if (normalisers[normalisers.length - 1] === "sha256") {
        this.fail(offset, `\`${n}\` after \`sha256\` in \`${name}\`: sha256 must be the last normaliser`);
      }
      normalisers.push(n as Normaliser);
    }
    if (!this.params.includes(name)) this.params.push(name);
    return { param: name, normalisers };
  }
}
