"""Directory and mutable-version formats: round trips, and hostile bytes give a clean error only."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tahoefs.errors import IntegrityError
from tahoefs.formats.caps import DirWriteCap
from tahoefs.formats.dirformat import (
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    BucketRef,
    Entry,
    decode_bucket,
    decode_own,
    decode_root,
    decode_root_own,
    encode_bucket,
    encode_own,
    encode_root,
    seal_write_cap,
    split_entries,
    unseal_write_cap,
)
from tahoefs.formats.mutable import decode_version, encode_version, parse_share

names = st.binary(min_size=1, max_size=255).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
entries = st.builds(
    Entry,
    name=names,
    kind=st.sampled_from([KIND_FILE, KIND_DIR, KIND_SYMLINK]),
    mode=st.integers(0, 0o7777),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**63),
    mtime_ns=st.integers(-(2**63), 2**63 - 1),
    ctime_ns=st.integers(-(2**63), 2**63 - 1),
    cap=st.text("abcdefghijklmnopqrstuvwxyz234567:", max_size=200),
    inline=st.binary(max_size=4096),
    target=st.binary(max_size=300),
    xattrs=st.dictionaries(st.binary(min_size=1, max_size=40), st.binary(max_size=200), max_size=4),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(entries, max_size=12, unique_by=lambda e: e.name))
def test_buckets_round_trip(items: list[Entry]) -> None:
    decoded = decode_bucket(encode_bucket(items))
    assert sorted(decoded, key=lambda e: e.name) == sorted(items, key=lambda e: e.name)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash_the_bucket_or_root_decoder(data: bytes) -> None:
    for decode in (decode_bucket, decode_root):
        with contextlib.suppress(ValueError):
            decode(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(entries, min_size=1, max_size=6, unique_by=lambda e: e.name), st.data())
def test_a_flipped_or_cut_bucket_is_rejected_or_still_well_formed(
    items: list[Entry], data: st.DataObject
) -> None:
    blob = bytearray(encode_bucket(items))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_bucket(bytes(blob))
    except ValueError:
        return
    assert all(1 <= len(e.name) <= 255 for e in decoded)  # whatever parses is within the limits
    with pytest.raises(ValueError):
        decode_bucket(encode_bucket(items)[: data.draw(st.integers(0, len(encode_bucket(items)) - 1))])


def test_root_round_trip_and_ordering_rules() -> None:
    refs = [
        BucketRef(0, 1, inline=encode_bucket([Entry(b"a", KIND_FILE)])),
        BucketRef(2**40, 3, cap="tahoefs:lit:v1:"),
    ]
    assert decode_root(encode_root(refs)) == refs
    with pytest.raises(ValueError):
        decode_root(encode_root([refs[1], refs[0]]))  # out of order
    with pytest.raises(ValueError):
        decode_root(encode_root([BucketRef(5, 0, inline=b"\0\0\0\0")]))  # does not start at 0


def test_root_carries_its_own_attributes_in_version_2_and_version_1_has_none() -> None:
    refs = [BucketRef(0, 0, inline=encode_bucket([]))]
    own = Entry(b"", KIND_DIR, 0o700, 1000, 100, 0, 1_600_000_000_000_000_001, 2, xattrs={b"user.k": b"v"})
    v1, v2 = encode_root(refs), encode_root(refs, own)
    assert v1[6] == 1 and v2[6] == 2
    assert decode_root_own(v1) == (refs, None)
    assert decode_root_own(v2) == (refs, own)
    assert decode_root(v2) == refs
    assert decode_own(encode_own(own)) == own
    for cut in range(len(v1), len(v2)):  # an OWN part cut anywhere is refused
        with pytest.raises(ValueError):
            decode_root_own(v2[:cut])
    with pytest.raises(ValueError):
        decode_root_own(v2 + b"\0")


def test_split_makes_ordered_buckets_holding_every_entry() -> None:
    items = [Entry(f"n{i}".encode(), KIND_FILE, inline=os.urandom(100)) for i in range(1000)]
    pieces = split_entries(0, items)
    assert len(pieces) >= 2 and pieces[0][0] == 0
    assert [lo for lo, _ in pieces] == sorted({lo for lo, _ in pieces})
    assert sorted(e.name for _, part in pieces for e in part) == sorted(e.name for e in items)


def test_sealed_write_caps_open_only_with_the_parent_seed() -> None:
    parent, child = os.urandom(32), str(DirWriteCap(os.urandom(32)))
    sealed = seal_write_cap(parent, child)
    assert unseal_write_cap(parent, sealed) == child
    assert child.encode() not in sealed


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_crash_the_mutable_share_parser(data: bytes) -> None:
    cap = DirWriteCap(bytes(32))
    read = cap.read_cap()
    with pytest.raises(IntegrityError):
        parse_share(data, read.storage_index, read.vk_hash, 0)


def test_every_flipped_byte_of_a_mutable_share_is_caught() -> None:
    cap = DirWriteCap(os.urandom(32))
    read = cap.read_cap()
    shares = encode_version(cap, 7, b"directory bytes" * 10, 3, 10)
    assert (
        decode_version(
            read.read_key, [parse_share(shares[j], read.storage_index, read.vk_hash, j) for j in (0, 4, 9)]
        )
        == b"directory bytes" * 10
    )
    share = shares[4]
    for pos in range(0, len(share), 7):
        bad = bytearray(share)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            parse_share(bytes(bad), read.storage_index, read.vk_hash, 4)
