"""Key rendering, byte for byte as evictd renders (``src/key.rs``).

The template syntax is documented in ``dependency-graphs/README.md`` ("Key
templates") and pinned by ``tests/vectors/key-rendering.json``, which this
package's tests run whole:

- literal text; ``{name}`` a placeholder; ``{name|lower|trim}`` normalisers
  applied left to right (``lower``, ``upper``, ``trim``, ``sha256`` last);
- ``{{`` and ``}}`` literal braces, for Redis Cluster hash tags;
- ``{?a,b|lower}`` a query section: ``a=1&b=x`` sorted by name, NULL
  (``None``) or absent parameters left out.

Values render as evictd renders them: integers in decimal, ``True`` /
``False`` as ``true`` / ``false``, floats as Rust prints them (the shortest
digits that read back as the same float, never an exponent, ``-0`` as ``0``,
``NaN``, ``inf``), bytes as lowercase hex, strings as given except the
reserved characters ``% : { } & = ?`` and control characters (Unicode
category Cc), which are percent-encoded (UTF-8 bytes, uppercase hex).

Where Python and Rust differ, this module follows Rust on purpose: ``trim``
removes exactly Unicode ``White_Space`` (Python's ``str.strip`` also removes
U+001C..U+001F), and a float never uses an exponent (Python's ``repr`` does).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from decimal import Decimal
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

__all__ = [
    "KeyTemplate",
    "TemplateError",
    "RenderError",
    "MissingParameter",
    "NullParameter",
    "Value",
    "render",
    "render_value",
    "rust_float",
    "trim",
]

#: What a parameter may be. ``None`` is SQL NULL.
Value = Union[None, bool, int, float, str, bytes, bytearray, memoryview, uuid.UUID]

_RESERVED = frozenset("%:{}&=?")

#: Unicode White_Space: what Rust's ``str::trim`` removes.
_WHITE_SPACE = frozenset(
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class TemplateError(ValueError):
    """A template that does not parse; ``offset`` is a byte offset into its UTF-8."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class RenderError(ValueError):
    """A parsed template could not render a key."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class MissingParameter(RenderError):
    """No value was given for a path placeholder."""


class NullParameter(RenderError):
    """A path placeholder is NULL (``None``): nothing is cached under it."""


def trim(text: str) -> str:
    """Removes leading and trailing Unicode ``White_Space``, as Rust's ``str::trim``."""
    start, end = 0, len(text)
    while start < end and text[start] in _WHITE_SPACE:
        start += 1
    while end > start and text[end - 1] in _WHITE_SPACE:
        end -= 1
    return text[start:end]


def _is_control(c: str) -> bool:
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F


def rust_float(x: float) -> str:
    """A float's text as Rust's ``Display`` prints it: the shortest digits
    that read back as ``x``, in positional notation (``1e+16`` is
    ``10000000000000000``, ``1e-05`` is ``0.00001``), ``3.0`` as ``3``,
    ``NaN``, ``inf``, ``-inf``. (evictd renders ``-0.0`` as ``0`` before this.)"""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    # repr gives the shortest round-trip digits, as Rust does; Decimal
    # re-prints them positionally without changing a digit.
    return format(Decimal(repr(x)).normalize(), "f")


def _raw_text(value: Value) -> str:
    """A value's text before normalisers and escaping."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _I64_MIN <= value <= _I64_MAX:
            raise ValueError(f"integer {value} does not fit in 64 bits: evictd renders i64 only; pass a str")
        return str(value)
    if isinstance(value, float):
        return "0" if value == 0.0 else rust_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot render a {type(value).__name__} into a key (int, float, bool, str, bytes, UUID)")


def _escape(text: str) -> str:
    if not any(c in _RESERVED or _is_control(c) for c in text):
        return text
    out: list[str] = []
    for c in text:
        if c in _RESERVED or _is_control(c):
            out.extend(f"%{b:02X}" for b in c.encode("utf-8"))
        else:
            out.append(c)
    return "".join(out)


_NORMALISERS = ("lower", "upper", "trim", "sha256")


def _normalise(name: str, text: str) -> str:
    if name == "lower":
        return text.lower()
    if name == "upper":
        return text.upper()
    if name == "trim":
        return trim(text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_value(value: Value, normalisers: Sequence[str] = ()) -> str:
    """One value as it appears in a key (after ``normalisers``, escaped)."""
    text = _raw_text(value)
    for n in normalisers:
        text = _normalise(n, text)
    return _escape(text)


@dataclass(frozen=True)
class _Placeholder:
    name: str
    normalisers: tuple[str, ...]


@dataclass(frozen=True)
class _Query:
    entries: tuple[_Placeholder, ...]


_Segment = Union[str, _Placeholder, _Query]


def _valid_name(name: str) -> bool:
    return all(c == "_" or (c.isascii() and c.isalpha()) or (i > 0 and c.isascii() and c.isdigit()) for i, c in enumerate(name))


class KeyTemplate:
    """A parsed key template: ``KeyTemplate("user:{{{id}}}:profile").render(id=42)``."""

    __slots__ = ("source", "_segments", "params")

    def __init__(self, source: str) -> None:
        self.source = source
        self._segments: list[_Segment] = []
        #: Distinct parameter names in order of first appearance.
        self.params: list[str] = []
        self._parse()

    def __repr__(self) -> str:
        return f"KeyTemplate({self.source!r})"

    def __str__(self) -> str:
        return self.source

    def render(self, params: Optional[Mapping[str, Value]] = None, /, **kwargs: Value) -> str:
        """Renders with named parameters (a mapping, keywords, or both).

        Raises :class:`MissingParameter` when a path placeholder has no value
        and :class:`NullParameter` when it is ``None``: no key then.
        """
        values: dict[str, Value] = dict(params or {})
        values.update(kwargs)
        out: list[str] = []
        for segment in self._segments:
            if isinstance(segment, str):
                out.append(segment)
            elif isinstance(segment, _Placeholder):
                if segment.name not in values:
                    raise MissingParameter(segment.name, f"no value for placeholder `{segment.name}`")
                value = values[segment.name]
                if value is None:
                    raise NullParameter(segment.name, f"placeholder `{segment.name}` is NULL")
                out.append(render_value(value, segment.normalisers))
            else:
                pairs = [
                    f"{ph.name}={render_value(values[ph.name], ph.normalisers)}"
                    for ph in segment.entries
                    if values.get(ph.name) is not None
                ]
                out.append("&".join(pairs))
        return "".join(out)

    # Parsing mirrors src/key.rs's Parser, including its error offsets
    # (bytes of the UTF-8 source).

    def _err(self, char_index: int, message: str) -> TemplateError:
        return TemplateError(len(self.source[:char_index].encode("utf-8")), message)

    def _parse(self) -> None:
        src = self.source
        literal: list[str] = []
        pos = 0
        while pos < len(src):
            c = src[pos]
            nxt = src[pos + 1] if pos + 1 < len(src) else ""
            if c == "{" and nxt == "{":
                literal.append("{")
                pos += 2
            elif c == "}" and nxt == "}":
                literal.append("}")
                pos += 2
            elif c == "}":
                raise self._err(pos, "unmatched `}` (write `}}` for a literal brace)")
            elif c == "{":
                if literal:
                    self._segments.append("".join(literal))
                    literal = []
                close = src.find("}", pos)
                if close < 0:
                    raise self._err(pos, "unclosed `{` (write `{{` for a literal brace)")
                body = src[pos + 1 : close]
                if body.startswith("?"):
                    self._segments.append(self._query(body[1:], pos + 2))
                else:
                    self._segments.append(self._placeholder(body, pos + 1))
                pos = close + 1
            else:
                literal.append(c)
                pos += 1
        if literal:
            self._segments.append("".join(literal))

    def _query(self, body: str, at: int) -> _Query:
        if not trim(body):
            raise self._err(at, "empty query section `{?}`")
        entries: list[_Placeholder] = []
        names: list[str] = []
        for part in body.split(","):
            name = trim(part.split("|")[0])
            if not name:
                raise self._err(at, "empty parameter name in a query section `{?…}` (a stray comma?)")
            if name in names:
                raise self._err(at, f"parameter `{name}` appears twice in one query section")
            names.append(name)
            entries.append(self._placeholder(part, at))
            at += len(part) + 1
        # Rust sorts `Arc<str>` names: byte order, which for UTF-8 is code point order.
        entries.sort(key=lambda ph: ph.name)
        return _Query(tuple(entries))

    def _placeholder(self, body: str, at: int) -> _Placeholder:
        parts = body.split("|")
        name = trim(parts[0])
        if not name:
            raise self._err(at, "empty placeholder `{}` (write `{{}}` for literal braces)")
        if not _valid_name(name):
            raise self._err(
                at, f"`{name}` is not a placeholder name (letters, digits and `_`, not starting with a digit)"
            )
        normalisers: list[str] = []
        for raw in parts[1:]:
            n = trim(raw)
            if n not in _NORMALISERS:
                raise self._err(at, f"unknown normaliser `{n}` (expected lower, upper, trim or sha256)")
            if normalisers and normalisers[-1] == "sha256":
                raise self._err(at, f"`{n}` after `sha256` in `{name}`: sha256 must be the last normaliser")
            normalisers.append(n)
        if name not in self.params:
            self.params.append(name)
        return _Placeholder(name, tuple(normalisers))


def render(template: str, params: Optional[Mapping[str, Value]] = None, /, **kwargs: Value) -> str:
    """Parses ``template`` and renders it (see :meth:`KeyTemplate.render`)."""
    return KeyTemplate(template).render(params, **kwargs)
