"""The local, in-process cache that evictd's broadcast keeps fresh.

:class:`LocalCache` holds entries by their **Redis key** (the key evictd
names in its messages: for a ``bump`` cache, the version key), each with the
name of its cache (for namespace flushes) and the tags the application
registered it under (for tag invalidations). A subscriber
(:mod:`evictd.asyncio.subscriber`) calls its ``drop_*`` methods.

**Invariants**

- *The local twin of the fill guard*: a load starts with a ticket
  (:meth:`LocalCache.begin`); an invalidation of its key, of one of its tags,
  of its cache, or of everything, that arrives before :meth:`LocalCache.put`
  marks the ticket, and ``put`` of a marked ticket is refused (counted in
  ``rejected_fills``): what was loaded may predate the change.
- *One loader per key*: concurrent misses of a key share one load; a load
  whose ticket was marked is no longer joined, so a caller that arrives
  after an invalidation never receives a value read before it.
- Local TTLs are jittered *downwards* (``ttl × (1 − jitter × U[0,1))``), so
  an entry never outlives the TTL it was given; on the pub/sub-only
  transport a TTL longer than the cache's Redis TTL is refused
  (:class:`LocalTtlError`): a lost message must not keep a value locally
  longer than Redis itself would.
- At most ``max_entries`` entries; the least recently used goes first.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Iterable, Optional

__all__ = [
    "LocalCache",
    "LocalTtlError",
    "CachePolicy",
    "Metrics",
    "Histogram",
    "Ticket",
    "MISSING",
]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: What :meth:`LocalCache.get` returns on a miss.
MISSING: Any = _Missing()


class LocalTtlError(ValueError):
    """A local TTL longer than the cache's Redis TTL, on the pub/sub-only transport."""


class Histogram:
    """A cumulative histogram of durations in seconds, with Prometheus-style
    upper bounds, a count and a sum; :meth:`quantile` interpolates inside
    a bucket."""

    DEFAULT_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, bounds: Iterable[float] = DEFAULT_BOUNDS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.buckets = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        with self._lock:
            self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
            self.count += 1
            self.sum += seconds

    def quantile(self, q: float) -> Optional[float]:
        """An estimate of the ``q`` quantile (``None`` when empty); the last
        bucket reports its lower bound."""
        with self._lock:
            if self.count == 0:
                return None
            rank = q * self.count
            seen = 0
            for i, n in enumerate(self.buckets):
                if n and seen + n >= rank:
                    lower = self.bounds[i - 1] if i > 0 else 0.0
                    if i == len(self.bounds):
                        return lower
                    return lower + (self.bounds[i] - lower) * (rank - seen) / n
                seen += n
            return self.bounds[-1]


@dataclass
class Metrics:
    """Counters of one local cache and its subscriber."""

    hits: int = 0
    misses: int = 0
    #: Batch messages applied (keys, tags and flushes dropped).
    invalidations: int = 0
    #: Entries dropped by invalidations (not by TTL or the bound).
    dropped: int = 0
    #: Batch messages applied from the stream's catch-up after a (re)connection or a gap.
    replays: int = 0
    #: Gaps (missed sequence numbers) the stream could not replay, each
    #: repaired through ``touched``.
    gaps: int = 0
    #: Whole-cache flushes (new epoch, unknown version, silence, lost stream).
    flushes: int = 0
    #: Named caches dropped whole (a message's ``flush``, or a gap repair).
    cache_flushes: int = 0
    #: Local fills refused because an invalidation arrived during the load.
    rejected_fills: int = 0
    #: Entries evicted by the bound.
    evictions: int = 0
    #: ``published_at_ms`` → local drop.
    publish_to_drop: Histogram = field(default_factory=Histogram)
    #: The source's commit time → local drop: from a batch's ``committed_at_ms``
    #: (one observation per batch), else from :meth:`Subscriber.track_commit`.
    commit_to_drop: Histogram = field(default_factory=Histogram)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v for k, v in self.__dict__.items() if isinstance(v, int) and not isinstance(v, bool)
        }
        for name in ("publish_to_drop", "commit_to_drop"):
            h: Histogram = getattr(self, name)
            out[name] = {"count": h.count, "sum": h.sum, "p50": h.quantile(0.5), "p99": h.quantile(0.99)}
        return out


@dataclass(frozen=True)
class CachePolicy:
    """Local TTL (s) and jitter of a cache, and its Redis TTL (s; ``None``: none)."""

    ttl: float
    jitter: float
    redis_ttl: Optional[float] = None


@dataclass(eq=False)
class Ticket:
    """A load in progress: marked ``dirty`` when an invalidation of its key,
    tags or cache arrives before :meth:`LocalCache.put`."""

    key: Hashable
    cache: Optional[str]
    tags: frozenset[str]
    dirty: bool = False


@dataclass
class _Entry:
    value: Any
    expires_at: float
    cache: Optional[str]
    tags: frozenset[str]


class _Flight:
    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None


class LocalCache:
    """An in-process cache of bounded size whose entries evictd's broadcast
    drops. Thread-safe; :meth:`get_or_load` is the sync entry point and
    :meth:`aget_or_load` the asyncio one."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        ttl: float = 15.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter is a fraction in [0, 1)")
        self.max_entries = max_entries
        self.default = CachePolicy(ttl, jitter)
        self.metrics = Metrics()
        self._policies: dict[str, CachePolicy] = {}
        self._clock = clock
        self._rng = rng
        self._lock = threading.RLock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._by_tag: dict[str, set[Hashable]] = {}
        self._by_cache: dict[str, set[Hashable]] = {}
        self._pending: dict[Hashable, set[Ticket]] = {}
        self._flights: dict[Hashable, _Flight] = {}
        self._aflights: dict[Hashable, tuple[Ticket, asyncio.Future[Any]]] = {}
        #: Set by a subscriber on the pub/sub-only transport.
        self._pubsub_only = False

    # -- configuration ---------------------------------------------------

    def define(
        self, cache: str, *, ttl: Optional[float] = None, jitter: Optional[float] = None, redis_ttl: Optional[float] = None
    ) -> CachePolicy:
        """Sets the local TTL (s) and jitter of ``cache``, and the TTL (s) its
        keys have in Redis (``None``: no TTL there)."""
        policy = CachePolicy(
            self.default.ttl if ttl is None else ttl, self.default.jitter if jitter is None else jitter, redis_ttl
        )
        self._check_ttl(cache, policy.ttl, policy)
        with self._lock:
            self._policies[cache] = policy
        return policy

    def policy(self, cache: Optional[str]) -> CachePolicy:
        return self._policies.get(cache, self.default) if cache is not None else self.default

    def set_pubsub_only(self, pubsub_only: bool) -> None:
        """Called by a subscriber: on the pub/sub-only transport, local TTLs
        longer than the Redis TTL are refused (checked now for every cache
        defined, and at each load)."""
        if pubsub_only:
            for cache, policy in self._policies.items():
                self._check_ttl(cache, policy.ttl, policy, force=True)
        self._pubsub_only = pubsub_only

    def _check_ttl(self, cache: Optional[str], ttl: float, policy: CachePolicy, force: bool = False) -> None:
        if (self._pubsub_only or force) and policy.redis_ttl is not None and ttl > policy.redis_ttl:
            raise LocalTtlError(
                f"cache {cache!r}: a local TTL of {ttl}s is longer than its Redis TTL of {policy.redis_ttl}s, "
                "refused on the pub/sub-only transport (a lost message would outlive Redis's copy); "
                "shorten it or use the stream transport"
            )

    # -- reads and fills -------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.expires_at > self._clock()

    def get(self, key: Hashable) -> Any:
        """The entry's value, or :data:`MISSING` (counts a hit or a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires_at <= self._clock():
                self._remove(key)
                entry = None
            if entry is None:
                self.metrics.misses += 1
                return MISSING
            self._entries.move_to_end(key)
            self.metrics.hits += 1
            return entry.value

    def begin(self, key: Hashable, cache: Optional[str] = None, tags: Iterable[str] = ()) -> Ticket:
        """Starts a load of ``key``: invalidations from now on mark the ticket."""
        ticket = Ticket(key, cache, frozenset(tags))
        with self._lock:
            self._pending.setdefault(key, set()).add(ticket)
        return ticket

    def end(self, ticket: Ticket) -> None:
        """Forgets a ticket without filling (a failed load)."""
        with self._lock:
            self._forget(ticket)

    def put(self, ticket: Ticket, value: Any, ttl: Optional[float] = None) -> bool:
        """Stores ``value`` under the ticket's key unless an invalidation
        marked the ticket; ``False``: refused (serve the value, do not keep it)."""
        policy = self.policy(ticket.cache)
        ttl = policy.ttl if ttl is None else ttl
        self._check_ttl(ticket.cache, ttl, policy)
        lifetime = ttl * (1.0 - policy.jitter * self._rng())
        with self._lock:
            self._forget(ticket)
            if ticket.dirty:
                self.metrics.rejected_fills += 1
                return False
            if lifetime <= 0:
                return True
            self._remove(ticket.key)
            self._entries[ticket.key] = _Entry(value, self._clock() + lifetime, ticket.cache, ticket.tags)
            for tag in ticket.tags:
                self._by_tag.setdefault(tag, set()).add(ticket.key)
            if ticket.cache is not None:
                self._by_cache.setdefault(ticket.cache, set()).add(ticket.key)
            while len(self._entries) > self.max_entries:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                self.metrics.evictions += 1
            return True

    def tag(self, key: Hashable, tags: Iterable[str]) -> None:
        """Adds tags to a present entry (the local tag index)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.tags = entry.tags | frozenset(tags)
            for t in entry.tags:
                self._by_tag.setdefault(t, set()).add(key)

    def get_or_load(
        self,
        key: Hashable,
        load: Callable[[], Any],
        *,
        cache: Optional[str] = None,
        tags: Iterable[str] = (),
        ttl: Optional[float] = None,
    ) -> Any:
        """The entry, or ``load()``'s result, loaded once for all concurrent
        callers of ``key`` and kept unless an invalidation raced it."""
        value = self.get(key)
        if value is not MISSING:
            return value
        with self._lock:
            flight = self._flights.get(key)
            owner = flight is None
            if owner:
                flight = _Flight(self.begin(key, cache, tags))
                self._flights[key] = flight
        assert flight is not None
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = load()
        except BaseException as error:
            flight.error = error
            self.end(flight.ticket)
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()
        self.put(flight.ticket, flight.value, ttl)
        return flight.value

    async def aget_or_load(
        self,
        key: Hashable,
        load: Callable[[], Awaitable[Any]],
        *,
        cache: Optional[str] = None,
        tags: Iterable[str] = (),
        ttl: Optional[float] = None,
    ) -> Any:
        """:meth:`get_or_load` for asyncio: ``load`` is awaited once per key."""
        value = self.get(key)
        if value is not MISSING:
            return value
        with self._lock:
            flight = self._aflights.get(key)
            if flight is not None:
                future = flight[1]
                owner = False
            else:
                future = asyncio.get_running_loop().create_future()
                ticket = self.begin(key, cache, tags)
                self._aflights[key] = (ticket, future)
                owner = True
        if not owner:
            return await asyncio.shield(future)
        try:
            value = await load()
        except BaseException as error:
            self.end(ticket)
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        finally:
            with self._lock:
                if self._aflights.get(key, (None, None))[1] is future:
                    del self._aflights[key]
        if not future.done():
            future.set_result(value)
        self.put(ticket, value, ttl)
        return value

    # -- invalidations (the subscriber's side) ---------------------------

    def drop_keys(self, keys: Iterable[Hashable]) -> int:
        """Drops entries by key; marks loads of those keys."""
        n = 0
        with self._lock:
            for key in keys:
                for ticket in self._pending.get(key, ()):
                    self._mark(ticket)
                n += self._remove(key)
            self.metrics.dropped += n
        return n

    def drop_tags(self, tags: Iterable[str]) -> int:
        """Drops every entry registered under one of ``tags``; marks loads under them."""
        tags = set(tags)
        n = 0
        with self._lock:
            if not tags:
                return 0
            self._mark_where(lambda t: not t.tags.isdisjoint(tags))
            for tag in tags:
                for key in list(self._by_tag.get(tag, ())):
                    n += self._remove(key)
            self.metrics.dropped += n
        return n

    def drop_tagged(self) -> int:
        """Drops every entry that has a tag (a repair after a gap that
        missed tag invalidations)."""
        with self._lock:
            self._mark_where(lambda t: bool(t.tags))
            return self.drop_tags(list(self._by_tag))

    def drop_caches(self, caches: Iterable[str]) -> int:
        """Drops named caches whole; marks their loads."""
        caches = set(caches)
        n = 0
        with self._lock:
            if not caches:
                return 0
            self._mark_where(lambda t: t.cache in caches)
            for cache in caches:
                keys = list(self._by_cache.get(cache, ()))
                for key in keys:
                    n += self._remove(key)
                self.metrics.cache_flushes += 1
            self.metrics.dropped += n
        return n

    def clear(self) -> int:
        """Drops everything (a flush); marks every load."""
        with self._lock:
            self._mark_where(lambda t: True)
            n = len(self._entries)
            self._entries.clear()
            self._by_tag.clear()
            self._by_cache.clear()
            self.metrics.dropped += n
            self.metrics.flushes += 1
        return n

    # -- internals (under the lock) --------------------------------------

    def _mark(self, ticket: Ticket) -> None:
        ticket.dirty = True
        # A marked load is not joined any more: later callers start afresh.
        flight = self._flights.get(ticket.key)
        if flight is not None and flight.ticket is ticket:
            del self._flights[ticket.key]
        aflight = self._aflights.get(ticket.key)
        if aflight is not None and aflight[0] is ticket:
            del self._aflights[ticket.key]

    def _mark_where(self, predicate: Callable[[Ticket], bool]) -> None:
        for tickets in self._pending.values():
            for ticket in tickets:
                if predicate(ticket):
                    self._mark(ticket)

    def _forget(self, ticket: Ticket) -> None:
        tickets = self._pending.get(ticket.key)
        if tickets is not None:
            tickets.discard(ticket)
            if not tickets:
                del self._pending[ticket.key]

    def _remove(self, key: Hashable) -> int:
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]
        if entry.cache is not None:
            keys = self._by_cache.get(entry.cache)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_cache[entry.cache]
        return 1
