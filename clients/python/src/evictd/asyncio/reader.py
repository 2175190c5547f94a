"""The reader helpers of :mod:`evictd.reader` on ``redis.asyncio``: the same
names and the same scripts, awaited. Works with ``redis.asyncio.Redis`` and
``redis.asyncio.cluster.RedisCluster``."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Iterable, Optional, Union

from redis.exceptions import NoScriptError

from ..layout import Bytes, guard_key, namespace_key, stamp, tag_key, to_bytes, unstamp
from ..reader import (
    DEFAULT_STAMP_TTL_MS,
    SHAS,
    Hit,
    Miss,
    ReadResult,
    VersionError,
    _decode_read,
    _version,
    now_ms,
)
from ..scripts import FILL_BEGIN_LUA, FILL_LUA, READ_LUA, REGISTER_LUA

__all__ = [
    "Hit",
    "Miss",
    "ReadResult",
    "VersionError",
    "DEFAULT_STAMP_TTL_MS",
    "read",
    "begin_fill",
    "fill",
    "register",
    "register_at",
    "read_version",
    "namespace_version",
    "fill_through",
]


async def _run(client: Any, lua: str, keys: list[Any], args: list[Any]) -> Any:
    try:
        return await client.evalsha(SHAS[lua], len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(lua, len(keys), *keys, *args)


async def read(client: Any, key: Bytes, stamp_ttl_ms: int = DEFAULT_STAMP_TTL_MS) -> ReadResult:
    """See :func:`evictd.reader.read`."""
    return _decode_read(await _run(client, READ_LUA, [to_bytes(key), guard_key(key)], [stamp_ttl_ms]))


async def begin_fill(client: Any, key: Bytes, stamp_ttl_ms: int = DEFAULT_STAMP_TTL_MS) -> bytes:
    """See :func:`evictd.reader.begin_fill`."""
    return to_bytes(await _run(client, FILL_BEGIN_LUA, [guard_key(key)], [stamp_ttl_ms]))


async def fill(client: Any, key: Bytes, stamp_: Bytes, value: Bytes, ttl_ms: int) -> bool:
    """See :func:`evictd.reader.fill`."""
    reply = await _run(client, FILL_LUA, [to_bytes(key), guard_key(key)], [to_bytes(stamp_), to_bytes(value), ttl_ms])
    return int(reply) == 1


async def register_at(client: Any, key: Bytes, tags: Iterable[str], expire_at_ms: int) -> None:
    """See :func:`evictd.reader.register_at`."""
    for tag in tags:
        await _run(client, REGISTER_LUA, [tag_key(tag)], [to_bytes(key), expire_at_ms])


async def register(client: Any, key: Bytes, tags: Iterable[str], ttl_ms: int) -> None:
    """See :func:`evictd.reader.register`."""
    await register_at(client, key, tags, now_ms() + ttl_ms)


async def read_version(client: Any, key: str) -> int:
    """See :func:`evictd.reader.read_version`."""
    return _version(key, await client.get(key))


async def namespace_version(client: Any, cache: str) -> int:
    """See :func:`evictd.reader.namespace_version`."""
    return await read_version(client, namespace_key(cache))


async def fill_through(
    client: Any,
    key: Bytes,
    load: Callable[[], Awaitable[Union[str, bytes]]],
    *,
    ttl_ms: int,
    tags: Iterable[str] = (),
    namespace: Optional[str] = None,
    stamp_ttl_ms: int = DEFAULT_STAMP_TTL_MS,
) -> bytes:
    """See :func:`evictd.reader.fill_through`; ``load`` is awaited."""
    ns = await namespace_version(client, namespace) if namespace is not None else None
    result = await read(client, key, stamp_ttl_ms)
    if isinstance(result, Hit):
        if ns is None:
            return result.value
        payload = unstamp(result.value, ns)
        if payload is not None:
            return payload
        taken = await begin_fill(client, key, stamp_ttl_ms)
    else:
        taken = result.stamp
    tags = list(tags)
    if tags:
        await register(client, key, tags, ttl_ms)
    value = to_bytes(await load())
    await fill(client, key, taken, stamp(ns, value) if ns is not None else value, ttl_ms)
    return value
