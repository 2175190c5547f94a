"""evictd's client on ``redis.asyncio``: the reader helpers
(:mod:`evictd.asyncio.reader`) and the :class:`Subscriber`."""

from . import reader
from .reader import begin_fill, fill, fill_through, namespace_version, read, read_version, register, register_at
from .subscriber import Subscriber, Transport

__all__ = [
    "reader",
    "Subscriber",
    "Transport",
    "read",
    "begin_fill",
    "fill",
    "fill_through",
    "register",
    "register_at",
    "read_version",
    "namespace_version",
]
