"""tests/vectors/layout.json, the language-neutral specification of the Redis
names and encodings (stamp keys, namespace stamps, version keys, tag keys),
run whole from the repository root."""

from __future__ import annotations

import json

from evictd.layout import guard_in_slot, guard_key, namespace_key, parse_version, stamp, tag_key, unstamp, versioned_key

from .conftest import ROOT

VECTORS = json.loads((ROOT / "tests" / "vectors" / "layout.json").read_text(encoding="utf-8"))


def _b(text: str) -> bytes:
    return text.encode("utf-8")


def test_guard_keys() -> None:
    for case in VECTORS["guard"]:
        assert guard_key(_b(case["key"])) == _b(case["stamp_key"]), case
        assert guard_in_slot(_b(case["key"])) == case["in_slot"], case


def test_stamps() -> None:
    for case in VECTORS["stamp"]:
        assert stamp(case["namespace"], _b(case["payload"])) == _b(case["value"]), case
    for case in VECTORS["unstamp"]:
        want = None if case["payload"] is None else _b(case["payload"])
        assert unstamp(_b(case["value"]), case["namespace"]) == want, case


def test_versions() -> None:
    for case in VECTORS["version"]:
        assert parse_version(_b(case["stored"])) == case["version"], case
    for case in VECTORS["versioned"]:
        assert versioned_key(case["key"], case["version"]) == case["data_key"], case


def test_namespace_and_tag_keys() -> None:
    for case in VECTORS["namespace"]:
        assert namespace_key(case["cache"]) == case["key"], case
    for case in VECTORS["tag"]:
        assert tag_key(case["tag"]) == case["key"], case
