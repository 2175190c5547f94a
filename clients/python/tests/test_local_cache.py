"""LocalCache without Redis: single flight, the local fill guard, tags,
caches, the bound, jittered TTLs and the pub/sub TTL rule; and the
subscriber's pure decisions (broadcast.Tracker)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from evictd.broadcast import Action, Batch, Heartbeat, Tracker, Unknown, parse_lsn, parse_message, repair_plan
from evictd.cache import MISSING, LocalCache, LocalTtlError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_loader_per_key_across_threads() -> None:
    local = LocalCache()
    started, release = threading.Event(), threading.Event()
    calls = []

    def load() -> str:
        calls.append(1)
        started.set()
        release.wait(5)
        return "v"

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(local.get_or_load("k", load))) for _ in range(8)]
    threads[0].start()
    started.wait(5)
    for t in threads[1:]:
        t.start()
    release.set()
    for t in threads:
        t.join(5)
    assert calls == [1] and results == ["v"] * 8
    assert local.get("k") == "v"


async def test_one_loader_per_key_in_asyncio() -> None:
    local = LocalCache()
    calls = []

    async def load() -> str:
        calls.append(1)
        await asyncio.sleep(0.01)
        return "v"

    assert await asyncio.gather(*(local.aget_or_load("k", load) for _ in range(10))) == ["v"] * 10
    assert calls == [1]


@pytest.mark.parametrize("how", ["key", "tag", "cache", "all"])
async def test_a_fill_that_raced_an_invalidation_is_refused(how: str) -> None:
    local = LocalCache()
    loading = asyncio.Event()
    go = asyncio.Event()

    async def load() -> str:
        loading.set()
        await go.wait()
        return "old"

    task = asyncio.create_task(local.aget_or_load("user:{1}", load, cache="profile", tags=["user:1"]))
    await loading.wait()
    {"key": lambda: local.drop_keys(["user:{1}"]), "tag": lambda: local.drop_tags(["user:1"]),
     "cache": lambda: local.drop_caches(["profile"]), "all": local.clear}[how]()

    async def fresh() -> str:
        return "new"

    # A caller after the invalidation does not join the old load.
    assert await local.aget_or_load("user:{1}", fresh, cache="profile") == "new"
    go.set()
    assert await task == "old"  # served, not kept
    assert local.get("user:{1}") == "new"
    assert local.metrics.rejected_fills == 1


def test_an_unrelated_invalidation_does_not_refuse_a_fill() -> None:
    local = LocalCache()
    ticket = local.begin("a", cache="x", tags=["t"])
    local.drop_keys(["b"])
    local.drop_tags(["u"])
    local.drop_caches(["y"])
    assert local.put(ticket, 1)
    assert local.get("a") == 1


def test_drops_by_key_tag_cache_and_tagged() -> None:
    local = LocalCache()
    for key, cache, tags in [("a", "c1", ["t1"]), ("b", "c1", []), ("c", "c2", ["t2"]), ("d", None, [])]:
        local.put(local.begin(key, cache, tags), key)
    assert local.drop_tags(["t1"]) == 1 and "a" not in local
    assert local.drop_caches(["c1"]) == 1 and "b" not in local
    local.tag("d", ["t3"])
    assert local.drop_tagged() == 2 and len(local) == 0


def test_ttls_are_jittered_downwards_and_expire() -> None:
    clock = Clock()
    local = LocalCache(ttl=10.0, jitter=0.5, clock=clock, rng=lambda: 0.999)
    local.put(local.begin("k"), "v")
    clock.now += 5.0
    assert local.get("k") == "v"
    clock.now += 0.1
    assert local.get("k") is MISSING


def test_the_bound_evicts_the_least_recently_used() -> None:
    local = LocalCache(max_entries=2)
    for k in "abc":
        local.put(local.begin(k), k)
        if k == "b":
            local.get("a")
    assert "a" in local and "b" not in local and "c" in local
    assert local.metrics.evictions == 1


def test_a_local_ttl_longer_than_redis_is_refused_on_pubsub_only() -> None:
    local = LocalCache()
    local.define("profile", ttl=20, redis_ttl=10)  # fine while a stream can replay
    with pytest.raises(LocalTtlError):
        local.set_pubsub_only(True)
    local.define("profile", ttl=10, redis_ttl=10)
    local.set_pubsub_only(True)
    with pytest.raises(LocalTtlError):
        local.define("feed", ttl=30, redis_ttl=15)
    with pytest.raises(LocalTtlError):
        local.get_or_load("k", lambda: 1, cache="profile", ttl=11)


def _batch(seq: int, epoch: str = "E") -> Batch:
    return Batch(epoch=epoch, seq=seq)


def test_tracker_decides_as_the_spec_table_says() -> None:
    t = Tracker("E", 10)
    assert t.decide(_batch(11)).action is Action.APPLY
    assert t.decide(_batch(10)).action is Action.IGNORE
    assert t.decide(_batch(3)).action is Action.IGNORE
    gap = t.decide(_batch(13))
    assert (gap.action, gap.last, gap.apply_after) == (Action.GAP, 10, True)
    assert t.decide(Heartbeat("E", 11)).action is Action.GAP
    assert t.decide(Heartbeat("E", 10)).action is Action.IGNORE
    assert t.decide(_batch(1, "F")).action is Action.FLUSH
    assert t.decide(Heartbeat("F", 10)).action is Action.FLUSH
    assert t.decide(Unknown(3)).action is Action.FLUSH
    assert t.decide(Unknown(2, "gossip")).action is Action.IGNORE
    t.advance("E", 9)
    assert t.seq == 10, "never lowered within an epoch"


def test_messages_parse_and_lsns_compare() -> None:
    m = parse_message(
        b'{"v":2,"kind":"batch","epoch":"1","seq":5,"batch":17,'
        b'"position":{"kind":"postgres","commit_lsn":"0/1A2B3C8","lsn":"0/1A2B3C8"},'
        b'"applied":{"kind":"postgres","lsn":"0/1A2B400"},"caches":["c"],"keys":["k"],"tags":["t"],'
        b'"flush":["f"],"truncated":false,"published_at_ms":1764000000123}'
    )
    assert isinstance(m, Batch) and m.keys == ("k",) and m.applied_lsn == parse_lsn("0/1A2B400")
    assert m.commit_lsn == 0x1A2B3C8
    assert parse_lsn("1/0") > parse_lsn("0/FFFFFFFF")
    assert isinstance(parse_message(b'{"v":1,"seq":3}'), Unknown)
    with pytest.raises(ValueError):
        parse_message(b'{"v":2,"kind":"batch","seq":3}')


def test_a_repair_drops_only_caches_touched_after_the_last_seq() -> None:
    assert repair_plan({"a": 5, "b": 7, "*tags": 4}, 5) == (["b"], False)
    assert repair_plan({"a": 5, "*tags": 6}, 5) == ([], True)
