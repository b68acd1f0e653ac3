"""Specification of the immutable share layout and its trailer (tahoefs.formats.share).

Shares are built here in memory, exactly as an uploader writes them: encode_segment output, block hashes
folded by ChunkedLeafHasher, then build_trailer_tail. Small segments and hash chunks of 2 leaves give
several segments and several chunks per share.
"""

from __future__ import annotations

import contextlib
import random
import struct
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tahoefs.errors import IntegrityError, NodeError
from tahoefs.formats.codec import block_hash, decode_segment, encode_segment
from tahoefs.formats.hashing import HASH_SIZE, TAG_UEB, tagged_hash
from tahoefs.formats.share import (
    FOOTER_FORMAT,
    FOOTER_MAGIC,
    FOOTER_SIZE,
    MAX_SEGMENT_SIZE,
    UEB,
    UEB_FORMAT,
    UEB_MAGIC,
    UEB_SIZE,
    ChunkedLeafHasher,
    ShareLayout,
    VerifiedTrailer,
    build_trailer_tail,
    chunk_root,
    pack_footer,
    parse_trailer,
    share_root,
    share_roots_hash,
    unpack_footer,
    verify_leaves,
)

EXAMPLES = settings(max_examples=100, deadline=None)
KEY = bytes(range(32))


# --- building and reading shares the way the grid does -----------------------------------------------------


@dataclass(frozen=True)
class BuiltFile:
    data: bytes
    ueb: UEB
    shares: list[bytes]
    leaves: list[list[bytes]]  # share -> leaf per segment

    @property
    def layout(self) -> ShareLayout:
        return ShareLayout(self.ueb)

    @property
    def ueb_hash(self) -> bytes:
        return self.ueb.hash()


def build_file(data: bytes, *, k: int, n: int, segment_size: int, hash_chunk_leaves: int) -> BuiltFile:
    hashers = [ChunkedLeafHasher(hash_chunk_leaves) for _ in range(n)]
    blocks: list[list[bytes]] = [[] for _ in range(n)]
    leaves: list[list[bytes]] = [[] for _ in range(n)]
    for start in range(0, len(data), segment_size):
        seg_blocks, seg_hashes = encode_segment(KEY, start, data[start : start + segment_size], k, n)
        for j in range(n):
            blocks[j].append(seg_blocks[j])
            leaves[j].append(seg_hashes[j])
            hashers[j].add(seg_hashes[j])
    roots = [h.finish() for h in hashers]
    ueb = UEB(k, n, segment_size, len(data), hash_chunk_leaves, share_roots_hash(roots))
    shares = [
        b"".join(blocks[j])
        + b"".join(leaves[j])
        + build_trailer_tail(bytes(hashers[j].chunk_roots), roots, ueb, j)
        for j in range(n)
    ]
    return BuiltFile(data, ueb, shares, leaves)


def read_share(share: bytes, ueb_hash: bytes, share_num: int, suffix_start: int = 0) -> list[bytes]:
    """Everything a downloader does with one share: fetch a suffix, verify the trailer (fetching more if
    told to), verify each chunk's leaves and each block against its leaf. Returns the verified blocks;
    raises IntegrityError on any mismatch."""
    trailer, more = parse_trailer(share[suffix_start:], len(share), ueb_hash, share_num)
    if more:
        trailer, more = parse_trailer(share[-more:], len(share), ueb_hash, share_num)
        assert more == 0
    layout = trailer.layout
    blocks = []
    for chunk in range(layout.num_chunks):
        offset, length = layout.chunk_range(chunk)
        leaves = trailer.leaves.get(chunk) or verify_leaves(trailer, chunk, share[offset : offset + length])
        for i in range(length // HASH_SIZE):
            segment = chunk * trailer.ueb.hash_chunk_leaves + i
            start = layout.block_offset(segment)
            block = share[start : start + layout.block_size(segment)]
            if block_hash(block) != leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE]:
                raise IntegrityError("share", f"block {segment} does not match its leaf")
            blocks.append(block)
    return blocks


def decode_file(built: BuiltFile, share_nums: list[int]) -> bytes:
    verified = {j: read_share(built.shares[j], built.ueb_hash, j) for j in share_nums}
    layout, ueb = built.layout, built.ueb
    out = []
    for segment in range(layout.num_segments):
        received = {j: blocks[segment] for j, blocks in verified.items()}
        out.append(
            decode_segment(
                KEY,
                segment * ueb.segment_size,
                layout.segment_length(segment),
                received,
                ueb.needed,
                ueb.total,
            )
        )
    return b"".join(out)


# 10 segments of 64 bytes (the last one 5 bytes), 5 hash chunks of 2 leaves, 3-of-5.
SMALL = build_file(random.Random(1).randbytes(9 * 64 + 5), k=3, n=5, segment_size=64, hash_chunk_leaves=2)
# 3 segments of 4096 (the last one short), 2 chunks of 2 leaves (the last one holding 1), 2-of-4.
MEDIUM = build_file(
    random.Random(2).randbytes(2 * 4096 + 100), k=2, n=4, segment_size=4096, hash_chunk_leaves=2
)
BUILT = {"small": SMALL, "medium": MEDIUM}
RESERVED = slice(8 + 2, 8 + 2 + 2)  # the footer's reserved field, relative to the footer


def test_the_fixtures_exercise_several_segments_and_chunks() -> None:
    assert (SMALL.layout.num_segments, SMALL.layout.num_chunks) == (10, 5)
    assert (MEDIUM.layout.num_segments, MEDIUM.layout.num_chunks) == (3, 2)


# --- UEB -------------------------------------------------------------------------------------------------


@st.composite
def uebs(draw: st.DrawFn) -> UEB:
    n = draw(st.integers(min_value=1, max_value=256))
    k = draw(st.integers(min_value=1, max_value=n))
    segment_size = 16 * draw(st.integers(min_value=1, max_value=MAX_SEGMENT_SIZE // 16))
    file_size = draw(st.integers(min_value=0, max_value=segment_size * (2**32 - 1)))
    leaves = draw(st.integers(min_value=1, max_value=1 << 20))
    return UEB(k, n, segment_size, file_size, leaves, draw(st.binary(min_size=32, max_size=32)))


@EXAMPLES
@given(uebs())
def test_ueb_pack_unpack_round_trips(ueb: UEB) -> None:
    packed = ueb.pack()
    assert len(packed) == UEB_SIZE
    assert UEB.unpack(packed) == ueb


@EXAMPLES
@given(uebs())
def test_ueb_hash_is_the_tagged_hash_of_its_packing(ueb: UEB) -> None:
    assert ueb.hash() == tagged_hash(TAG_UEB, ueb.pack())


def _raw_ueb(**overrides: object) -> bytes:
    fields = {
        "magic": UEB_MAGIC,
        "version": 1,
        "k": 3,
        "n": 10,
        "seg": 1024,
        "size": 5000,
        "nsegs": 5,
        "leaves": 4096,
        "roots": bytes(32),
    }
    fields.update(overrides)
    return struct.pack(UEB_FORMAT, *fields.values())


def test_raw_ueb_helper_builds_a_valid_ueb() -> None:
    assert UEB.unpack(_raw_ueb()) == UEB(3, 10, 1024, 5000, 4096, bytes(32))


@pytest.mark.parametrize("delta", [-UEB_SIZE, -1, 1, 100])
def test_ueb_unpack_rejects_the_wrong_length(delta: int) -> None:
    raw = _raw_ueb()
    data = raw[:delta] if delta < 0 else raw + bytes(delta)
    with pytest.raises(ValueError, match="wrong length"):
        UEB.unpack(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"magic": b"TFUF"}, "bad magic"),
        ({"magic": b"\0\0\0\0"}, "bad magic"),
        ({"version": 0}, "version"),
        ({"version": 2}, "version"),
        ({"k": 0}, "k/n"),
        ({"k": 11}, "k/n"),
        ({"k": 257, "n": 257}, "k/n"),
        ({"n": 0, "k": 0}, "k/n"),
        ({"seg": 0, "nsegs": 0, "size": 0}, "segment size"),
        ({"seg": 15}, "segment size"),
        ({"seg": 1000}, "segment size"),
        ({"seg": MAX_SEGMENT_SIZE + 16, "nsegs": 1}, "segment size"),
        ({"leaves": 0}, "hash chunk"),
        ({"leaves": (1 << 20) + 1}, "hash chunk"),
        ({"nsegs": 4}, "segment count"),
        ({"nsegs": 6}, "segment count"),
        ({"size": 0}, "segment count"),
        ({"size": 2**64 - 1}, "segment count"),
    ],
)
def test_ueb_unpack_rejects_out_of_range_fields(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UEB.unpack(_raw_ueb(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"k": 1, "n": 1},
        {"k": 256, "n": 256},
        {"seg": 16, "size": 16 * 5, "nsegs": 5},
        {"seg": MAX_SEGMENT_SIZE, "size": 1, "nsegs": 1},
        {"leaves": 1},
        {"leaves": 1 << 20},
        {"size": 0, "nsegs": 0},
        {"size": 1, "nsegs": 1},
    ],
)
def test_ueb_unpack_accepts_boundary_values(overrides: dict) -> None:
    ueb = UEB.unpack(_raw_ueb(**overrides))
    assert ueb.pack() == _raw_ueb(**overrides)


# --- footer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share_num", [0, 1, 255, 65535])
def test_footer_round_trips(share_num: int) -> None:
    footer = pack_footer(share_num)
    assert len(footer) == FOOTER_SIZE
    assert footer.startswith(FOOTER_MAGIC)
    assert unpack_footer(footer) == (share_num, UEB_SIZE)


@pytest.mark.parametrize(
    ("footer", "message"),
    [
        (pack_footer(0)[:-1], "wrong length"),
        (pack_footer(0) + b"\0", "wrong length"),
        (struct.pack(FOOTER_FORMAT, b"TFSHARE2", 0, 0, UEB_SIZE), "bad footer magic"),
        (struct.pack(FOOTER_FORMAT, FOOTER_MAGIC, 0, 0, UEB_SIZE + 1), "UEB length"),
        (struct.pack(FOOTER_FORMAT, FOOTER_MAGIC, 0, 0, 0), "UEB length"),
        (struct.pack(FOOTER_FORMAT, FOOTER_MAGIC, 0, 1, UEB_SIZE), "reserved field is not zero"),
        (struct.pack(FOOTER_FORMAT, FOOTER_MAGIC, 0, 0x8000, UEB_SIZE), "reserved field is not zero"),
    ],
)
def test_unpack_footer_rejects_bad_footers(footer: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack_footer(footer)


# --- layout ----------------------------------------------------------------------------------------------


def check_layout(layout: ShareLayout) -> None:
    ueb = layout.ueb
    seg, k = ueb.segment_size, ueb.needed
    num_segments = -(-ueb.file_size // seg)
    lengths = [min(seg, ueb.file_size - i * seg) for i in range(num_segments)]
    block_sizes = [-(-length // k) for length in lengths]
    num_chunks = -(-num_segments // ueb.hash_chunk_leaves)

    assert layout.num_segments == num_segments
    assert [layout.segment_length(i) for i in range(num_segments)] == lengths
    assert sum(lengths) == ueb.file_size
    assert [layout.block_size(i) for i in range(num_segments)] == block_sizes
    assert layout.blocks_length == sum(block_sizes)
    # Blocks are contiguous: each starts where the previous one ended.
    offset = 0
    for i, size in enumerate(block_sizes):
        assert layout.block_offset(i) == offset
        offset += size
    assert layout.num_chunks == num_chunks
    assert layout.leaves_offset == layout.blocks_length
    assert layout.chunk_roots_offset == layout.leaves_offset + 32 * num_segments
    assert layout.share_roots_offset == layout.chunk_roots_offset + 32 * num_chunks
    assert layout.ueb_offset == layout.share_roots_offset + 32 * ueb.total
    assert layout.footer_offset == layout.ueb_offset + UEB_SIZE
    assert layout.total_length == (
        sum(block_sizes) + 32 * num_segments + 32 * num_chunks + 32 * ueb.total + UEB_SIZE + FOOTER_SIZE
    )
    assert layout.trailer_length == layout.total_length - layout.blocks_length
    # Hash chunks tile the leaves in order, each holding at most hash_chunk_leaves leaves.
    offset = layout.leaves_offset
    for chunk in range(num_chunks):
        start, length = layout.chunk_range(chunk)
        assert start == offset
        assert 0 < length <= 32 * ueb.hash_chunk_leaves
        assert length % 32 == 0
        offset += length
    assert offset == layout.chunk_roots_offset


SEG = 4096


@pytest.mark.parametrize(
    "file_size", [0, 1, 15, SEG - 1, SEG, SEG + 1, 2 * SEG, 7 * SEG + 3, 100 * SEG, 100 * SEG - 1]
)
@pytest.mark.parametrize("hash_chunk_leaves", [1, 2, 3, 4096])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (3, 10), (7, 7), (5, 256)])
def test_share_layout_offsets_are_consistent(file_size: int, hash_chunk_leaves: int, k: int, n: int) -> None:
    check_layout(ShareLayout(UEB(k, n, SEG, file_size, hash_chunk_leaves, bytes(32))))


@EXAMPLES
@given(uebs().map(lambda u: replace(u, file_size=u.file_size % (1000 * u.segment_size))))
def test_share_layout_offsets_are_consistent_for_any_ueb(ueb: UEB) -> None:
    check_layout(ShareLayout(ueb))


def test_full_block_size_is_the_size_of_a_full_segments_block() -> None:
    layout = ShareLayout(UEB(3, 10, 1000 * 16, 3 * 16000 + 1, 4096, bytes(32)))
    assert layout.full_block_size == -(-16000 // 3)
    assert layout.block_size(0) == layout.full_block_size
    assert layout.block_size(3) == 1


# --- a complete share in memory --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT)
def test_built_shares_have_the_layouts_length_and_blocks_at_its_offsets(name: str) -> None:
    built = BUILT[name]
    layout = built.layout
    check_layout(layout)
    for j, share in enumerate(built.shares):
        assert len(share) == layout.total_length
        for segment in range(layout.num_segments):
            start = layout.block_offset(segment)
            block = share[start : start + layout.block_size(segment)]
            assert block_hash(block) == built.leaves[j][segment]
        leaves = share[layout.leaves_offset : layout.chunk_roots_offset]
        assert leaves == b"".join(built.leaves[j])
        assert share[layout.ueb_offset : layout.footer_offset] == built.ueb.pack()
        assert unpack_footer(share[layout.footer_offset :]) == (j, UEB_SIZE)


@pytest.mark.parametrize("name", BUILT)
def test_parse_trailer_verifies_every_share_from_the_full_suffix(name: str) -> None:
    built = BUILT[name]
    layout = built.layout
    for j, share in enumerate(built.shares):
        trailer, more = parse_trailer(share, len(share), built.ueb_hash, j)
        assert more == 0
        assert trailer.share_num == j
        assert trailer.ueb == built.ueb
        assert trailer.layout == layout
        assert len(trailer.chunk_roots) == layout.num_chunks
        # Every chunk's leaves were in the suffix and were verified.
        assert sorted(trailer.leaves) == list(range(layout.num_chunks))
        assert b"".join(trailer.leaves[c] for c in range(layout.num_chunks)) == b"".join(built.leaves[j])


@pytest.mark.parametrize("name", BUILT)
def test_parse_trailer_from_just_the_trailer_verifies_all_leaves(name: str) -> None:
    built = BUILT[name]
    for j, share in enumerate(built.shares):
        trailer, more = parse_trailer(share[built.layout.leaves_offset :], len(share), built.ueb_hash, j)
        assert more == 0
        assert len(trailer.leaves) == built.layout.num_chunks


@pytest.mark.parametrize("name", BUILT)
def test_each_block_hash_matches_its_verified_leaf(name: str) -> None:
    built = BUILT[name]
    layout = built.layout
    per = built.ueb.hash_chunk_leaves
    for j, share in enumerate(built.shares):
        trailer, _ = parse_trailer(share, len(share), built.ueb_hash, j)
        for segment in range(layout.num_segments):
            chunk, i = divmod(segment, per)
            leaf = trailer.leaves[chunk][i * HASH_SIZE : (i + 1) * HASH_SIZE]
            start = layout.block_offset(segment)
            assert block_hash(share[start : start + layout.block_size(segment)]) == leaf


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(BUILT)), st.data())
def test_parse_trailer_with_a_short_suffix_asks_for_the_bytes_it_needs(name: str, data) -> None:
    built = BUILT[name]
    layout = built.layout
    j = data.draw(st.integers(min_value=0, max_value=built.ueb.total - 1))
    share = built.shares[j]
    suffix_len = data.draw(st.integers(min_value=UEB_SIZE + FOOTER_SIZE, max_value=len(share)))
    trailer, more = parse_trailer(share[-suffix_len:], len(share), built.ueb_hash, j)
    needed = len(share) - layout.chunk_roots_offset
    suffix_start = len(share) - suffix_len
    assert trailer.ueb == built.ueb
    if suffix_len < needed:
        assert more == needed
        assert trailer.chunk_roots == []
        assert trailer.leaves == {}
        # Fetching exactly what was asked for completes the verification.
        trailer, more = parse_trailer(share[-needed:], len(share), built.ueb_hash, j)
        assert more == 0
        assert len(trailer.chunk_roots) == layout.num_chunks
    else:
        assert more == 0
        assert len(trailer.chunk_roots) == layout.num_chunks
        # Exactly the chunks whose leaves lie wholly inside the suffix are verified.
        expected = {c for c in range(layout.num_chunks) if layout.chunk_range(c)[0] >= suffix_start}
        assert set(trailer.leaves) == expected


@pytest.mark.parametrize("name", BUILT)
def test_verify_leaves_accepts_each_chunk_and_rejects_anything_else(name: str) -> None:
    built = BUILT[name]
    layout = built.layout
    for j, share in enumerate(built.shares):
        trailer, more = parse_trailer(share[layout.chunk_roots_offset :], len(share), built.ueb_hash, j)
        assert more == 0
        assert trailer.leaves == {}
        for chunk in range(layout.num_chunks):
            offset, length = layout.chunk_range(chunk)
            leaves = share[offset : offset + length]
            assert verify_leaves(trailer, chunk, leaves) == leaves
            with pytest.raises(IntegrityError):
                verify_leaves(trailer, chunk, leaves[:-1])
            with pytest.raises(IntegrityError):
                verify_leaves(trailer, chunk, bytes([leaves[0] ^ 1]) + leaves[1:])
            other = (chunk + 1) % layout.num_chunks
            if other != chunk:
                o_offset, o_length = layout.chunk_range(other)
                with pytest.raises(IntegrityError):
                    verify_leaves(trailer, chunk, share[o_offset : o_offset + o_length])


@pytest.mark.parametrize("name", BUILT)
def test_any_k_shares_read_back_the_file(name: str) -> None:
    built = BUILT[name]
    n, k = built.ueb.total, built.ueb.needed
    assert decode_file(built, list(range(n - k, n))) == built.data
    assert decode_file(built, list(range(k))) == built.data


@settings(max_examples=40, deadline=None)
@given(
    st.binary(min_size=1, max_size=700),
    st.sampled_from([16, 32, 64]),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=6).flatmap(
        lambda n: st.tuples(st.integers(min_value=1, max_value=n), st.just(n))
    ),
    st.data(),
)
def test_any_built_file_verifies_and_decodes_from_any_k_shares(data_, segment_size, leaves, kn, data) -> None:
    k, n = kn
    built = build_file(data_, k=k, n=n, segment_size=segment_size, hash_chunk_leaves=leaves)
    check_layout(built.layout)
    assert all(len(s) == built.layout.total_length for s in built.shares)
    chosen = data.draw(st.permutations(range(n)))[:k]
    assert decode_file(built, chosen) == data_


def test_an_empty_file_has_a_verifiable_share_of_only_a_trailer() -> None:
    built = build_file(b"", k=2, n=3, segment_size=64, hash_chunk_leaves=2)
    layout = built.layout
    assert (layout.num_segments, layout.num_chunks, layout.blocks_length) == (0, 0, 0)
    for j, share in enumerate(built.shares):
        assert len(share) == 32 * 3 + UEB_SIZE + FOOTER_SIZE == layout.total_length
        trailer, more = parse_trailer(share, len(share), built.ueb_hash, j)
        assert (more, trailer.chunk_roots, trailer.leaves) == (0, [], {})


def test_chunked_leaf_hasher_folds_leaves_into_chunk_roots_and_a_share_root() -> None:
    leaves = [bytes([i]) * 32 for i in range(5)]
    hasher = ChunkedLeafHasher(2)
    for leaf in leaves:
        hasher.add(leaf)
    root = hasher.finish()
    expected_chunks = [chunk_root(b"".join(leaves[i : i + 2])) for i in range(0, 5, 2)]
    assert bytes(hasher.chunk_roots) == b"".join(expected_chunks)
    assert root == share_root(b"".join(expected_chunks))


# --- tampering -------------------------------------------------------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(BUILT)),
    st.sampled_from(["whole share", "trailer", "chunk roots onward"]),
    st.data(),
)
def test_any_flipped_bit_in_a_share_is_detected(name: str, start_at: str, data) -> None:
    built = BUILT[name]
    layout = built.layout
    j = data.draw(st.integers(min_value=0, max_value=built.ueb.total - 1))
    share = built.shares[j]
    suffix_start = {
        "whole share": 0,
        "trailer": layout.leaves_offset,
        "chunk roots onward": layout.chunk_roots_offset,
    }[start_at]
    bit = data.draw(st.integers(min_value=0, max_value=8 * len(share) - 1))
    with pytest.raises(IntegrityError):
        read_share(_flip(share, bit), built.ueb_hash, j, suffix_start)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(BUILT)), st.data())
def test_a_flipped_bit_in_the_ueb_or_roots_is_never_accepted_by_parse_trailer(name: str, data) -> None:
    built = BUILT[name]
    layout = built.layout
    j = data.draw(st.integers(min_value=0, max_value=built.ueb.total - 1))
    share = built.shares[j]
    # Chunk roots, share roots and UEB: everything parse_trailer itself must vouch for.
    bit = data.draw(
        st.integers(min_value=8 * layout.chunk_roots_offset, max_value=8 * layout.footer_offset - 1)
    )
    with pytest.raises(IntegrityError):
        parse_trailer(_flip(share, bit)[layout.chunk_roots_offset :], len(share), built.ueb_hash, j)


def test_every_byte_of_a_trailer_is_covered_by_verification() -> None:
    # Exhaustive companion of the hypothesis test: one flipped bit in each byte of a trailer.
    share, layout = SMALL.shares[1], SMALL.layout
    for offset in range(layout.leaves_offset, layout.total_length):
        tampered = _flip(share, 8 * offset + offset % 8)
        with pytest.raises(IntegrityError):
            read_share(tampered, SMALL.ueb_hash, 1, layout.leaves_offset)


@pytest.mark.parametrize("bit", range(8 * (RESERVED.stop - RESERVED.start)))
def test_a_flipped_bit_in_the_footers_reserved_field_raises_integrity_error(bit: int) -> None:
    # The reserved field is covered by no hash, so it must be zero or the share is refused.
    share, layout = SMALL.shares[0], SMALL.layout
    tampered = _flip(share, 8 * (layout.footer_offset + RESERVED.start) + bit)
    with pytest.raises(IntegrityError, match="reserved field is not zero"):
        parse_trailer(tampered, len(share), SMALL.ueb_hash, 0)


@pytest.mark.parametrize("name", BUILT)
def test_a_wrong_expected_ueb_hash_raises_integrity_error(name: str) -> None:
    built = BUILT[name]
    share = built.shares[0]
    other = build_file(
        built.data + b"!", k=built.ueb.needed, n=built.ueb.total, segment_size=64, hash_chunk_leaves=2
    )
    for wrong in [bytes(32), _flip(built.ueb_hash, 0), _flip(built.ueb_hash, 255), other.ueb_hash]:
        with pytest.raises(IntegrityError, match="UEB does not match"):
            parse_trailer(share, len(share), wrong, 0)


@pytest.mark.parametrize("name", BUILT)
def test_a_wrong_share_number_raises_integrity_error(name: str) -> None:
    built = BUILT[name]
    n = built.ueb.total
    for j, share in enumerate(built.shares):
        for wrong in {*range(n), n, n + 1, 255, 65535} - {j}:
            with pytest.raises(IntegrityError, match="footer says share"):
                parse_trailer(share, len(share), built.ueb_hash, wrong)


@pytest.mark.parametrize("name", BUILT)
def test_a_share_relabelled_as_another_share_number_raises_integrity_error(name: str) -> None:
    built = BUILT[name]
    layout = built.layout
    for j, share in enumerate(built.shares):
        for claimed in set(range(built.ueb.total)) - {j}:
            relabelled = share[: layout.footer_offset] + pack_footer(claimed)
            with pytest.raises(IntegrityError):
                read_share(relabelled, built.ueb_hash, claimed)


def test_a_share_number_beyond_n_in_both_footer_and_request_raises_integrity_error() -> None:
    share, layout = SMALL.shares[0], SMALL.layout
    relabelled = share[: layout.footer_offset] + pack_footer(SMALL.ueb.total)
    with pytest.raises(IntegrityError, match="footer says share"):
        parse_trailer(relabelled, len(share), SMALL.ueb_hash, SMALL.ueb.total)


@EXAMPLES
@given(
    st.sampled_from(sorted(BUILT)), st.integers(min_value=-10_000, max_value=1 << 40).filter(bool), st.data()
)
def test_a_wrong_share_length_raises_integrity_error(name: str, delta: int, data) -> None:
    built = BUILT[name]
    share = built.shares[0]
    suffix_len = data.draw(st.integers(min_value=UEB_SIZE + FOOTER_SIZE, max_value=len(share)))
    with pytest.raises(IntegrityError):
        parse_trailer(share[-suffix_len:], len(share) + delta, built.ueb_hash, 0)


@pytest.mark.parametrize("name", BUILT)
def test_a_suffix_too_short_for_ueb_and_footer_raises_integrity_error(name: str) -> None:
    built = BUILT[name]
    share = built.shares[0]
    for length in [0, 1, FOOTER_SIZE, UEB_SIZE + FOOTER_SIZE - 1]:
        with pytest.raises(IntegrityError, match="too short"):
            parse_trailer(share[len(share) - length :], len(share), built.ueb_hash, 0)


def test_a_suffix_longer_than_the_share_raises_integrity_error() -> None:
    share = SMALL.shares[0]
    with pytest.raises(IntegrityError):
        parse_trailer(b"\0" + share, len(share), SMALL.ueb_hash, 0)


def test_integrity_errors_are_node_errors() -> None:
    with pytest.raises(NodeError):
        parse_trailer(b"", 0, bytes(32), 0)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=600),
    st.integers(min_value=0, max_value=1 << 40),
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=0, max_value=300),
)
def test_parse_trailer_on_random_bytes_raises_only_integrity_error(
    suffix, extra, ueb_hash, share_num
) -> None:
    with contextlib.suppress(IntegrityError):
        parse_trailer(suffix, len(suffix) + extra, ueb_hash, share_num)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=400),
    st.binary(min_size=UEB_SIZE, max_size=UEB_SIZE),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=1 << 20),
    st.integers(min_value=0, max_value=300),
)
def test_parse_trailer_on_random_ueb_behind_a_valid_footer_raises_only_integrity_error(
    prefix, ueb_bytes, footer_num, extra, share_num
) -> None:
    # The expected hash matches, so the UEB's own range checks and everything after them are exercised.
    suffix = prefix + ueb_bytes + pack_footer(footer_num)
    with contextlib.suppress(IntegrityError):
        parse_trailer(suffix, len(suffix) + extra, tagged_hash(TAG_UEB, ueb_bytes), share_num)


@settings(max_examples=200, deadline=None)
@given(uebs(), st.integers(min_value=0, max_value=255), st.data())
def test_parse_trailer_on_a_valid_ueb_with_random_hashes_raises_only_integrity_error(
    ueb: UEB, share_num: int, data
) -> None:
    ueb = replace(ueb, file_size=ueb.file_size % (50 * ueb.segment_size))
    layout = ShareLayout(ueb)
    share_num %= ueb.total
    body_len = min(layout.trailer_length - UEB_SIZE - FOOTER_SIZE, 2000)
    body = data.draw(st.binary(min_size=body_len, max_size=body_len))
    suffix = body + ueb.pack() + pack_footer(share_num)
    try:
        trailer, more = parse_trailer(suffix, layout.total_length, ueb.hash(), share_num)
    except IntegrityError:
        return
    # Accepted only if the random roots really hash to the UEB's (they never do) or more bytes are needed.
    assert more > 0
    assert isinstance(trailer, VerifiedTrailer)
