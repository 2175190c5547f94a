// A JSON reader that keeps integers beyond 2^53 exact (as bigint), for the
// key-rendering vectors: JSON.parse would round 9223372036854775807.

export type Exact = null | boolean | number | bigint | string | Exact[] | { [k: string]: Exact };

export function parseExact(text: string): Exact {
  let i = 0;
  const ws = () => {
    while (i < text.length && " \t\n\r".includes(text[i] as string)) i += 1;
  };
  const value = (): Exact => {
    ws();
    const c = text[i];
    if (c === "{") {
      i += 1;
      const o: { [k: string]: Exact } = {};
      ws();
      if (text[i] === "}") {
        i += 1;
        return o;
      }
      for (;;) {
        ws();
        const k = value() as string;
        ws();
        i += 1; // :
        o[k] = value();
        ws();
        if (text[i++] === "}") return o;
      }
    }
    if (c === "[") {
      i += 1;
      const a: Exact[] = [];
      ws();
      if (text[i] === "]") {
        i += 1;
        return a;
      }
      for (;;) {
        a.push(value());
        ws();
        if (text[i++] === "]") return a;
      }
    }
    if (c === '"') {
      const start = i;
      i += 1;
      while (text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
      i += 1;
      return JSON.parse(text.slice(start, i)) as string;
    }
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|^true|^false|^null/.exec(text.slice(i));
    if (m === null) throw new Error(`bad JSON at ${i}`);
    i += m[0].length;
    if (m[0] === "true") return true;
    if (m[0] === "false") return false;
    if (m[0] === "null") return null;
    if (m[2] === undefined && m[3] === undefined) {
      const n = Number(m[0]);
      return Number.isSafeInteger(n) ? n : BigInt(m[0]);
    }
    return Number(m[0]);
  };
  const v = value();
  return v;
}
