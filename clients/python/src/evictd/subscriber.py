"""The subscriber for synchronous applications: the asyncio
:class:`evictd.asyncio.Subscriber` run on an event loop of its own, in a
daemon thread. The local cache it keeps (:class:`evictd.LocalCache`) is
thread-safe, and its :meth:`~evictd.LocalCache.get_or_load` is synchronous.

redis-py's synchronous pub/sub has no way to wait for a message and for a
stream entry at once without a thread per transport; one event loop does
both, and ``redis.asyncio`` is part of redis-py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Optional, Union

import redis.asyncio

from .asyncio.subscriber import Subscriber as AsyncSubscriber
from .cache import LocalCache, Metrics

__all__ = ["Subscriber"]


class Subscriber:
    """``Subscriber("redis://localhost:6379", local, transport="both")``, or
    with ``client_factory``: a callable returning a ``redis.asyncio`` client
    (called on the subscriber's thread). Keyword arguments are those of
    :class:`evictd.asyncio.Subscriber`. Use as a context manager, or call
    :meth:`start` and :meth:`close`."""

    def __init__(
        self,
        url: Optional[str] = None,
        local: Optional[LocalCache] = None,
        *,
        client_factory: Optional[Callable[[], Any]] = None,
        **options: Any,
    ) -> None:
        if (url is None) == (client_factory is None):
            raise ValueError("give a Redis URL or a client_factory, not both")
        if local is None:
            raise ValueError("a Subscriber needs the LocalCache it keeps")
        self.local = local
        if client_factory is None:
            assert url is not None
            from_url: str = url
            client_factory = lambda: redis.asyncio.Redis.from_url(from_url)  # noqa: E731
        self._factory = client_factory
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="evictd-subscriber", daemon=True)
        self._inner: Optional[AsyncSubscriber] = None
        self._client: Any = None

    @property
    def metrics(self) -> Metrics:
        return self.local.metrics

    @property
    def inner(self) -> AsyncSubscriber:
        if self._inner is None:
            raise RuntimeError("the subscriber is not started")
        return self._inner

    def _run(self, coro: Any, timeout: Optional[float] = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()

        async def start() -> None:
            self._client = self._factory()
            self._inner = AsyncSubscriber(self._client, self.local, **self._options)
            await self._inner.start()

        self._run(start(), timeout)

    def close(self) -> None:
        async def close() -> None:
            if self._inner is not None:
                await self._inner.close()
            if self._client is not None:
                await self._client.aclose() if hasattr(self._client, "aclose") else await self._client.close()

        if self._thread.is_alive():
            self._run(close(), 10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
        self._loop.close()

    def __enter__(self) -> Subscriber:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wait_applied(self, lsn: Union[str, int], timeout: float) -> bool:
        """See :meth:`evictd.asyncio.Subscriber.wait_applied`."""
        return bool(self._run(self.inner.wait_applied(lsn, timeout), timeout + 5.0))

    def track_commit(self, key: str, committed_at: Optional[float] = None) -> None:
        """See :meth:`evictd.asyncio.Subscriber.track_commit`."""
        inner = self.inner
        self._loop.call_soon_threadsafe(inner.track_commit, key, committed_at)
