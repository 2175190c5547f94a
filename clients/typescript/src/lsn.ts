/**
 * Postgres log sequence numbers (`X/Y`, two hex halves of a 64-bit
 * position) as `bigint`s, for read-your-writes: an application's commit
 * position is `SELECT pg_current_wal_lsn()` after `COMMIT`, on the same
 * connection (see {@link COMMIT_POSITION_SQL}).
 */

/** The query that gives a session's commit position, right after its `COMMIT`. */
export const COMMIT_POSITION_SQL = "SELECT pg_current_wal_lsn()::text AS lsn";

/** An `X/Y` LSN that does not parse. */
export class LsnError extends Error {
  override readonly name = "LsnError";
  constructor(readonly text: string) {
    super(`\`${text}\` is not a Postgres LSN (X/Y, hexadecimal)`);
  }
}

/** `"0/1A2B3C8"` → `0x1A2B3C8n`. Accepts a bigint as it is. */
export function parseLsn(lsn: string | bigint): bigint {
  if (typeof lsn === "bigint") return lsn;
  const m = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/.exec(lsn.trim());
  if (m === null) throw new LsnError(lsn);
  return (BigInt(`0x${m[1]}`) << 32n) | BigInt(`0x${m[2]}`);
}

/** `0x1A2B3C8n` → `"0/1A2B3C8"` (Postgres's spelling). */
export function formatLsn(lsn: bigint): string {
  return `${(lsn >> 32n).toString(16).toUpperCase()}/${(lsn & 0xffffffffn).toString(16).toUpperCase()}`;
}
