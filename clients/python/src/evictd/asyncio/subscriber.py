"""The subscriber to evictd's broadcast (format 2, ``docs/broadcast.md``) on
``redis.asyncio``: it keeps a :class:`evictd.cache.LocalCache` fresh.

Transports (``transport=``): ``"pubsub"`` (immediate; a message lost while
disconnected is seen as a gap, repaired through the ``touched`` hash),
``"stream"`` (``XREAD`` from the last entry ID processed: a reconnect
replays what it missed), ``"both"`` (pub/sub for speed, the stream to
replay a gap instead of repairing it). Every message is applied under one
lock, in sequence order, whatever path it came by; a message seen twice (by
both paths) is applied once.

**Invariants**

- A gap is never passed over: it is replayed from the stream when the
  transport has one and the stream still holds it, and otherwise repaired by
  dropping exactly the caches that ``touched`` puts above the last sequence
  applied (and every tagged entry if ``*tags`` is).
- A new epoch, an unknown format version or a body that does not parse
  flush the whole local cache.
- 3 × ``heartbeat_ms`` of pub/sub silence is a lost connection: the
  subscriber reconnects and checks ``:epoch`` and ``:seq`` (a gap is
  repaired, a new epoch flushes), and flushes everything only while Redis
  does not answer, once per outage (the spec's rule). An evictd restart is
  silence too, and costs no flush. ``on_silence="flush"`` flushes on every
  silence instead.
- After a (re)connection to pub/sub the subscriber reads ``:epoch`` and
  ``:seq`` *after* subscribing, so nothing published in between is unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any, Literal, Optional, Union

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..broadcast import Action, Batch, Heartbeat, Message, Tracker, Unknown, keys_of, parse_lsn, parse_message, repair_plan
from ..cache import LocalCache
from ..layout import DEFAULT_CHANNEL, to_bytes

__all__ = ["Subscriber", "Transport"]

log = logging.getLogger("evictd.subscriber")

Transport = Literal["both", "pubsub", "stream"]

_NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


def _stream_id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(data: Any) -> str:
    return data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else str(data)


class Subscriber:
    """Applies evictd's broadcast to ``local``.

    ``client`` runs the commands (``GET``, ``HGETALL``, ``XREAD``…): a
    ``redis.asyncio.Redis`` or ``RedisCluster``. Pub/sub uses
    ``pubsub_client`` (default: ``client``; give a ``Redis`` of one node
    when ``client`` is a Cluster: evictd's ``PUBLISH`` reaches every node).

    ``heartbeat_ms`` must be evictd's ``broadcast_heartbeat_ms``.
    """

    def __init__(
        self,
        client: Any,
        local: LocalCache,
        *,
        channel: str = DEFAULT_CHANNEL,
        transport: Transport = "both",
        heartbeat_ms: int = 1000,
        on_silence: Literal["repair", "flush"] = "repair",
        pubsub_client: Any = None,
        replay_count: int = 1000,
        reconnect_delay: float = 0.2,
        max_tracked_commits: int = 10_000,
    ) -> None:
        if transport not in ("both", "pubsub", "stream"):
            raise ValueError(f"transport is 'both', 'pubsub' or 'stream', not {transport!r}")
        self.client = client
        self.pubsub_client = pubsub_client if pubsub_client is not None else client
        self.local = local
        self.metrics = local.metrics
        self.keys = keys_of(channel)
        self.transport = transport
        self.heartbeat_ms = heartbeat_ms
        self.on_silence = on_silence
        self.replay_count = replay_count
        self.reconnect_delay = reconnect_delay
        self.tracker = Tracker()
        self.stream_id: Optional[str] = None
        #: The highest Postgres LSN evictd said it has applied.
        self.applied_lsn: Optional[int] = None
        self._applied_changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._last_heard = time.monotonic()
        #: Whether the current outage (silence, Redis not answering) was flushed.
        self._outage_flushed = False
        self._commits: OrderedDict[str, float] = OrderedDict()
        self._max_commits = max_tracked_commits
        self._closed = False
        local.set_pubsub_only(transport == "pubsub")

    @property
    def uses_pubsub(self) -> bool:
        return self.transport in ("both", "pubsub")

    @property
    def uses_stream(self) -> bool:
        return self.transport in ("both", "stream")

    # -- life cycle -------------------------------------------------------

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Takes the baseline (stream position, then subscription, then
        ``:epoch``/``:seq``) and starts reading. Raises if Redis cannot be
        reached: a subscriber that never started must not be trusted."""
        if self.uses_stream:
            self.stream_id = await self._newest_stream_id()
        if self.uses_pubsub:
            await self._subscribe()
        epoch, seq = await self._read_sequence()
        if epoch is not None and seq is not None:
            self.tracker.advance(epoch, seq)
        await self._read_applied()
        if self.uses_pubsub:
            self._tasks.append(asyncio.create_task(self._pubsub_loop(), name="evictd-pubsub"))
        if self.uses_stream:
            self._tasks.append(asyncio.create_task(self._stream_loop(), name="evictd-stream"))

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._drop_pubsub()

    # -- read your writes -------------------------------------------------

    async def wait_applied(self, lsn: Union[str, int], timeout: float) -> bool:
        """Waits until evictd has applied the source position ``lsn`` (a
        Postgres LSN ``X/Y`` from ``SELECT pg_current_wal_lsn()`` after the
        commit, or its integer). Reads ``:applied`` first, then follows
        heartbeats and batches (re-reading the hash every heartbeat period).
        ``False`` after ``timeout`` seconds: read from the database."""
        target = parse_lsn(lsn) if isinstance(lsn, str) else lsn
        deadline = time.monotonic() + timeout
        poll = self.heartbeat_ms / 1000.0
        while True:
            if self.applied_lsn is not None and self.applied_lsn >= target:
                return True
            with contextlib.suppress(*_NET_ERRORS):
                await self._read_applied()
            if self.applied_lsn is not None and self.applied_lsn >= target:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event = self._applied_changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, poll))

    def track_commit(self, key: str, committed_at: Optional[float] = None) -> None:
        """Records that the application committed, at ``committed_at``
        (``time.time()``, default now), a change that invalidates ``key``:
        when a message drops ``key``, ``commit_to_drop`` observes the delay."""
        self._commits[key] = time.time() if committed_at is None else committed_at
        self._commits.move_to_end(key)
        while len(self._commits) > self._max_commits:
            self._commits.popitem(last=False)

    # -- applying ---------------------------------------------------------

    def _raise_applied(self, lsn: Optional[int]) -> None:
        if lsn is not None and (self.applied_lsn is None or lsn > self.applied_lsn):
            self.applied_lsn = lsn
            event, self._applied_changed = self._applied_changed, asyncio.Event()
            event.set()

    async def _handle(self, data: Any, *, replay: bool = False, entry_id: Optional[str] = None) -> None:
        """Decides and acts on one message; the caller holds the lock."""
        try:
            message: Message = parse_message(to_bytes(data))
        except ValueError as error:
            log.warning("evictd broadcast: unreadable message on %s (%s): flushing", self.keys.channel, error)
            message = Unknown(None)
        decision = self.tracker.decide(message)
        if decision.action is Action.FLUSH:
            await self._flush_all()
            if isinstance(message, (Batch, Heartbeat)):
                self.tracker = Tracker(message.epoch, message.seq)
        elif decision.action is Action.APPLY:
            assert isinstance(message, Batch)
            self._apply(message, replay)
            self.tracker.advance(message.epoch, message.seq)
        elif decision.action is Action.GAP:
            assert isinstance(message, (Batch, Heartbeat))
            await self._repair(message.epoch, message.seq - 1 if decision.apply_after else message.seq, entry_id)
            if decision.apply_after and isinstance(message, Batch):
                if self.tracker.seq is None or message.seq > self.tracker.seq:
                    self._apply(message, replay)
            self.tracker.advance(message.epoch, message.seq)
        if isinstance(message, (Batch, Heartbeat)):
            # Only once the message's drops are done: a reader woken by
            # wait_applied must not find an entry the message drops.
            self._raise_applied(message.applied_lsn)

    def _apply(self, batch: Batch, replay: bool) -> None:
        local = self.local
        local.drop_keys(batch.keys)
        local.drop_tags(batch.tags)
        local.drop_caches(batch.flush)
        now = time.time()
        if batch.published_at_ms is not None:
            self.metrics.publish_to_drop.observe(now - batch.published_at_ms / 1000.0)
        if batch.committed_at_ms is not None:
            # evictd's message says when the source committed: one
            # observation per batch; commits tracked by hand are forgotten.
            self.metrics.commit_to_drop.observe(now - batch.committed_at_ms / 1000.0)
        for key in batch.keys:
            committed = self._commits.pop(key, None)
            if committed is not None and batch.committed_at_ms is None:
                self.metrics.commit_to_drop.observe(now - committed)
        self.metrics.invalidations += 1
        if replay:
            self.metrics.replays += 1

    async def _repair(self, epoch: str, through: int, entry_id: Optional[str]) -> None:
        """Covers every message after the tracker's ``seq`` up to ``through``:
        replayed from the stream if it has them, else through ``touched``."""
        if self.uses_stream and entry_id is None:
            # Not called from the stream itself: replay what it holds.
            await self._catch_up(until=through)
        last = self.tracker.seq
        if last is not None and self.tracker.epoch == epoch and last >= through:
            # The stream held every message: nothing was lost (a stream
            # reader's :seq read can also race a message on its way).
            return
        self.metrics.gaps += 1
        touched_raw = await self.client.hgetall(self.keys.touched)
        touched = {_text(k): int(_text(v)) for k, v in touched_raw.items()}
        caches, tags = repair_plan(touched, last if last is not None else -1)
        self.local.drop_caches(caches)
        if tags:
            self.local.drop_tagged()
        log.info("evictd broadcast: gap after seq %s on %s, repaired: caches %s, tags %s", last, self.keys.channel, caches, tags)
        self.tracker.advance(epoch, through)

    async def _catch_up(self, until: Optional[int] = None) -> None:
        """Applies the stream's entries after ``stream_id`` (``XRANGE``), as replays."""
        if self.stream_id is None:
            return
        while True:
            entries = await self.client.xrange(self.keys.stream, min=f"({self.stream_id}", max="+", count=self.replay_count)
            if not entries:
                return
            for entry_id, fields in entries:
                await self._handle_entry(_text(entry_id), fields, replay=True)
            if len(entries) < self.replay_count or (until is not None and (self.tracker.seq or 0) >= until):
                return

    async def _handle_entry(self, entry_id: str, fields: dict[Any, Any], *, replay: bool) -> None:
        if self.stream_id is not None and _stream_id_key(entry_id) <= _stream_id_key(self.stream_id):
            return
        data = fields.get(b"m", fields.get("m"))
        if data is not None:
            await self._handle(data, replay=replay, entry_id=entry_id)
        self.stream_id = entry_id

    async def _flush_all(self) -> None:
        self.local.clear()
        if self.uses_stream:
            with contextlib.suppress(*_NET_ERRORS):
                newest = await self._newest_stream_id()
                if self.stream_id is None or _stream_id_key(newest) != _stream_id_key(self.stream_id):
                    # A reset stream may restart below our position: follow its newest entry.
                    self.stream_id = newest

    async def _observe_sequence(self) -> None:
        """Reads ``:epoch``/``:seq`` and acts as for a heartbeat (the lock held)."""
        epoch, seq = await self._read_sequence()
        if epoch is None or seq is None:
            return
        await self._handle_heartbeat(epoch, seq)

    async def _handle_heartbeat(self, epoch: str, seq: int) -> None:
        decision = self.tracker.observe(epoch, seq)
        if decision.action is Action.FLUSH:
            await self._flush_all()
            self.tracker = Tracker(epoch, seq)
        elif decision.action is Action.GAP:
            await self._repair(epoch, seq, None)
        elif self.tracker.seq is None:
            self.tracker.advance(epoch, seq)

    # -- Redis ------------------------------------------------------------

    async def _newest_stream_id(self) -> str:
        newest = await self.client.xrevrange(self.keys.stream, max="+", min="-", count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def _read_sequence(self) -> tuple[Optional[str], Optional[int]]:
        epoch = await self.client.get(self.keys.epoch)
        seq = await self.client.get(self.keys.seq)
        return (_text(epoch) if epoch is not None else None, int(_text(seq)) if seq is not None else None)

    async def _read_applied(self) -> None:
        value = await self.client.hget(self.keys.applied, "postgres")
        if value is not None:
            self._raise_applied(parse_lsn(_text(value)))

    async def _subscribe(self) -> None:
        pubsub = self.pubsub_client.pubsub()
        try:
            # Bounded: redis-py retries a failed connect with backoff.
            await asyncio.wait_for(pubsub.subscribe(self.keys.channel), max(5.0, 3 * self.heartbeat_ms / 1000.0))
        except BaseException:
            with contextlib.suppress(Exception):
                await (pubsub.aclose() if hasattr(pubsub, "aclose") else pubsub.close())
            raise
        # Wait for the confirmation, so that the keys read next are read
        # after the subscription took effect.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            reply = await pubsub.get_message(timeout=0.5)
            if reply is not None and reply.get("type") == "subscribe":
                break
        else:
            await pubsub.aclose() if hasattr(pubsub, "aclose") else await pubsub.close()
            raise RedisTimeoutError(f"no subscription confirmation on {self.keys.channel}")
        self._pubsub = pubsub
        self._last_heard = time.monotonic()
        self._outage_flushed = False

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await (pubsub.aclose() if hasattr(pubsub, "aclose") else pubsub.close())

    async def _pubsub_loop(self) -> None:
        silence = 3 * self.heartbeat_ms / 1000.0
        while not self._closed:
            try:
                if self._pubsub is None:
                    await self._subscribe()
                    async with self._lock:
                        await self._observe_sequence()
                # Bounded from outside too: redis-py reconnects inside
                # get_message, with retries and backoff of seconds, which
                # would hide an outage from the silence rule.
                message = await asyncio.wait_for(
                    self._pubsub.get_message(ignore_subscribe_messages=True, timeout=self.heartbeat_ms / 1000.0),
                    silence,
                )
                now = time.monotonic()
                if message is not None and message.get("type") == "message":
                    self._last_heard = now
                    async with self._lock:
                        await self._handle(message["data"])
                elif now - self._last_heard > silence:
                    # Treated as a lost connection: the next turn subscribes
                    # again and checks :epoch/:seq (an evictd restart is
                    # silence too, and costs nothing).
                    log.warning("evictd broadcast: no message for %.1fs on %s", now - self._last_heard, self.keys.channel)
                    if self.on_silence == "flush":
                        async with self._lock:
                            self.local.clear()
                    await self._drop_pubsub()
            except asyncio.CancelledError:
                raise
            except _NET_ERRORS as error:
                log.warning("evictd broadcast: pub/sub connection lost on %s: %s", self.keys.channel, error)
                await self._drop_pubsub()
                if time.monotonic() - self._last_heard > silence and not self._outage_flushed:
                    # Redis does not answer past the silence limit: what was
                    # published meanwhile is unknowable, flush once.
                    log.warning("evictd broadcast: Redis does not answer on %s: flushing the local cache", self.keys.channel)
                    async with self._lock:
                        self.local.clear()
                    self._outage_flushed = True
                await asyncio.sleep(self.reconnect_delay)

    async def _stream_loop(self) -> None:
        failed = False
        while not self._closed:
            try:
                if failed:
                    async with self._lock:
                        await self._catch_up()
                    failed = False
                reply = await self.client.xread(
                    {self.keys.stream: self.stream_id or "0-0"}, block=self.heartbeat_ms, count=self.replay_count
                )
                if not reply:
                    if self.transport == "stream":
                        # No heartbeats on the stream: its reader sees loss
                        # (and a reset) by the sequence keys alone.
                        async with self._lock:
                            await self._observe_sequence()
                    continue
                for _stream, entries in reply:
                    async with self._lock:
                        for entry_id, fields in entries:
                            await self._handle_entry(_text(entry_id), fields, replay=False)
            except asyncio.CancelledError:
                raise
            except _NET_ERRORS as error:
                log.warning("evictd broadcast: stream read failed on %s: %s", self.keys.channel, error)
                failed = True
                await asyncio.sleep(self.reconnect_delay)
