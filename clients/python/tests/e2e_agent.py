"""The Python agent of evictd's end-to-end client tests (tests/it/clients.rs,
which documents the line protocol): a process holding a
:class:`evictd.LocalCache` kept by the sync :class:`evictd.Subscriber`,
driven over stdin and stdout.

    python e2e_agent.py --redis URL --channel C --transport both|pubsub|stream --heartbeat-ms N

It prints ``ready`` once subscribed, answers every command line with one
line, and prints ``dropped <key> <unix_ms>`` whenever an entry it filled
leaves the local cache because of the broadcast (a key, a tag, a cache or a
flush). Lines are written whole under one lock, so an event never splits a
reply.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading
import time
from typing import Any, Hashable, Iterable, Optional

import redis.asyncio

# The client of this checkout, whatever the venv's editable install points
# at (the venv only provides the dependencies).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

from evictd import MISSING, LocalCache, Subscriber  # noqa: E402

_out = threading.Lock()


def emit(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class WatchedCache(LocalCache):
    """A local cache that reports each filled entry an invalidation drops."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._watched: set[Hashable] = set()
        self._watch_lock = threading.Lock()

    def watch(self, key: Hashable) -> None:
        with self._watch_lock:
            self._watched.add(key)

    def _report(self) -> None:
        now_ms = time.time() * 1000.0
        with self._watch_lock:
            gone = [key for key in self._watched if key not in self]
            for key in gone:
                self._watched.discard(key)
        for key in gone:
            emit(f"dropped {key} {now_ms:.3f}")

    def drop_keys(self, keys: Iterable[Hashable]) -> int:
        n = super().drop_keys(keys)
        self._report()
        return n

    def drop_tags(self, tags: Iterable[str]) -> int:
        n = super().drop_tags(tags)
        self._report()
        return n

    def drop_caches(self, caches: Iterable[str]) -> int:
        n = super().drop_caches(caches)
        self._report()
        return n

    def clear(self) -> int:
        n = super().clear()
        self._report()
        return n


def stats(local: LocalCache, sub: Subscriber) -> dict[str, Any]:
    m = local.metrics
    h = m.commit_to_drop

    def ms(seconds: Optional[float]) -> Optional[float]:
        return None if seconds is None else seconds * 1000.0

    return {
        "entries": len(local),
        "hits": m.hits,
        "misses": m.misses,
        "invalidations": m.invalidations,
        "replays": m.replays,
        "gaps": m.gaps,
        "flushes": m.flushes,
        "rejected_fills": m.rejected_fills,
        "commit_to_drop": {"count": h.count, "p50_ms": ms(h.quantile(0.5)), "p99_ms": ms(h.quantile(0.99))},
        "applied": None if sub.inner.applied_lsn is None else f"{sub.inner.applied_lsn >> 32:X}/{sub.inner.applied_lsn & 0xFFFFFFFF:X}",
    }


def serve(local: WatchedCache, sub: Subscriber) -> None:
    for raw in sys.stdin:
        words = raw.split()
        if not words:
            continue
        command, args = words[0], words[1:]
        try:
            if command == "fill" and len(args) >= 3:
                cache, key, value, tags = args[0], args[1], args[2], args[3:]
                local.watch(key)
                kept = local.put(local.begin(key, cache, tags), value)
                emit("ok" if kept else "rejected")
            elif command == "get" and len(args) == 1:
                value = local.get(args[0])
                emit("miss" if value is MISSING else f"hit {value}")
            elif command == "stats" and not args:
                emit("stats " + json.dumps(stats(local, sub), separators=(",", ":")))
            elif command == "quit":
                emit("bye")
                return
            else:
                emit(f"error unknown command: {raw.strip()}")
        except Exception as error:  # reported, never fatal: the harness decides
            emit(f"error {type(error).__name__}: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--transport", choices=["both", "pubsub", "stream"], required=True)
    parser.add_argument("--heartbeat-ms", type=int, required=True)
    options = parser.parse_args()

    # Entries live an hour: in these tests only the broadcast removes them.
    local = WatchedCache(max_entries=100_000, ttl=3600.0, jitter=0.0)
    url = options.redis
    sub = Subscriber(
        client_factory=lambda: redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2),
        local=local,
        channel=options.channel,
        transport=options.transport,
        heartbeat_ms=options.heartbeat_ms,
        reconnect_delay=0.05,
    )
    try:
        sub.start()
    except Exception as error:
        emit(f"error the subscriber did not start: {error}")
        return 1
    emit("ready")
    try:
        serve(local, sub)
    finally:
        sub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
