"""Replays the broadcast reader's fuzz inputs (``fuzz/corpus/``: seeds from
tests/vectors/broadcast.json and inputs the fuzzer kept; ``fuzz/regressions/``:
every input that once failed) through the harness's own check
(``fuzz/broadcast_fuzz.py``), as an ordinary test: no fuzzer and no Redis
needed. docs/fuzzing.md says how the inputs are made."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from evictd.broadcast import parse_message

FUZZ = pathlib.Path(__file__).resolve().parents[1] / "fuzz"
_spec = importlib.util.spec_from_file_location("broadcast_fuzz", FUZZ / "broadcast_fuzz.py")
assert _spec is not None and _spec.loader is not None
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

INPUTS = sorted(p for d in ("corpus", "regressions") for p in (FUZZ / d).iterdir() if p.is_file())


def test_the_corpus_has_the_vector_seeds() -> None:
    assert len([p for p in INPUTS if p.parent.name == "corpus"]) >= 12


@pytest.mark.parametrize("path", INPUTS, ids=[f"{p.parent.name}/{p.name}" for p in INPUTS])
def test_every_fuzz_input_is_read_without_an_unexpected_exception(path: pathlib.Path) -> None:
    harness.check(path.read_bytes())


def test_a_time_beyond_u64_is_absent_as_in_the_rust_reader() -> None:
    big = 10**400
    message = parse_message(
        f'{{"v":2,"kind":"batch","epoch":"1","seq":2,"published_at_ms":{big},"committed_at_ms":{2**64}}}'.encode()
    )
    assert message.published_at_ms is None and message.committed_at_ms is None
    heartbeat = parse_message(f'{{"v":2,"kind":"heartbeat","epoch":"1","seq":2,"published_at_ms":{-1}}}'.encode())
    assert heartbeat.published_at_ms is None
