#!/usr/bin/env python3
"""Writes the seed corpus of the pgoutput target (fuzz/corpus/pgoutput/):
length-framed XLogData payloads as evictd::fuzzing::pgoutput reads them,
against its seeded relations (16384 public.products, 16385 shop.orders
with REPLICA IDENTITY FULL, 16386 pg_catalog.nothing)."""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "pgoutput")


def frame(*messages):
    return b"".join(struct.pack(">H", len(m)) + m for m in messages)


def text(v):
    if v is None:
        return b"n"
    if v == "u":
        return b"u"
    b = v.encode()
    return b"t" + struct.pack(">I", len(b)) + b


def tuple_(*cells):
    return struct.pack(">H", len(cells)) + b"".join(text(c) for c in cells)


PRODUCT = ["42", "Widget", "12.50", "t", "1.5", "9000000000", "7", "2026-12-05 13:00:00+00",
           "2026-12-05", "13:00:00", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", '{"a": [1, 2]}',
           "\\xdeadbeef", "NaN"]


def relation(oid, ns, name, ident, cols):
    m = b"R" + struct.pack(">I", oid) + ns.encode() + b"\0" + name.encode() + b"\0" + bytes([ident])
    m += struct.pack(">H", len(cols))
    for flags, col, typ in cols:
        m += bytes([flags]) + col.encode() + b"\0" + struct.pack(">Ii", typ, -1)
    return m


SEEDS = {
    "insert-product": frame(b"I" + struct.pack(">I", 16384) + b"N" + tuple_(*PRODUCT)),
    "update-product-key-changed": frame(
        b"U" + struct.pack(">I", 16384) + b"K" + tuple_("41", None, None) + b"N" + tuple_(*PRODUCT)),
    "update-product-toast-unchanged": frame(
        b"U" + struct.pack(">I", 16384) + b"N" + tuple_("42", "u", "13.00")),
    "delete-order-full": frame(b"D" + struct.pack(">I", 16385) + b"O" + tuple_("9", "alice", "-0.01")),
    "delete-product-key": frame(b"D" + struct.pack(">I", 16384) + b"K" + tuple_("42")),
    "truncate-two": frame(b"T" + struct.pack(">IB", 2, 0) + struct.pack(">II", 16384, 16385)),
    "type-and-origin": frame(b"Y" + struct.pack(">I", 600) + b"public\0mood\0",
                             b"O" + struct.pack(">Q", 0x16B374D848) + b"origin\0"),
    "relation-then-insert": frame(
        relation(17000, "public", "products_2026", ord("d"), [(1, "id", 23), (0, "note", 25)]),
        b"I" + struct.pack(">I", 17000) + b"N" + tuple_("1", "partition row")),
    "binary-cell": frame(b"I" + struct.pack(">I", 16385) + b"N"
                         + struct.pack(">H", 2) + b"b" + struct.pack(">I", 2) + b"\x00\x01" + b"n"),
}

os.makedirs(OUT, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
