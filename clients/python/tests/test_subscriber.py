"""The asyncio subscriber against the real Redis, fed by the stand-in
publisher (tests/standin_publisher.py), one channel per test."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest
import redis
import redis.asyncio

from evictd import LocalCache
from evictd.asyncio import Subscriber

from .standin_publisher import StandInPublisher


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


def fill(local: LocalCache, key: str, cache: str, tags: tuple[str, ...] = ()) -> None:
    assert local.put(local.begin(key, cache, tags), f"value of {key}")


@pytest.fixture
def publisher(standalone: redis.Redis, unique: str) -> StandInPublisher:
    return StandInPublisher(standalone, unique)


@pytest.fixture
async def aclient(redis_url: str, unique: str) -> Any:
    client = redis.asyncio.Redis.from_url(redis_url, client_name=unique)
    yield client
    await client.aclose()


@pytest.mark.parametrize("transport", ["pubsub", "stream", "both"])
async def test_a_batch_drops_keys_tags_and_caches(transport: str, aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])  # the channel exists before the subscriber
    async with Subscriber(aclient, local, channel=unique, transport=transport) as sub:  # type: ignore[arg-type]
        fill(local, "user:{1}", "profile")
        fill(local, "user:{2}", "profile")
        fill(local, "search:a", "search", ("category:3",))
        fill(local, "feed:1", "feed")
        fill(local, "other", "other")
        sub.track_commit("user:{1}", time.time() - 0.05)
        publisher.publish(caches=["profile"], keys=["user:{1}"], tags=["category:3"], flush=["feed"])
        await eventually(lambda: "user:{1}" not in local)
        assert "search:a" not in local and "feed:1" not in local
        assert "user:{2}" in local and "other" in local
        await asyncio.sleep(0.05)  # both paths delivered: applied once
        m = local.metrics
        assert (m.invalidations, m.gaps, m.flushes) == (1, 0, 0)
        assert m.publish_to_drop.count == 1 and m.commit_to_drop.count == 1
        assert m.commit_to_drop.sum >= 0.05


async def test_commit_to_drop_is_measured_from_the_messages_commit_time(
    aclient: Any, publisher: StandInPublisher, unique: str
) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="pubsub") as sub:
        fill(local, "k", "c")
        sub.track_commit("k", time.time() - 100)  # superseded by the message's own time
        publisher.publish(caches=["c"], keys=["k"], committed_at_ms=int(time.time() * 1000) - 50)
        await eventually(lambda: "k" not in local)
        h = local.metrics.commit_to_drop
        assert h.count == 1 and 0.05 <= h.sum < 10


async def test_a_lost_pubsub_message_is_repaired_through_touched(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="pubsub"):
        fill(local, "user:{1}", "profile")
        fill(local, "user:{2}", "profile")
        fill(local, "p:1", "product")
        fill(local, "s:1", "search", ("t",))
        publisher.publish(caches=["profile"], keys=["user:{1}"], deliver="none")  # lost
        publisher.publish(caches=["other"], keys=["o:1"])
        # A gap is counted when seen, then repaired: wait for the repair too.
        await eventually(lambda: local.metrics.gaps == 1 and "user:{1}" not in local)
        # Only the cache the lost message touched goes, whole; the rest stays.
        assert "user:{1}" not in local and "user:{2}" not in local
        assert "p:1" in local and "s:1" in local
        assert local.metrics.flushes == 0


async def test_a_heartbeat_reveals_a_loss_on_a_quiet_channel(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="pubsub"):
        fill(local, "s:1", "search", ("t",))
        fill(local, "p:1", "product")
        publisher.publish(tags=["t"], deliver="none")
        publisher.heartbeat()
        await eventually(lambda: "s:1" not in local)
        assert "p:1" in local and local.metrics.gaps == 1


async def test_both_transports_replay_a_missed_message_from_the_stream(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="both", heartbeat_ms=60_000):
        fill(local, "user:{1}", "profile")
        fill(local, "user:{2}", "profile")
        publisher.publish(caches=["profile"], keys=["user:{1}"], deliver="stream")  # pub/sub lost it
        publisher.publish(caches=["other"], keys=["o:1"], deliver="pubsub")
        await eventually(lambda: local.metrics.invalidations == 2)
        # Replayed, not repaired: the rest of `profile` stays.
        assert "user:{1}" not in local and "user:{2}" in local
        assert local.metrics.replays >= 1


async def test_a_stream_trimmed_past_the_gap_falls_back_to_touched(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="both"):
        fill(local, "user:{2}", "profile")
        fill(local, "p:1", "product")
        publisher.publish(caches=["profile"], keys=["user:{1}"], deliver="none")
        publisher.publish(caches=["other"], keys=["o:1"])
        await eventually(lambda: "user:{2}" not in local)
        assert "p:1" in local and local.metrics.flushes == 0


async def test_a_new_epoch_flushes_and_a_continued_sequence_does_not(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="both"):
        fill(local, "a", "x")
        # An evictd restart or takeover continues the sequence: same epoch.
        restarted = StandInPublisher(publisher.client, unique)
        restarted.publish(keys=["zzz"], caches=["y"])
        await eventually(lambda: local.metrics.invalidations == 1)
        assert "a" in local and local.metrics.flushes == 0
        # Redis lost the keys: a new epoch.
        publisher.lose_sequence()
        await asyncio.sleep(0.002)
        publisher.publish(keys=["zzz"], caches=["y"])
        await eventually(lambda: local.metrics.flushes >= 1)
        assert "a" not in local


async def test_a_stream_subscriber_replays_after_its_connection_drops(
    aclient: Any, standalone: redis.Redis, publisher: StandInPublisher, unique: str
) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="stream", heartbeat_ms=200, reconnect_delay=0.05):
        fill(local, "user:{1}", "profile")
        fill(local, "user:{2}", "profile")
        for line in standalone.client_list():
            if line.get("name") == unique:
                standalone.client_kill_filter(_id=line["id"])
        publisher.publish(caches=["profile"], keys=["user:{1}"])
        await eventually(lambda: "user:{1}" not in local)
        assert "user:{2}" in local and local.metrics.flushes == 0 and local.metrics.gaps == 0


async def test_pubsub_silence_while_redis_answers_reconnects_without_a_flush(
    aclient: Any, publisher: StandInPublisher, unique: str
) -> None:
    # An evictd restart is silence too (docs/broadcast.md): it costs no flush.
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="pubsub", heartbeat_ms=100):
        fill(local, "a", "x")
        fill(local, "b", "y")
        await asyncio.sleep(0.8)  # more than 3 heartbeats, twice
        assert "a" in local and local.metrics.flushes == 0 and local.metrics.gaps == 0
        # Subscribed again: the next message is applied.
        publisher.publish(caches=["y"], keys=["b"])
        await eventually(lambda: "b" not in local)
        assert "a" in local and local.metrics.flushes == 0


async def test_pubsub_silence_while_redis_does_not_answer_flushes_once(
    redis_url: str, publisher: StandInPublisher, unique: str
) -> None:
    upstream = redis.connection.parse_url(redis_url)
    proxy = await _CuttableProxy.start(upstream.get("host", "127.0.0.1"), int(upstream.get("port", 6379)))
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port, socket_connect_timeout=0.5)
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    try:
        async with Subscriber(client, local, channel=unique, transport="pubsub", heartbeat_ms=100, reconnect_delay=0.05):
            fill(local, "a", "x")
            proxy.down = True
            await eventually(lambda: local.metrics.flushes == 1, timeout=3)
            assert "a" not in local
            fill(local, "b", "x")
            await asyncio.sleep(0.5)
            assert local.metrics.flushes == 1 and "b" in local, "one flush per outage"
            fill(local, "c", "y")
            publisher.publish(caches=["y"], keys=["k"])  # lost: a gap, repaired once back
            proxy.down = False
            # A gap is counted when seen, then repaired: wait for the repair too.
            await eventually(lambda: local.metrics.gaps == 1 and "c" not in local, timeout=10)
            assert "b" in local and "c" not in local and local.metrics.flushes == 1
    finally:
        await client.aclose()
        proxy.close()


async def test_pubsub_silence_flushes_with_on_silence_flush(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="pubsub", heartbeat_ms=100, on_silence="flush"):
        fill(local, "a", "x")
        await eventually(lambda: local.metrics.flushes >= 1, timeout=3)
        assert "a" not in local


class _CuttableProxy:
    """A TCP proxy in front of Redis: ``down`` cuts its connections and
    refuses new ones (Redis does not answer)."""

    def __init__(self) -> None:
        self._down = False
        self.port = 0
        self._server: Any = None
        self._writers: list[asyncio.StreamWriter] = []

    @classmethod
    async def start(cls, host: str, port: int) -> "_CuttableProxy":
        proxy = cls()

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if proxy._down:
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection(host, port)
            proxy._writers += [writer, up_writer]
            asyncio.ensure_future(pump(reader, up_writer))
            asyncio.ensure_future(pump(up_reader, writer))

        proxy._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        return proxy

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, down: bool) -> None:
        self._down = down
        if down:
            for writer in self._writers:
                writer.close()
            self._writers.clear()

    def close(self) -> None:
        self.down = True
        self._server.close()


async def test_heartbeats_keep_a_quiet_channel_alive(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="pubsub", heartbeat_ms=200):
        fill(local, "a", "x")
        for _ in range(8):
            publisher.heartbeat()
            await asyncio.sleep(0.1)
        assert "a" in local and local.metrics.flushes == 0 and local.metrics.gaps == 0


async def test_an_unknown_format_version_flushes(aclient: Any, publisher: StandInPublisher, standalone: redis.Redis, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    async with Subscriber(aclient, local, channel=unique, transport="pubsub"):
        fill(local, "a", "x")
        standalone.publish(unique, '{"v":3,"kind":"batch"}')
        await eventually(lambda: "a" not in local)


async def test_wait_applied_reads_the_hash_then_follows_heartbeats(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    publisher.publish(caches=["warmup"], applied="0/100")
    async with Subscriber(aclient, local, channel=unique, transport="pubsub", heartbeat_ms=5000) as sub:
        assert await sub.wait_applied("0/100", timeout=0.1)
        assert not await sub.wait_applied("0/200", timeout=0.2)
        waiter = asyncio.create_task(sub.wait_applied("1/0", timeout=5))
        await asyncio.sleep(0.05)
        publisher.heartbeat(applied="1/10")
        started = time.monotonic()
        assert await waiter
        assert time.monotonic() - started < 1.0, "woken by the heartbeat, not by a poll"


async def test_the_pubsub_transport_refuses_a_local_ttl_beyond_redis(aclient: Any, unique: str) -> None:
    from evictd import LocalTtlError

    local = LocalCache()
    local.define("profile", ttl=30, redis_ttl=10)
    with pytest.raises(LocalTtlError):
        Subscriber(aclient, local, channel=unique, transport="pubsub")
    Subscriber(aclient, local, channel=unique, transport="both")  # a stream replays: allowed


async def test_get_or_load_through_a_subscriber(aclient: Any, publisher: StandInPublisher, unique: str) -> None:
    local = LocalCache()
    loads: list[int] = []

    async def load() -> str:
        loads.append(1)
        return "v"

    async with Subscriber(aclient, local, channel=unique):
        assert await local.aget_or_load("k", load, cache="c") == "v"
        assert await local.aget_or_load("k", load, cache="c") == "v"
        publisher.publish(caches=["c"], keys=["k"])  # the channel's first message
        await eventually(lambda: "k" not in local)
        assert await local.aget_or_load("k", load, cache="c") == "v"
        assert len(loads) == 2 and local.metrics.hits == 1


def test_the_sync_subscriber_keeps_a_threaded_cache(redis_url: str, publisher: StandInPublisher, unique: str) -> None:
    from evictd import Subscriber as SyncSubscriber

    local = LocalCache()
    publisher.publish(caches=["warmup"], applied="0/10")
    with SyncSubscriber(redis_url, local, channel=unique) as sub:
        assert local.get_or_load("k", lambda: "v", cache="c") == "v"
        assert sub.wait_applied("0/10", timeout=1)
        publisher.publish(caches=["c"], keys=["k"])
        deadline = time.monotonic() + 5
        while "k" in local and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "k" not in local




async def test_a_sequence_read_ahead_of_the_stream_reader_replays_without_a_gap(
    aclient: Any, publisher: StandInPublisher, unique: str
) -> None:
    # A stream reader reads :seq after an empty XREAD; a message published
    # in between puts :seq ahead although the stream holds it: replayed,
    # not counted as a loss.
    local = LocalCache()
    publisher.publish(caches=["warmup"])
    sub = Subscriber(aclient, local, channel=unique, transport="stream")
    sub.stream_id = await sub._newest_stream_id()
    epoch, seq = await sub._read_sequence()
    assert epoch is not None and seq is not None
    sub.tracker.advance(epoch, seq)
    fill(local, "k", "c")
    fill(local, "other", "c")
    publisher.publish(caches=["c"], keys=["k"], deliver="stream")
    async with sub._lock:
        await sub._observe_sequence()
    assert "k" not in local and "other" in local
    assert (local.metrics.gaps, local.metrics.replays, local.metrics.flushes) == (0, 1, 0)
