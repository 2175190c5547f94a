"""tests/vectors/key-rendering.json, the language-neutral specification of
key rendering, run whole from the repository root, plus what the vectors do
not pin yet but evictd's renderer does (floats without exponents, Rust's
whitespace set)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from evictd.keys import KeyTemplate, MissingParameter, NullParameter, TemplateError, render, rust_float, trim

from .conftest import ROOT

VECTORS = ROOT / "tests" / "vectors" / "key-rendering.json"


def _param(value: Any) -> Any:
    """A vector's JSON value as evictd reads it (serde_json, `Value::from_json`):
    a number that does not fit in i64 is a float."""
    if isinstance(value, dict) and "bytes" in value:
        return bytes.fromhex(value["bytes"])
    if isinstance(value, dict) and "float" in value:
        return float(value["float"])
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return float(value)
    return value


def _outcome(case: dict[str, Any]) -> tuple[str, str]:
    try:
        template = KeyTemplate(case["template"])
    except TemplateError:
        return ("error", "template")
    try:
        return ("key", template.render({k: _param(v) for k, v in case["params"].items()}))
    except NullParameter:
        return ("error", "null")
    except MissingParameter:
        return ("error", "missing")


def test_every_key_rendering_vector_holds() -> None:
    doc = json.loads(VECTORS.read_text(encoding="utf-8"))
    cases = doc["cases"]
    assert len(cases) >= 40, "the vector file lost cases"
    failures = []
    for case in cases:
        want = ("key", case["key"]) if "key" in case else ("error", case["error"])
        got = _outcome(case)
        if got != want:
            failures.append(f"{case['name']}: {case['template']!r} → {got}, expected {want}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "value, text",
    [
        (1e16, "10000000000000000"),
        (1e21, "1000000000000000000000"),
        (1e-5, "0.00001"),
        (0.1, "0.1"),
        (-2.5, "-2.5"),
        (float("nan"), "NaN"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (5e-324, "0." + "0" * 323 + "5"),
    ],
)
def test_floats_print_as_rust_displays_them(value: float, text: str) -> None:
    assert rust_float(value) == text


def test_negative_zero_renders_zero() -> None:
    assert render("z:{p}", p=-0.0) == "z:0"


def test_trim_removes_rust_white_space_only() -> None:
    # U+001C..U+001F are whitespace to Python's str.strip, not to Rust's trim.
    assert trim("\x1cx\x1f") == "\x1cx\x1f"
    assert trim("\u3000\u00a0x\u2029\u0085") == "x"
    # Kept, then percent-encoded as control characters.
    assert render("k:{v|trim}", v="\x1cx") == "k:%1Cx"


def test_errors_carry_byte_offsets_like_evictd() -> None:
    with pytest.raises(TemplateError) as e:
        KeyTemplate("user:{id")
    assert (e.value.offset, e.value.message) == (5, "unclosed `{` (write `{{` for a literal brace)")
    with pytest.raises(TemplateError) as e:
        KeyTemplate("é}")
    assert e.value.offset == 2


def test_keywords_and_mappings_render_alike() -> None:
    t = KeyTemplate("s:{?q|trim|lower,category,page}")
    assert t.params == ["q", "category", "page"]
    assert t.render({"q": " Trail Shoes", "category": 3}, page=None) == "s:category=3&q=trail shoes"


def test_integers_beyond_64_bits_are_refused() -> None:
    with pytest.raises(ValueError):
        render("n:{n}", n=2**64)
