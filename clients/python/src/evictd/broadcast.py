"""evictd's broadcast, format version 2 (``docs/broadcast.md``): messages,
source positions, and the pure decision a subscriber takes for each message.
No I/O here; :mod:`evictd.asyncio.subscriber` does the reading.

**Invariant** of :class:`Tracker`: ``(epoch, seq)`` is the last message (or
heartbeat, or key read) whose every predecessor was either applied or covered
by a repair or a flush. A batch is applied at most once per sequence number;
a skipped number is never passed over silently (it is a *gap*); a new epoch
always flushes.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from .layout import Bytes, broadcast_key, to_bytes

__all__ = [
    "FORMAT_VERSION",
    "Message",
    "Batch",
    "Heartbeat",
    "Unknown",
    "parse_message",
    "parse_lsn",
    "format_lsn",
    "Action",
    "Decision",
    "Tracker",
    "keys_of",
    "ChannelKeys",
    "repair_plan",
]

FORMAT_VERSION = 2


def parse_lsn(text: str) -> int:
    """A Postgres LSN ``X/Y`` (hex halves) as an integer, comparable with ``<``."""
    hi, sep, lo = text.strip().partition("/")
    if not sep or not hi or not lo:
        raise ValueError(f"not an LSN: {text!r} (expected X/Y in hex)")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _applied_lsn(applied: Any) -> Optional[int]:
    if isinstance(applied, dict) and applied.get("kind") == "postgres" and isinstance(applied.get("lsn"), str):
        return parse_lsn(applied["lsn"])
    return None


@dataclass(frozen=True)
class Batch:
    epoch: str
    seq: int
    batch: Optional[int] = None
    position: Optional[dict[str, Any]] = None
    applied_lsn: Optional[int] = None
    caches: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    flush: tuple[str, ...] = ()
    truncated: bool = False
    published_at_ms: Optional[int] = None
    #: The source's commit time of the batch's last transaction (ms since
    #: the epoch), when the source gives one: commit → local drop starts here.
    committed_at_ms: Optional[int] = None

    @property
    def commit_lsn(self) -> Optional[int]:
        """The batch's last commit LSN (Postgres), from ``position``."""
        p = self.position or {}
        if p.get("kind") == "postgres" and isinstance(p.get("commit_lsn"), str):
            return parse_lsn(p["commit_lsn"])
        return None


@dataclass(frozen=True)
class Heartbeat:
    epoch: str
    seq: int
    applied_lsn: Optional[int] = None
    published_at_ms: Optional[int] = None


@dataclass(frozen=True)
class Unknown:
    """A message this client cannot read: an unknown ``v`` (flush whole) or an
    unknown ``kind`` of version 2 (ignore)."""

    version: Any
    kind: Any = None


Message = Union[Batch, Heartbeat, Unknown]


def _millis(value: Any) -> Optional[int]:
    """A time in ms since the epoch, as the Rust reader reads it (a JSON
    integer that fits a ``u64``), else absent: an integer beyond a float's
    range would raise ``OverflowError`` where the latency is measured."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    return None


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def parse_message(data: Bytes) -> Message:
    """Parses one message. A body that is not a JSON object, or a version 2
    message missing ``epoch``/``seq``, raises ``ValueError``: a protocol
    surprise, which the subscriber treats as an unknown version (flush)."""
    doc = json.loads(to_bytes(data))
    if not isinstance(doc, dict):
        raise ValueError("a broadcast message is a JSON object")
    v = doc.get("v")
    if v != FORMAT_VERSION:
        return Unknown(v)
    kind = doc.get("kind")
    if kind not in ("batch", "heartbeat"):
        return Unknown(v, kind)
    epoch, seq = doc.get("epoch"), doc.get("seq")
    if not isinstance(epoch, str) or not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError(f"a version 2 {kind} needs a string epoch and an integer seq")
    applied = _applied_lsn(doc.get("applied"))
    published = _millis(doc.get("published_at_ms"))
    if kind == "heartbeat":
        return Heartbeat(epoch, seq, applied, published)
    return Batch(
        epoch=epoch,
        seq=seq,
        batch=doc.get("batch") if isinstance(doc.get("batch"), int) else None,
        position=doc.get("position") if isinstance(doc.get("position"), dict) else None,
        applied_lsn=applied,
        caches=_strings(doc.get("caches")),
        keys=_strings(doc.get("keys")),
        tags=_strings(doc.get("tags")),
        flush=_strings(doc.get("flush")),
        truncated=bool(doc.get("truncated", False)),
        published_at_ms=published,
        committed_at_ms=_millis(doc.get("committed_at_ms")),
    )


class Action(enum.Enum):
    APPLY = "apply"
    """Apply the batch: drop its keys, tags and flushed caches."""
    IGNORE = "ignore"
    """A repeat, a heartbeat in step, or an unknown kind."""
    GAP = "gap"
    """Messages after ``last`` were missed: repair (``touched``), then apply
    the message if it is a batch."""
    FLUSH = "flush"
    """Flush the whole local cache: a new epoch or an unknown version."""


@dataclass(frozen=True)
class Decision:
    action: Action
    #: For GAP: the last sequence applied before the gap (repair drops what
    #: ``touched`` puts above it).
    last: Optional[int] = None
    #: Whether the message is a batch to apply after a GAP.
    apply_after: bool = False


@dataclass
class Tracker:
    """``(epoch, seq)`` of the last message applied, and the decision for the next."""

    epoch: Optional[str] = None
    seq: Optional[int] = None

    def decide(self, message: Message) -> Decision:
        """What ``message`` requires (``docs/broadcast.md``, "What a
        subscriber does"); call :meth:`advance` once it is done."""
        if isinstance(message, Unknown):
            return Decision(Action.FLUSH) if message.version != FORMAT_VERSION else Decision(Action.IGNORE)
        if self.epoch is None or self.seq is None:
            # No baseline yet: nothing local can be stale from before it.
            return Decision(Action.APPLY if isinstance(message, Batch) else Action.IGNORE)
        if message.epoch != self.epoch:
            return Decision(Action.FLUSH)
        if isinstance(message, Batch):
            if message.seq <= self.seq:
                return Decision(Action.IGNORE)
            if message.seq == self.seq + 1:
                return Decision(Action.APPLY)
            return Decision(Action.GAP, last=self.seq, apply_after=True)
        if message.seq > self.seq:
            return Decision(Action.GAP, last=self.seq)
        return Decision(Action.IGNORE)

    def observe(self, epoch: Optional[str], seq: Optional[int]) -> Decision:
        """What reading the channel's ``:epoch`` and ``:seq`` keys (after a
        (re)connection) requires: like a heartbeat."""
        if epoch is None or seq is None:
            # The channel has no sequence yet (nothing was ever published),
            # or it was lost and not yet restarted: a later message with
            # another epoch flushes.
            return Decision(Action.IGNORE)
        return self.decide(Heartbeat(epoch, seq))

    def advance(self, epoch: str, seq: int) -> None:
        """Records ``(epoch, seq)`` as handled. Never lowers ``seq`` within an epoch."""
        if epoch != self.epoch or self.seq is None or seq > self.seq:
            self.epoch, self.seq = epoch, seq


@dataclass(frozen=True)
class ChannelKeys:
    channel: str
    seq: str
    epoch: str
    stream: str
    applied: str
    touched: str


def keys_of(channel: str) -> ChannelKeys:
    """The Redis keys of a broadcast channel."""
    return ChannelKeys(
        channel,
        *(broadcast_key(channel, part) for part in ("seq", "epoch", "stream", "applied", "touched")),
    )


def repair_plan(touched: dict[str, int], last: int) -> tuple[list[str], bool]:
    """From ``HGETALL touched`` (values as integers): the caches to flush
    (touched after ``last``) and whether every tagged entry must go
    (``*tags`` after ``last``)."""
    caches = sorted(name for name, seq in touched.items() if name != "*tags" and seq > last)
    return caches, touched.get("*tags", -1) > last

