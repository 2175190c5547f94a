"""tests/vectors/broadcast.json, the language-neutral cases of what a
subscriber does with each broadcast message (docs/broadcast.md), run whole
from the repository root, twice:

- through the pure decision (:class:`evictd.broadcast.Tracker`,
  :func:`evictd.broadcast.repair_plan`): the action, the repair, the state
  after, the applied position;
- through the subscriber itself, on a local cache holding one entry per
  thing a case could drop (its keys, its tags, every cache it names, and
  bystanders), with a stand-in Redis that answers ``HGETALL touched`` with
  the case's hash: exactly the entries the case drops are gone.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest

from evictd import LocalCache
from evictd.asyncio import Subscriber
from evictd.broadcast import Action, Batch, Heartbeat, Tracker, Unknown, parse_lsn, parse_message, repair_plan

from .conftest import ROOT

VECTORS = ROOT / "tests" / "vectors" / "broadcast.json"
DOC = json.loads(VECTORS.read_text(encoding="utf-8"))
CASES = DOC["cases"]


def test_the_vector_file_keeps_its_cases() -> None:
    assert DOC["version"] == 1
    assert len(CASES) >= 17, "the vector file lost cases"
    # Every action the file lists is exercised by at least one case.
    assert {c["action"] for c in CASES} == set(DOC["actions"])


def _action(case: dict[str, Any]) -> tuple[str, Optional[tuple[list[str], bool]]]:
    """The action name the vectors use, and the repair plan for gaps."""
    tracker = Tracker(case["last"]["epoch"], case["last"]["seq"])
    message = parse_message(case["message"].encode())
    decision = tracker.decide(message)
    if decision.action is Action.FLUSH:
        return ("flush_keep_state" if isinstance(message, Unknown) else "flush"), None
    if decision.action is Action.APPLY:
        return "apply", None
    if decision.action is Action.IGNORE:
        return "ignore", None
    assert decision.action is Action.GAP and decision.last is not None
    touched = {name: int(seq) for name, seq in case.get("touched", {}).items()}
    plan = repair_plan(touched, decision.last)
    return ("repair_then_apply" if decision.apply_after else "repair"), plan


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_decision_matches_the_vector(case: dict[str, Any]) -> None:
    action, plan = _action(case)
    assert action == case["action"]
    if plan is not None:
        caches, all_tags = plan
        assert (caches, all_tags) == (sorted(case["repair"]["caches"]), case["repair"]["all_tags"])
    message = parse_message(case["message"].encode())
    drop = case["drop"]
    if action in ("apply", "repair_then_apply"):
        assert isinstance(message, Batch)
        assert sorted(message.keys) == sorted(drop["keys"])
        assert sorted(message.tags) == sorted(drop["tags"])
        assert sorted(message.flush) == sorted(drop["caches"])
    # The state after: what advance (or a flush's restart) leaves.
    tracker = Tracker(case["last"]["epoch"], case["last"]["seq"])
    if action == "flush" and isinstance(message, (Batch, Heartbeat)):
        tracker = Tracker(message.epoch, message.seq)
    elif action != "flush_keep_state" and action != "ignore" and isinstance(message, (Batch, Heartbeat)):
        tracker.advance(message.epoch, message.seq)
    assert (tracker.epoch, tracker.seq) == (case["then"]["epoch"], case["then"]["seq"])
    # The applied position, compared as a 64-bit LSN.
    applied = None if isinstance(message, Unknown) else message.applied_lsn
    assert applied == (None if case["applied"] is None else parse_lsn(case["applied"]))
    if "applied_at_least" in case:
        assert applied is not None and applied > parse_lsn(case["applied_at_least"])


class _TouchedOnly:
    """A stand-in ``redis.asyncio`` client that only answers the repair's
    ``HGETALL touched`` (a pub/sub subscriber reads nothing else while
    handling a message)."""

    def __init__(self, touched: dict[str, str]) -> None:
        self.touched = {k.encode(): v.encode() for k, v in touched.items()}
        self.calls: list[str] = []

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        self.calls.append(f"HGETALL {key}")
        return self.touched


def _named_caches(case: dict[str, Any], message: Any) -> set[str]:
    names = {n for n in case.get("touched", {}) if n != "*tags"}
    if isinstance(message, Batch):
        names |= set(message.caches) | set(message.flush)
    return names | set(case["drop"]["caches"]) | set(case["repair"]["caches"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
async def test_the_subscriber_drops_exactly_what_the_vector_says(case: dict[str, Any]) -> None:
    message = parse_message(case["message"].encode())
    local = LocalCache(ttl=3600)
    entries: dict[str, tuple[Optional[str], tuple[str, ...]]] = {}
    keys = list(message.keys) if isinstance(message, Batch) else []
    for key in keys:
        entries[key] = (None, ())  # dropped by key (or everything) only
    tags = list(message.tags) if isinstance(message, Batch) else []
    for tag in tags:
        entries[f"tagged-by:{tag}"] = (None, (tag,))
    for cache in _named_caches(case, message):
        entries[f"in-cache:{cache}"] = (cache, ())
    entries["bystander"] = ("vector-bystander", ())
    entries["bystander-tagged"] = (None, ("vector-bystander-tag",))
    for key, (cache, entry_tags) in entries.items():
        assert local.put(local.begin(key, cache, entry_tags), key)

    client = _TouchedOnly(case.get("touched", {}))
    sub = Subscriber(client, local, channel="vectors", transport="pubsub")
    sub.tracker = Tracker(case["last"]["epoch"], case["last"]["seq"])
    await sub._handle(case["message"].encode())

    drop, repair = case["drop"], case["repair"]
    everything = drop["everything"]
    all_tags = drop["all_tags"] or (case["action"] in ("repair", "repair_then_apply") and repair["all_tags"])
    caches = set(drop["caches"])
    if case["action"] in ("repair", "repair_then_apply"):
        caches |= set(repair["caches"])
    expected_gone = set()
    for key, (cache, entry_tags) in entries.items():
        if (
            everything
            or key in drop["keys"]
            or (cache is not None and cache in caches)
            or (entry_tags and (all_tags or set(entry_tags) & set(drop["tags"])))
        ):
            expected_gone.add(key)
    gone = {key for key in entries if key not in local}
    assert gone == expected_gone
    assert (sub.tracker.epoch, sub.tracker.seq) == (case["then"]["epoch"], case["then"]["seq"])
    # touched is read for a gap, and only then.
    assert bool(client.calls) == (case["action"] in ("repair", "repair_then_apply"))
    if case["applied"] is not None:
        assert sub.applied_lsn == parse_lsn(case["applied"])
