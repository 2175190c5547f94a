"""Reader helpers on redis-py (sync): the fill guard, version keys, namespace
stamps and tag registration, byte-compatible with evictd's ``src/reader.rs``.
The asyncio twin is :mod:`evictd.asyncio.reader` (same names, awaited).

The documented order for a key filled under tags (``docs/redis-layout.md``)
is **stamp → register → read the database → fill**: :func:`fill_through`
does it whole. Registering after the database read loses a race with evictd's
tag scan; filling without the stamp loses a race with its delete.

Every call runs on the key's (or the tag's) hash slot only, so each works on
a ``redis.Redis`` and on a ``redis.cluster.RedisCluster`` alike. Replies are
handled whether or not the client decodes responses.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

from redis.exceptions import NoScriptError

from .layout import Bytes, guard_key, namespace_key, parse_version, stamp, tag_key, to_bytes, unstamp
from .scripts import FILL_BEGIN_LUA, FILL_LUA, READ_LUA, REGISTER_LUA

__all__ = [
    "Hit",
    "Miss",
    "ReadResult",
    "DEFAULT_STAMP_TTL_MS",
    "read",
    "begin_fill",
    "fill",
    "register",
    "register_at",
    "read_version",
    "namespace_version",
    "fill_through",
    "VersionError",
]

#: evictd's default ``fill_guard_ttl_ms``: give stamps the same.
DEFAULT_STAMP_TTL_MS = 60_000


class VersionError(ValueError):
    """A version key or namespace key holds something that is not a version."""


@dataclass(frozen=True)
class Hit:
    value: bytes


@dataclass(frozen=True)
class Miss:
    """A miss, with the stamp to pass to :func:`fill`."""

    stamp: bytes


ReadResult = Union[Hit, Miss]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _sha(lua: str) -> str:
    return hashlib.sha1(lua.encode("utf-8")).hexdigest()


SHAS = {lua: _sha(lua) for lua in (READ_LUA, FILL_BEGIN_LUA, FILL_LUA, REGISTER_LUA)}


def _run(client: Any, lua: str, keys: list[Any], args: list[Any]) -> Any:
    """EVALSHA, or EVAL (which loads the script) when the server answers
    NOSCRIPT. On a Cluster both are routed by the first key."""
    try:
        return client.evalsha(SHAS[lua], len(keys), *keys, *args)
    except NoScriptError:
        return client.eval(lua, len(keys), *keys, *args)


def _decode_read(reply: Any) -> ReadResult:
    hit, data = reply[0], to_bytes(reply[1])
    return Hit(data) if int(hit) == 1 else Miss(data)


def read(client: Any, key: Bytes, stamp_ttl_ms: int = DEFAULT_STAMP_TTL_MS) -> ReadResult:
    """The value of ``key``, or on a miss its fill-guard stamp (taken before
    the database read), in one round trip."""
    reply = _run(client, READ_LUA, [to_bytes(key), guard_key(key)], [stamp_ttl_ms])
    return _decode_read(reply)


def begin_fill(client: Any, key: Bytes, stamp_ttl_ms: int = DEFAULT_STAMP_TTL_MS) -> bytes:
    """The current stamp of ``key``, created if there is none. Call it before
    reading the database."""
    return to_bytes(_run(client, FILL_BEGIN_LUA, [guard_key(key)], [stamp_ttl_ms]))


def fill(client: Any, key: Bytes, stamp_: Bytes, value: Bytes, ttl_ms: int) -> bool:
    """Sets ``key`` to ``value`` (TTL in ms, 0 for none) only if its stamp is
    still ``stamp_``. ``False``: evictd invalidated the key meanwhile (or the
    stamp expired): serve the value, it was not cached."""
    reply = _run(client, FILL_LUA, [to_bytes(key), guard_key(key)], [to_bytes(stamp_), to_bytes(value), ttl_ms])
    return int(reply) == 1


def register_at(client: Any, key: Bytes, tags: Iterable[str], expire_at_ms: int) -> None:
    """Registers ``key`` under each tag, scored with its expiry (Unix ms):
    one ``REGISTER`` script call per tag, on the tag's slot."""
    for tag in tags:
        _run(client, REGISTER_LUA, [tag_key(tag)], [to_bytes(key), expire_at_ms])


def register(client: Any, key: Bytes, tags: Iterable[str], ttl_ms: int) -> None:
    """:func:`register_at` with expiry now + ``ttl_ms``. Call it **after**
    taking the stamp and **before** reading the database, then fill with the
    same ``ttl_ms``."""
    register_at(client, key, tags, now_ms() + ttl_ms)


def _version(key: str, stored: Any) -> int:
    if stored is None:
        return 0
    version = parse_version(stored)
    if version is None:
        raise VersionError(f"{key} does not hold a version: {stored!r}")
    return version


def read_version(client: Any, key: str) -> int:
    """The version held by a ``bump`` cache's version key (missing: 0). Read
    it before the database, then use ``versioned_key(key, version)``."""
    return _version(key, client.get(key))


def namespace_version(client: Any, cache: str) -> int:
    """The namespace version of ``cache`` (missing: 0). Read it before the
    database; stamp fills with it and compare for equality on reads."""
    return read_version(client, namespace_key(cache))


def fill_through(
    client: Any,
    key: Bytes,
    load: Callable[[], Bytes],
    *,
    ttl_ms: int,
    tags: Iterable[str] = (),
    namespace: Optional[str] = None,
    stamp_ttl_ms: int = DEFAULT_STAMP_TTL_MS,
) -> bytes:
    """Reads ``key`` through Redis, filling it safely on a miss: the namespace
    version of cache ``namespace`` (if given) and the stamp before the
    database, then the tag registrations, then ``load()``, then the guarded
    fill (stamped ``<ns>|`` when ``namespace`` is given). Returns the payload;
    a refused fill still returns what ``load()`` read."""
    ns = namespace_version(client, namespace) if namespace is not None else None
    result = read(client, key, stamp_ttl_ms)
    if isinstance(result, Hit):
        if ns is None:
            return result.value
        payload = unstamp(result.value, ns)
        if payload is not None:
            return payload
        taken = begin_fill(client, key, stamp_ttl_ms)
    else:
        taken = result.stamp
    tags = list(tags)
    if tags:
        register(client, key, tags, ttl_ms)
    value = to_bytes(load())
    fill(client, key, taken, stamp(ns, value) if ns is not None else value, ttl_ms)
    return value
