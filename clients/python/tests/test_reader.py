"""The reader helpers against a real Redis, single server and Cluster, sync
and asyncio: the fill guard's begin/fill/read semantics, tag registration,
version keys and namespace stamps. evictd's side of an invalidation is
played as evictd does it (docs/redis-layout.md, "Fill guard"): the stamp
replaced with `SET … XX PX`, then the key deleted."""

from __future__ import annotations

import time
from typing import Any

import pytest

import evictd
from evictd import asyncio as aevictd
from evictd.layout import guard_key, namespace_key, tag_key


def evictd_invalidates(client: Any, key: str, version: int = 17) -> None:
    client.set(guard_key(key), f"i{version}.00000000000000ab", xx=True, px=60_000)
    client.unlink(key)


def test_a_miss_takes_a_stamp_and_the_fill_passes(sync_client: Any, unique: str) -> None:
    key = f"user:{{{unique}}}:profile"
    miss = evictd.read(sync_client, key)
    assert isinstance(miss, evictd.Miss) and miss.stamp.startswith(b"r")
    assert sync_client.pttl(guard_key(key)) > 0
    assert evictd.fill(sync_client, key, miss.stamp, b"v1", 30_000)
    assert evictd.read(sync_client, key) == evictd.Hit(b"v1")
    assert 0 < sync_client.pttl(key) <= 30_000


def test_a_fill_after_evictd_invalidated_the_key_is_refused(sync_client: Any, unique: str) -> None:
    key = f"user:{{{unique}}}:profile"
    taken = evictd.begin_fill(sync_client, key)
    assert evictd.begin_fill(sync_client, key) == taken, "a second reader shares the stamp"
    evictd_invalidates(sync_client, key)
    assert not evictd.fill(sync_client, key, taken, b"old", 30_000)
    assert sync_client.get(key) is None
    # A reader that starts after the invalidation gets evictd's stamp and fills.
    fresh = evictd.read(sync_client, key)
    assert isinstance(fresh, evictd.Miss) and fresh.stamp.startswith(b"i17.")
    assert evictd.fill(sync_client, key, fresh.stamp, b"new", 0)
    assert sync_client.get(key) == b"new" and sync_client.pttl(key) == -1


def test_an_expired_stamp_fails_the_fill(sync_client: Any, unique: str) -> None:
    key = f"{unique}:no-hash-tag"
    taken = evictd.begin_fill(sync_client, key, stamp_ttl_ms=1)
    time.sleep(0.01)
    assert not evictd.fill(sync_client, key, taken, b"v", 1000)


def test_register_scores_with_the_expiry_and_always_changes_the_score(sync_client: Any, unique: str) -> None:
    key, tag = f"search:{unique}", f"category:{unique}"
    at = int(time.time() * 1000) + 60_000
    evictd.register_at(sync_client, key, [tag], at)
    assert sync_client.zscore(tag_key(tag), key) == at
    evictd.register_at(sync_client, key, [tag], at)
    assert sync_client.zscore(tag_key(tag), key) == pytest.approx(at + 0.001)
    assert abs(sync_client.pexpiretime(tag_key(tag)) - at) <= 1


def test_register_then_fill_in_the_documented_order(sync_client: Any, unique: str) -> None:
    key, tags = f"search:{unique}:q", [f"category:{unique}", f"brand:{unique}"]
    loads = []

    def load() -> bytes:
        loads.append(1)
        # The registrations exist before the database is read.
        assert all(sync_client.zscore(tag_key(t), key) is not None for t in tags)
        return b"[1,2]"

    sync_client.set(namespace_key(f"c{unique}"), "17")
    assert evictd.fill_through(sync_client, key, load, ttl_ms=30_000, tags=tags, namespace=f"c{unique}") == b"[1,2]"
    assert sync_client.get(key) == b"17|[1,2]"
    assert evictd.fill_through(sync_client, key, load, ttl_ms=30_000, tags=tags, namespace=f"c{unique}") == b"[1,2]"
    assert len(loads) == 1
    # A namespace bump makes the stamped value a miss.
    sync_client.set(namespace_key(f"c{unique}"), "18")
    evictd.fill_through(sync_client, key, load, ttl_ms=30_000, tags=tags, namespace=f"c{unique}")
    assert len(loads) == 2 and sync_client.get(key) == b"18|[1,2]"


def test_version_keys_and_namespaces_read_as_zero_when_missing(sync_client: Any, unique: str) -> None:
    key = f"sku:{{{unique}}}:price:EUR"
    assert evictd.read_version(sync_client, key) == 0
    assert evictd.namespace_version(sync_client, unique) == 0
    sync_client.set(key, "4271093")
    assert evictd.read_version(sync_client, key) == 4271093
    assert evictd.versioned_key(key, 4271093) == f"sku:{{{unique}}}:price:EUR:v4271093"
    sync_client.set(key, "x")
    with pytest.raises(evictd.reader.VersionError):
        evictd.read_version(sync_client, key)


def test_scripts_load_themselves_after_a_script_flush(standalone: Any, unique: str) -> None:
    standalone.script_flush()
    assert isinstance(evictd.read(standalone, unique), evictd.Miss)


async def test_async_helpers_guard_register_and_version(async_client: Any, unique: str) -> None:
    key = f"user:{{{unique}}}:profile"
    miss = await aevictd.read(async_client, key)
    assert isinstance(miss, evictd.Miss)
    await aevictd.register(async_client, key, [f"user:{unique}"], 30_000)
    assert await async_client.zscore(tag_key(f"user:{unique}"), key) is not None
    assert await aevictd.begin_fill(async_client, key) == miss.stamp
    await async_client.set(guard_key(key), "i9", xx=True, px=60_000)
    assert not await aevictd.fill(async_client, key, miss.stamp, b"old", 30_000)
    fresh = await aevictd.read(async_client, key)
    assert isinstance(fresh, evictd.Miss) and fresh.stamp == b"i9"
    assert await aevictd.fill(async_client, key, fresh.stamp, b"new", 30_000)
    assert await aevictd.read(async_client, key) == evictd.Hit(b"new")
    assert await aevictd.read_version(async_client, f"v:{unique}") == 0

    async def load() -> bytes:
        return b"p"

    assert await aevictd.fill_through(async_client, f"k:{{{unique}}}", load, ttl_ms=1000, namespace=unique) == b"p"
    assert await async_client.get(f"k:{{{unique}}}") == b"0|p"
