"""The Redis key layout evictd writes and readers use (``docs/redis-layout.md``;
the Rust side is ``src/layout.rs``). Pure functions, no I/O.

- Namespace version of cache ``NAME``: ``evictd:ns:NAME``; version keys of
  ``bump`` caches and namespace keys hold a *version*: a u64 in canonical
  decimal. A missing key is version 0.
- Data of a ``bump`` cache at version ``V``: ``<version key>:v<V>``.
- Values of caches read under a namespace: ``<ns>|<payload>``
  (:func:`stamp`, :func:`unstamp`); equality with the current namespace, never
  "less than".
- Tag registry of tag ``T``: ``evictd:tag:{T}``.
- Fill guard of key ``K``: ``evictd:guard:K`` when ``K`` has a hash tag,
  else ``evictd:guard:{K}`` (:func:`guard_key`).
- Broadcast keys of channel ``C`` (format 2, ``docs/broadcast.md``):
  ``evictd:bc:{C}:seq|epoch|stream|applied|touched``.
"""

from __future__ import annotations

from typing import Optional, Union

__all__ = [
    "NAMESPACE_PREFIX",
    "TAG_PREFIX",
    "GUARD_PREFIX",
    "DEFAULT_CHANNEL",
    "Bytes",
    "to_bytes",
    "namespace_key",
    "tag_key",
    "guard_key",
    "guard_in_slot",
    "versioned_key",
    "encode_version",
    "parse_version",
    "stamp",
    "unstamp",
    "broadcast_key",
]

NAMESPACE_PREFIX = "evictd:ns:"
TAG_PREFIX = "evictd:tag:"
GUARD_PREFIX = b"evictd:guard:"
DEFAULT_CHANNEL = "evictd:invalidations"

_U64_MAX = 2**64 - 1

#: Keys and values: ``str`` is encoded as UTF-8.
Bytes = Union[str, bytes, bytearray, memoryview]


def to_bytes(data: Bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def namespace_key(cache: str) -> str:
    """``evictd:ns:<cache>``: the namespace version key of a cache."""
    return f"{NAMESPACE_PREFIX}{cache}"


def tag_key(tag: str) -> str:
    """``evictd:tag:{<tag>}``: the registry of a tag, hashed on the tag alone."""
    return f"{TAG_PREFIX}{{{tag}}}"


def _has_hash_tag(key: bytes) -> bool:
    open_ = key.find(b"{")
    if open_ < 0:
        return False
    close = key.find(b"}", open_ + 1)
    return close > open_ + 1


def guard_key(key: Bytes) -> bytes:
    """The fill-guard stamp key of ``key``, in ``key``'s Cluster slot whenever
    :func:`guard_in_slot` holds."""
    k = to_bytes(key)
    return GUARD_PREFIX + k if _has_hash_tag(k) else GUARD_PREFIX + b"{" + k + b"}"


def guard_in_slot(key: Bytes) -> bool:
    """Whether :func:`guard_key` hashes to ``key``'s slot. Keys without a hash
    tag that contain ``}`` (or are empty) cannot be guarded on a Cluster:
    evictd writes them no stamp, and readers fill them unguarded."""
    k = to_bytes(key)
    return _has_hash_tag(k) or (len(k) > 0 and b"}" not in k)


def versioned_key(key: str, version: int) -> str:
    """The data key of a ``bump`` cache's version key at ``version``."""
    return f"{key}:v{version}"


def encode_version(version: int) -> str:
    return str(version)


def parse_version(stored: Optional[Bytes]) -> Optional[int]:
    """A stored version (ASCII digits, leading zeros tolerated, at most
    u64::MAX); ``None`` for anything else. A missing key (``None``) is
    version 0 to readers: :func:`evictd.reader.read_version` does that."""
    if stored is None:
        return None
    s = to_bytes(stored)
    if not s or not all(0x30 <= b <= 0x39 for b in s):
        return None
    value = int(s)
    return value if value <= _U64_MAX else None


def stamp(namespace: int, payload: Bytes) -> bytes:
    """``<namespace>|<payload>``: a value stamped with the namespace version
    its writer read before reading the database."""
    return f"{namespace}|".encode("ascii") + to_bytes(payload)


def unstamp(value: Optional[Bytes], namespace: int) -> Optional[bytes]:
    """The payload if ``value`` was written under ``namespace`` (the current
    version); ``None`` is a miss (another namespace, or not stamped)."""
    if value is None:
        return None
    v = to_bytes(value)
    bar = v.find(b"|")
    if bar < 0 or parse_version(v[:bar]) != namespace:
        return None
    return v[bar + 1 :]


def broadcast_key(channel: str, part: str) -> str:
    """``evictd:bc:{<channel>}:<part>``, ``part`` one of ``seq``, ``epoch``,
    ``stream``, ``applied``, ``touched``: every key of a channel shares its
    hash tag, so one script updates them together on a Cluster."""
    return f"evictd:bc:{{{channel}}}:{part}"
