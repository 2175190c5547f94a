"""Coverage-guided fuzzing (Atheris) of this client's broadcast reader: the
bytes of one broadcast message, as Redis delivers them, through
:func:`evictd.broadcast.parse_message`, the :class:`~evictd.broadcast.Tracker`
decision from several states, and the subscriber's own handling
(``Subscriber._handle``, pub/sub transport, a stand-in Redis): what a
subscriber does with a message it reads.

**Contract checked** (:func:`check`): ``parse_message`` returns a message or
raises ``ValueError`` (the subscriber turns that into a flush); nothing else
raises, and handling a message never awaits anything but the stand-in's
``HGETALL touched``. Any other exception is a finding.

    scripts/fuzz.sh python-broadcast SECONDS     (from the repository root)

Without Atheris, ``python broadcast_fuzz.py FILE...`` replays inputs (what
``tests/test_fuzz_corpus.py`` does for ``corpus/`` and ``regressions/``).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

try:
    import atheris
except ImportError:  # replaying inputs needs no fuzzer
    atheris = None

# Only the client's own modules are instrumented for coverage: instrumenting
# everything loaded (redis-py, asyncio) takes half a minute at start and
# steers the fuzzer towards code a message cannot reach.
_FUZZING = atheris is not None and __name__ == "__main__"
with atheris.instrument_imports(include=["evictd"]) if _FUZZING else contextlib.nullcontext():
    from evictd import LocalCache
    from evictd.asyncio import Subscriber
    from evictd.broadcast import Action, Batch, Heartbeat, Tracker, Unknown, parse_message

if _FUZZING:
    # The subscriber logs every unreadable message: fuzzing makes millions.
    logging.getLogger("evictd").setLevel(logging.CRITICAL)

EPOCH = "1764000000000000"
SEQ = 1764000000000416


class _TouchedOnly:
    """A stand-in ``redis.asyncio`` client: the repair of a gap reads
    ``HGETALL touched``, and a pub/sub subscriber reads nothing else while
    handling a message. Its coroutine completes without suspending."""

    touched = {b"user_profile": str(SEQ + 2).encode(), b"*tags": str(SEQ - 3).encode(), b"feed": b"7"}

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return self.touched


_CLIENT = _TouchedOnly()
_LOCAL = LocalCache(ttl=3600)
_SUB = Subscriber(_CLIENT, _LOCAL, channel="fuzz", transport="pubsub")


def _run(coroutine: Any) -> None:
    """Runs a coroutine that must not suspend (no event loop needed)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise AssertionError("handling a message suspended on something other than the stand-in Redis")


def check(data: bytes) -> None:
    """One broadcast message through the reader; raises on a finding."""
    try:
        message = parse_message(data)
    except ValueError:
        message = None
    if message is not None:
        assert isinstance(message, (Batch, Heartbeat, Unknown)), type(message)
        states = [Tracker(), Tracker(EPOCH, SEQ)]
        if isinstance(message, (Batch, Heartbeat)):
            states.append(Tracker(message.epoch, message.seq - 1))
        for tracker in states:
            decision = tracker.decide(message)
            assert isinstance(decision.action, Action)
            if isinstance(message, (Batch, Heartbeat)):
                tracker.advance(message.epoch, message.seq)
    # The subscriber itself, from a state in the vectors' epoch, with a
    # local entry for it to drop.
    _LOCAL.put(_LOCAL.begin("user:{42}:profile", "user_profile", ("user:42",)), "v")
    _SUB.tracker = Tracker(EPOCH, SEQ)
    _run(_SUB._handle(data))


if __name__ == "__main__":
    if atheris is None:
        for name in sys.argv[1:]:
            check(pathlib.Path(name).read_bytes())
        print(f"{len(sys.argv) - 1} inputs replayed without a finding")
    else:
        atheris.Setup(sys.argv, check)
        atheris.Fuzz()
