"""Key names, versions and namespace stamps: the cases of layout.rs's own tests."""

from __future__ import annotations

from redis.crc import key_slot

from evictd.broadcast import keys_of
from evictd.layout import (
    guard_in_slot,
    guard_key,
    namespace_key,
    parse_version,
    stamp,
    tag_key,
    unstamp,
    versioned_key,
)


def test_readers_parse_versions_and_stamps() -> None:
    assert parse_version(b"18446744073709551615") == 2**64 - 1
    assert parse_version(b"0042") == 42
    assert parse_version(b"18446744073709551616") is None
    assert parse_version(b"-1") is None
    assert parse_version(b"") is None
    assert parse_version("17") == 17
    assert versioned_key("product:{42}:prices", 7) == "product:{42}:prices:v7"
    value = stamp(17, b'{"a":1|2}')
    assert value == b'17|{"a":1|2}'
    assert unstamp(value, 17) == b'{"a":1|2}'
    assert unstamp(value, 18) is None
    assert unstamp(b"no stamp", 0) is None
    assert unstamp(None, 0) is None


def test_a_tag_registry_hashes_on_its_tag_alone() -> None:
    assert tag_key("user:42") == "evictd:tag:{user:42}"
    assert key_slot(tag_key("user:42").encode()) == key_slot(b"user:42")
    assert namespace_key("product_detail") == "evictd:ns:product_detail"


def test_a_guard_lives_in_its_keys_slot() -> None:
    for key in ["user:{42}:profile", "user:42:profile", "{x}", "x{", "p:{{a}}", "q?a=1&b=2", "x}{y}"]:
        assert guard_in_slot(key), key
        assert key_slot(guard_key(key)) == key_slot(key.encode()), key
    for key in ["product:{}:x", "a}b", "{}{a}", "m}", ""]:
        assert not guard_in_slot(key), key
        assert key_slot(guard_key(key)) != key_slot(key.encode()), key
    assert guard_key(b"user:{42}:profile") == b"evictd:guard:user:{42}:profile"
    assert guard_key("user:42") == b"evictd:guard:{user:42}"


def test_broadcast_keys_share_the_channels_hash_tag() -> None:
    keys = keys_of("evictd:invalidations")
    assert keys.seq == "evictd:bc:{evictd:invalidations}:seq"
    assert keys.touched == "evictd:bc:{evictd:invalidations}:touched"
    slots = {key_slot(k.encode()) for k in (keys.seq, keys.epoch, keys.stream, keys.applied, keys.touched)}
    assert len(slots) == 1
