"""The Lua scripts of evictd.scripts are evictd's, byte for byte: compared
with the Rust source they were copied from, so the two cannot drift."""

from __future__ import annotations

import re

import pytest

from evictd import scripts

from .conftest import ROOT

LAYOUT_RS = ROOT / "src" / "layout.rs"


@pytest.mark.parametrize("name", ["READ_LUA", "FILL_BEGIN_LUA", "FILL_LUA", "REGISTER_LUA"])
def test_script_is_the_rust_source_text(name: str) -> None:
    source = LAYOUT_RS.read_text(encoding="utf-8")
    match = re.search(r"pub const " + name + r': &str = r#"(.*?)"#;', source, re.S)
    assert match is not None, f"{name} not found in {LAYOUT_RS}"
    assert getattr(scripts, name) == match.group(1)
