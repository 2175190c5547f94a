"""A STAND-IN for evictd's broadcast publisher, format 2, for these tests
only: evictd does not publish version 2 yet. It writes exactly what
docs/broadcast.md says — `:seq` and `:epoch` started together from the Redis
clock in µs, `touched` per cache (and `*tags`) before the message goes out,
`XADD … MAXLEN ~ N * m <message>`, `PUBLISH`, and heartbeats on pub/sub only —
in one script, so the tests check the subscriber against the text of the
spec. `deliver` lets a test lose a message on one path (or both)."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Optional

from evictd.broadcast import format_lsn, keys_of, parse_lsn

PUBLISH_V2_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  local start = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('SET', KEYS[1], start)
  redis.call('SET', KEYS[2], start)
end
local seq = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
local msg = '{"v":2,"kind":"batch","epoch":"' .. epoch .. '","seq":' .. string.format('%d', seq) .. ARGV[4]
for i = 5, #ARGV do redis.call('HSET', KEYS[4], ARGV[i], seq) end
if ARGV[2] == 'both' or ARGV[2] == 'stream' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'm', msg)
end
if ARGV[2] == 'both' or ARGV[2] == 'pubsub' then
  redis.call('PUBLISH', ARGV[1], msg)
end
return seq
"""


class StandInPublisher:
    def __init__(self, client: Any, channel: str, *, max_len: int = 100_000) -> None:
        self.client = client
        self.keys = keys_of(channel)
        self.max_len = max_len
        self.batch = 0
        self.applied: Optional[int] = None

    def _raise_applied(self, lsn: Optional[str]) -> Optional[dict[str, str]]:
        if lsn is None:
            return None
        value = parse_lsn(lsn)
        stored = self.client.hget(self.keys.applied, "postgres")
        if stored is None or parse_lsn(stored.decode()) < value:
            self.client.hset(self.keys.applied, "postgres", format_lsn(value))
        return {"kind": "postgres", "lsn": format_lsn(value)}

    def publish(
        self,
        *,
        caches: Iterable[str] = (),
        keys: Iterable[str] = (),
        tags: Iterable[str] = (),
        flush: Iterable[str] = (),
        applied: Optional[str] = None,
        commit_lsn: str = "0/10",
        committed_at_ms: Optional[int] = None,
        deliver: str = "both",
    ) -> int:
        """Publishes one batch; ``deliver``: ``both``, ``pubsub``, ``stream``
        or ``none`` (what a subscriber will be able to see of it)."""
        self.batch += 1
        caches, keys, tags, flush = sorted(caches), list(keys), list(tags), list(flush)
        applied_doc = self._raise_applied(applied)
        rest: dict[str, Any] = {
            "batch": self.batch,
            "position": {"kind": "postgres", "commit_lsn": commit_lsn, "lsn": commit_lsn},
        }
        if committed_at_ms is not None:
            rest["committed_at_ms"] = committed_at_ms
        if applied_doc is not None:
            rest["applied"] = applied_doc
        rest.update(
            caches=caches, keys=keys, tags=tags, flush=flush, truncated=False, published_at_ms=int(time.time() * 1000)
        )
        tail = "," + json.dumps(rest, separators=(",", ":"))[1:]
        touched = sorted(set(caches) | set(flush)) + (["*tags"] if tags else [])
        k = self.keys
        return int(
            self.client.eval(
                PUBLISH_V2_LUA, 4, k.seq, k.epoch, k.stream, k.touched, k.channel, deliver, self.max_len, tail, *touched
            )
        )

    def heartbeat(self, applied: Optional[str] = None) -> None:
        epoch, seq = self.client.get(self.keys.epoch), self.client.get(self.keys.seq)
        doc: dict[str, Any] = {"v": 2, "kind": "heartbeat", "epoch": epoch.decode(), "seq": int(seq)}
        applied_doc = self._raise_applied(applied)
        if applied_doc is not None:
            doc["applied"] = applied_doc
        doc["published_at_ms"] = int(time.time() * 1000)
        self.client.publish(self.keys.channel, json.dumps(doc, separators=(",", ":")))

    def lose_sequence(self) -> None:
        """Redis lost the channel's keys (a restart without persistence): the
        next message starts a new epoch."""
        k = self.keys
        self.client.delete(k.seq, k.epoch, k.stream, k.touched)
