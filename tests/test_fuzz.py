"""Hostile bytes against every parser of untrusted input, where the per-format tests leave gaps.

What each parser promises (and what these tests hold it to): `parse_cap` raises only BadCapError;
`UEB.unpack` and `unpack_footer` only ValueError; `parse_trailer` and the mutable `parse_share` only
IntegrityError; `decode_bucket`, `decode_root` and `unseal_write_cap` only ValueError. None of them may
hang, or allocate in proportion to a length field instead of to the bytes it was given.

The per-format tests (test_caps.py, test_share_format.py, test_dirformat.py) already throw random bytes
at each parser, but random bytes almost never get past the first check: a directory root needs its
magic, a mutable share a signature by the cap's key, a trailer a UEB whose hash the cap names. The
tests here build inputs that pass those gates (valid magic, a real signature, a UEB with a matching
hash, a footer with the right magic) and fuzz what lies behind them, including length and count
fields at their extremes.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import time
import tracemalloc
from collections.abc import Callable

import pytest
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tahoefs.errors import BadCapError, IntegrityError
from tahoefs.formats.caps import DirVerifyCap, DirWriteCap, parse_cap
from tahoefs.formats.codec import block_hash
from tahoefs.formats.dirformat import (
    INLINE_FILE_MAX,
    KIND_DIR,
    KIND_FILE,
    KIND_NAMES,
    MAX_TARGET,
    MAX_XATTR_VALUE,
    MAX_XATTRS_PER_ENTRY,
    ROOT_MAGIC,
    BucketRef,
    Entry,
    check_name,
    decode_bucket,
    decode_root,
    decode_root_own,
    encode_bucket,
    encode_root,
    seal_write_cap,
    unseal_write_cap,
)
from tahoefs.formats.hashing import (
    TAG_MUTABLE_BLOCKS,
    TAG_MUTABLE_SIGNED,
    TAG_MUTABLE_VK,
    b32encode,
    tagged_hash,
)
from tahoefs.formats.mutable import (
    HEADER_FORMAT,
    HEADER_MAGIC,
    MAX_VERSION_BYTES,
    MutableShare,
    encode_version,
    parse_share,
)
from tahoefs.formats.share import (
    FOOTER_MAGIC,
    UEB,
    UEB_FORMAT,
    UEB_MAGIC,
    UEB_SIZE,
    ShareLayout,
    pack_footer,
    parse_trailer,
    unpack_footer,
)
from tahoefs.limits import MAX_TRAILER_BYTES

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
GiB = 1 << 30


def small_footprint(fn: Callable[[], object], limit: int = 1 << 20, seconds: float = 5.0) -> None:
    """Run `fn` (which may raise); fail if it allocated more than `limit` bytes at its peak or took
    longer than `seconds`."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        with contextlib.suppress(Exception):
            fn()
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes"
    assert time.monotonic() - started < seconds


# --- capability strings -------------------------------------------------------------------------------


def _parse_or_badcap(text: str) -> None:
    try:
        cap = parse_cap(text)
    except BadCapError as exc:
        assert str(exc)
    else:
        assert parse_cap(str(cap)) == cap


B32_32, B32_16 = b32encode(bytes(range(32))), b32encode(bytes(range(16)))
_dir_field = st.one_of(
    st.sampled_from(["", B32_32, B32_16, B32_32.upper(), B32_32[:-1], B32_32 + "a", B32_32 + "=", "0", "v1"]),
    st.binary(max_size=40).map(b32encode),
    st.text(max_size=60),
)


@FUZZ
@given(
    st.sampled_from(["dir", "dir-ro", "dir-verify", "DIR", "dir-rw", "dir_ro"]),
    st.sampled_from(["v1", "v0", "", "V1", "v1 "]),
    st.lists(_dir_field, max_size=4),
)
def test_directory_cap_garbage_raises_only_badcaperror(kind: str, version: str, fields: list[str]) -> None:
    # test_caps.py fuzzes lit/file/file-verify field by field; these are the directory kinds.
    _parse_or_badcap(":".join(["tahoefs", kind, version, *fields]))


@FUZZ
@given(
    st.text(
        alphabet=st.characters(categories=["Cs", "Zs", "Zl", "Nd", "No", "Lu", "Ll", "Cc", "Po"]),
        max_size=200,
    )
)
def test_any_code_point_including_lone_surrogates_raises_only_badcaperror(text: str) -> None:
    _parse_or_badcap(text)
    _parse_or_badcap("tahoefs:file:v1:" + text)
    _parse_or_badcap(f"tahoefs:dir-ro:v1:{B32_32}:{text}")


@pytest.mark.parametrize(
    "text",
    [
        "tahoefs:lit:v1:" + "a" * (4 << 20),  # a literal far over LITERAL_CAP_MAX
        f"tahoefs:file:v1:{B32_32}:{B32_32}:3:10:" + "9" * (4 << 20),  # a size of four million digits
        f"tahoefs:file:v1:{B32_32}:{B32_32}:" + "1" * 5000 + ":10:5",  # over int()'s 4300-digit limit
        "tahoefs:file:v1" + ":" * (1 << 20),
        "tahoefs:dir:v1:" + "7" * (4 << 20),
        " " * (4 << 20) + "tahoefs:dir:v1:",
    ],
    ids=["long-literal", "long-size", "over-int-limit", "many-colons", "long-seed", "long-whitespace"],
)
def test_huge_cap_strings_fail_fast(text: str) -> None:
    started = time.monotonic()
    with pytest.raises(BadCapError):
        parse_cap(text)
    assert time.monotonic() - started < 2


# --- immutable share trailer: UEB, footer, parse_trailer ------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_ueb_unpack_on_arbitrary_bytes_raises_only_valueerror(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        UEB.unpack(data)


@FUZZ
@given(
    st.integers(0, 255),
    st.integers(0, U16),
    st.integers(0, U16),
    st.integers(0, U32),
    st.integers(0, U64),
    st.integers(0, U64),
    st.integers(0, U32),
    st.binary(min_size=32, max_size=32),
)
def test_ueb_unpack_on_any_field_values_raises_valueerror_or_returns_a_consistent_ueb(
    version, k, n, seg, size, nsegs, leaves, roots
) -> None:
    # Behind a valid magic, every field at any value its width allows.
    data = struct.pack(UEB_FORMAT, UEB_MAGIC, version, k, n, seg, size, nsegs, leaves, roots)
    try:
        ueb = UEB.unpack(data)
    except ValueError:
        return
    assert ueb.pack() == data
    assert 1 <= ueb.needed <= ueb.total <= 256 and ueb.segment_size % 16 == 0


@FUZZ
@given(st.binary(max_size=40), st.integers(0, U16), st.integers(0, U16), st.integers(0, U32))
def test_unpack_footer_raises_only_valueerror(data: bytes, num: int, reserved: int, ueb_len: int) -> None:
    for footer in (data, FOOTER_MAGIC + struct.pack(">HHI", num, reserved, ueb_len), FOOTER_MAGIC + data):
        try:
            got = unpack_footer(footer)
        except ValueError:
            continue
        assert got == (num, UEB_SIZE) and footer == pack_footer(num)


@st.composite
def extreme_uebs(draw: st.DrawFn) -> UEB:
    total = draw(st.integers(1, 256))
    return UEB(
        draw(st.integers(1, total)),
        total,
        draw(st.sampled_from([16, 32, 4096, 1 << 20, 64 << 20])),
        draw(st.integers(0, U64) | st.sampled_from([U64, 1 << 62, 4 * GiB, 4 * GiB + 1, 0, 1])),
        draw(st.sampled_from([1, 2, 4096, 1 << 20])),
        draw(st.binary(min_size=32, max_size=32)),
    )


@FUZZ
@given(extreme_uebs(), st.integers(0, 299), st.binary(max_size=3000), st.data())
def test_a_hostile_ueb_the_cap_vouches_for_never_makes_the_reader_allocate_what_it_claims(
    ueb: UEB, share_num: int, body: bytes, data: st.DataObject
) -> None:
    """The cap's creator chooses the UEB, so its hash matches: a file of up to 2^64 - 1 bytes in 16-byte
    segments, one leaf per hash chunk, 256 shares. parse_trailer must still only compute offsets: it
    raises IntegrityError, or asks for a suffix that the caller refuses when over MAX_TRAILER_BYTES."""
    suffix = body + ueb.pack() + pack_footer(share_num)
    implied = ShareLayout(ueb).total_length
    share_length = data.draw(
        st.sampled_from([implied, len(suffix), implied + 1, max(len(suffix), implied - 1)])
        | st.integers(len(suffix), U64)
    )
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(parse_trailer(suffix, share_length, ueb.hash(), share_num))
        except IntegrityError as exc:
            outcome.append(exc)

    small_footprint(run, limit=256 * 1024)
    assert len(outcome) == 1, "parse_trailer raised something other than IntegrityError"
    if isinstance(outcome[0], tuple):
        trailer, more = outcome[0]
        layout = ShareLayout(ueb)
        assert share_length == layout.total_length and share_num < ueb.total
        # Either the whole trailer was in the suffix and checked, or it asks for exactly what remains.
        assert more == 0 or more == share_length - layout.chunk_roots_offset
        if more == 0:
            assert len(trailer.chunk_roots) == layout.num_chunks


@pytest.mark.parametrize("file_size", [4 * GiB, U64, 1 << 62])
def test_a_ueb_claiming_a_huge_file_costs_an_answer_not_memory(file_size: int) -> None:
    """A UEB claiming 4 GiB (or 2^64 - 1 bytes) with one leaf per chunk: the reader is told how many
    trailer bytes it would need, and that number is over MAX_TRAILER_BYTES, which the downloader
    refuses (download.py); nothing near that size is allocated."""
    ueb = UEB(3, 10, 16, file_size, 1, bytes(32))
    layout = ShareLayout(ueb)
    suffix = bytes(1000) + ueb.pack() + pack_footer(0)
    trailer, more = parse_trailer(suffix, layout.total_length, ueb.hash(), 0)
    assert more > MAX_TRAILER_BYTES and trailer.chunk_roots == []
    small_footprint(lambda: parse_trailer(suffix, layout.total_length, ueb.hash(), 0), limit=64 * 1024)


# --- mutable shares: behind a valid signature --------------------------------------------------------


CAP = DirWriteCap(bytes(range(32)))
READ = CAP.read_cap()
SIGNER = eddsa.new(ECC.construct(curve="Ed25519", seed=CAP.seed), "rfc8032")
VK = CAP.verifying_key


def signed_share(
    fmt: int, seqnum: int, k: int, n: int, length: int, hashes: bytes, root: bytes | None, tail: bytes
) -> bytes:
    """A share whose header is signed by the cap's own key, so every check after the signature is
    reachable. `root=None` makes the root match `hashes`."""
    root = tagged_hash(TAG_MUTABLE_BLOCKS, hashes) if root is None else root
    header = struct.pack(HEADER_FORMAT, HEADER_MAGIC, fmt, seqnum, bytes(16), k, n, length, root)
    signature = SIGNER.sign(tagged_hash(TAG_MUTABLE_SIGNED, READ.storage_index, header))
    return header + VK + signature + hashes + tail


def _check_parsed(share: MutableShare, data: bytes, expected_num: int) -> None:
    assert share.num == expected_num < share.total
    assert 1 <= share.needed <= share.total <= 256 and share.data_length <= MAX_VERSION_BYTES
    assert len(share.block) == max(1, -(-share.data_length // share.needed))
    assert data.endswith(share.block)


def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` nine times in ten, else `odd`: fields that are mostly right, so that the checks behind
    them are reached, and sometimes anything at all."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: usual if ok else odd)


@FUZZ
@given(st.data())
def test_parse_share_behind_a_valid_signature_raises_only_integrity_error(data: st.DataObject) -> None:
    """Signed by the cap's own key, with every field mostly consistent and sometimes anything: each
    check after the signature (length, blocks root, share number, block hash) is reached."""
    draw = data.draw
    fmt = draw(mostly(st.just(1), st.integers(0, 255)))
    seqnum = draw(st.integers(0, U64))
    n = draw(mostly(st.integers(1, 12), st.integers(0, U16)))
    k = draw(mostly(st.integers(1, max(1, min(n, 12))), st.integers(0, U16)))
    length = draw(
        mostly(st.integers(0, 200), st.integers(0, U32) | st.sampled_from([MAX_VERSION_BYTES + 1, U32]))
    )
    hash_count = draw(mostly(st.just(min(n, 300)), st.integers(0, 20)))
    hashes = draw(st.binary(min_size=32 * hash_count, max_size=32 * hash_count))
    num = draw(mostly(st.integers(0, max(0, min(n, 300) - 1)), st.integers(0, U16)))
    size = max(1, -(-length // k)) if k >= 1 and length <= 200 else 1
    block = draw(mostly(st.binary(min_size=size, max_size=size), st.binary(max_size=300)))
    if draw(mostly(st.just(True), st.just(False))) and num < hash_count:
        hashes = hashes[: 32 * num] + block_hash(block) + hashes[32 * (num + 1) :]
    root = draw(mostly(st.none(), st.binary(min_size=32, max_size=32)))
    share = signed_share(fmt, seqnum, k, n, length, hashes, root, struct.pack(">H", num) + block)
    expected = draw(mostly(st.just(num), st.integers(0, 300)))
    try:
        parsed = parse_share(share, READ.storage_index, READ.vk_hash, expected)
    except IntegrityError as exc:
        event(exc.reason.split(",")[0])  # --hypothesis-show-statistics: which check caught it
        return
    event("accepted")
    _check_parsed(parsed, share, expected)


@pytest.mark.parametrize(
    ("k", "n", "length"),
    [(1, 1, U32), (1, 256, MAX_VERSION_BYTES + 1), (U16, U16, 100), (0, 10, 100), (3, 2, 100)],
)
def test_a_signed_header_claiming_4_gib_or_impossible_shares_is_refused_without_allocating(
    k: int, n: int, length: int
) -> None:
    share = signed_share(1, 1, k, n, length, bytes(32), None, b"\0\0" + b"x" * 10)
    with pytest.raises(IntegrityError, match="impossible parameters"):
        parse_share(share, READ.storage_index, READ.vk_hash, 0)
    small_footprint(lambda: parse_share(share, READ.storage_index, READ.vk_hash, 0), limit=64 * 1024)


SHARES = encode_version(CAP, 5, b"a directory version" * 20, 3, 10)


@FUZZ
@given(st.integers(0, 9), st.data())
def test_a_cut_or_extended_mutable_share_raises_only_integrity_error(num: int, data: st.DataObject) -> None:
    share = SHARES[num]
    cut = data.draw(st.integers(0, len(share) - 1))
    with pytest.raises(IntegrityError):
        parse_share(share[:cut], READ.storage_index, READ.vk_hash, num)
    extra = data.draw(st.binary(min_size=1, max_size=100))
    with pytest.raises(IntegrityError):
        parse_share(share + extra, READ.storage_index, READ.vk_hash, num)


def test_a_verifying_key_that_is_no_curve_point_is_a_bad_signature_not_a_crash() -> None:
    """A cap may name (by hash) 32 bytes that are not an Ed25519 point at all: the key import fails
    and that is reported as a bad signature."""
    share = bytearray(SHARES[0])
    not_a_point = b"\xff" * 32
    share[73:105] = not_a_point
    vk_hash = tagged_hash(TAG_MUTABLE_VK, not_a_point)
    with pytest.raises(IntegrityError, match="bad signature"):
        parse_share(bytes(share), READ.storage_index, vk_hash, 0)


def test_a_version_signed_for_another_storage_index_is_refused() -> None:
    other = DirVerifyCap(bytes(16), READ.vk_hash)
    with pytest.raises(IntegrityError, match="bad signature"):
        parse_share(SHARES[0], other.storage_index, other.vk_hash, 0)


# --- directory roots, buckets, entries ----------------------------------------------------------------


def _check_root(refs: list[BucketRef]) -> None:
    assert refs and refs[0].lo == 0
    assert all(a.lo < b.lo for a, b in itertools.pairwise(refs))
    for ref in refs:
        if ref.inline is None:
            assert ref.cap.isascii() and len(ref.cap) <= 1024


@FUZZ
@given(st.data())
def test_a_root_with_own_attributes_flipped_or_cut_raises_only_valueerror(data: st.DataObject) -> None:
    """Version 2 roots (the tree root's own mode, owner, times, xattrs after the references): any byte
    flipped or any cut gives a clean ValueError or a root within the limits."""
    xattrs = data.draw(st.dictionaries(st.binary(min_size=1, max_size=8), st.binary(max_size=40), max_size=3))
    own = Entry(b"", KIND_DIR, 0o700, 1, 2, 0, 3, 4, xattrs=xattrs)
    blob = bytearray(encode_root([BucketRef(0, 0, inline=encode_bucket([]))], own))
    if data.draw(st.booleans()):
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    try:
        _buckets, got = decode_root_own(bytes(blob))
    except ValueError as exc:
        event(str(exc))
        return
    assert got is None or len(got.xattrs) <= 128


@FUZZ
@given(mostly(st.just(1), st.integers(0, 255)), st.data())
def test_decode_root_behind_a_valid_magic_raises_only_valueerror(version: int, data: st.DataObject) -> None:
    """Random bytes never get past the 6-byte magic; these do, with bucket references whose fields are
    mostly consistent and sometimes anything (a 4 GiB length, an unknown storage byte, ranges out of
    order, a non-ASCII cap)."""
    draw = data.draw
    refs = []
    lo = 0
    for _ in range(draw(st.integers(1, 4))):
        body = draw(
            st.sampled_from([b"\0\0\0\0", b"tahoefs:lit:v1:", "tahoefs:file:v1:é".encode()])
            | st.binary(max_size=60)
        )
        storage = draw(mostly(st.sampled_from([0, 1]), st.integers(0, 255)))
        length = draw(mostly(st.just(len(body)), st.sampled_from([U32, 1025, len(body) + 1])))
        refs.append(struct.pack(">QIBI", lo, draw(st.integers(0, U32)), storage, length) + body)
        lo = draw(mostly(st.integers(lo + 1, U64), st.integers(0, U64))) if lo < U64 else lo
    count = draw(mostly(st.just(len(refs)), st.integers(0, U32)))
    blob = ROOT_MAGIC + struct.pack(">BI", version, count) + b"".join(refs)
    blob += draw(mostly(st.just(b""), st.binary(min_size=1, max_size=10)))
    try:
        got = decode_root(blob)
    except ValueError as exc:
        event(str(exc))
        return
    event("accepted")
    _check_root(got)


@st.composite
def bucket_refs(draw: st.DrawFn) -> list[BucketRef]:
    los = sorted(set(draw(st.lists(st.integers(1, U64), max_size=5))))
    refs = []
    for lo in [0, *los]:
        if draw(st.booleans()):
            refs.append(BucketRef(lo, draw(st.integers(0, U32)), inline=draw(st.binary(max_size=80))))
        else:
            refs.append(
                BucketRef(lo, draw(st.integers(0, U32)), cap=draw(st.text("abcdefgh:v1", max_size=80)))
            )
    return refs


@FUZZ
@given(bucket_refs(), st.data())
def test_a_flipped_cut_or_extended_root_raises_only_valueerror(
    refs: list[BucketRef], data: st.DataObject
) -> None:
    blob = encode_root(refs)
    assert decode_root(blob) == refs
    flipped = bytearray(blob)
    pos = data.draw(st.integers(0, len(blob) - 1))
    flipped[pos] ^= data.draw(st.integers(1, 255))
    for mutant in (bytes(flipped), blob[: data.draw(st.integers(0, len(blob) - 1))], blob + b"\0"):
        try:
            got = decode_root(mutant)
        except ValueError:
            continue
        _check_root(got)
    with pytest.raises(ValueError):
        decode_root(blob + data.draw(st.binary(min_size=1, max_size=20)))


def _check_entry(e: Entry) -> None:
    check_name(e.name)
    assert e.kind in KIND_NAMES and e.cap.isascii() and len(e.cap) <= 1024
    assert len(e.sealed_write_cap) <= 1024 and len(e.inline) <= INLINE_FILE_MAX
    assert len(e.target) <= MAX_TARGET and len(e.xattrs) <= MAX_XATTRS_PER_ENTRY
    assert all(len(k) <= 255 and len(v) <= MAX_XATTR_VALUE for k, v in e.xattrs.items())


_valid_names = (
    st.binary(min_size=1, max_size=12)
    .map(lambda n: n.replace(b"/", b"_").replace(b"\0", b"_"))
    .filter(lambda n: n not in (b".", b".."))
)


def _entry_bytes(draw: st.DrawFn) -> bytes:
    """One entry's encoding, each field mostly within its limits and sometimes anything its width
    allows: lengths up to 4 GiB, 65535 xattrs, names with '/' or NUL, unknown kinds, non-ASCII caps."""

    def blob(fmt: str, usual: int, odd: st.SearchStrategy, ascii_only: bool = False) -> bytes:
        n = draw(mostly(st.integers(0, usual), odd))
        body = draw(
            mostly(
                st.text("abcdefghijklmnopqrstuvwxyz234567:", min_size=min(n, 40), max_size=min(n, 40)).map(
                    str.encode
                )
                if ascii_only
                else st.binary(min_size=min(n, 40), max_size=min(n, 40)),
                st.binary(min_size=min(n, 40), max_size=min(n, 40)),
            )
        )
        return struct.pack(fmt, n) + body

    name = draw(mostly(_valid_names, st.sampled_from([b"", b".", b"..", b"a/b", b"\0", b"x" * 256])))
    nl = draw(mostly(st.just(len(name)), st.integers(0, U16)))
    kind = draw(mostly(st.sampled_from(sorted(KIND_NAMES)), st.integers(0, 255)))
    fixed = struct.pack(">BIIIQqq", kind, 0o644, 0, 0, draw(st.integers(0, U64)), 0, 0)
    out = struct.pack(">H", nl) + name + fixed
    out += blob(">H", 40, st.sampled_from([1024, 1025, U16]), ascii_only=True)  # cap
    out += blob(">H", 40, st.sampled_from([1024, 1025, U16]))  # sealed write cap
    out += blob(">I", 40, st.sampled_from([INLINE_FILE_MAX, INLINE_FILE_MAX + 1, U32]))  # inline
    out += blob(">H", 40, st.sampled_from([MAX_TARGET, MAX_TARGET + 1, U16]))  # target
    xattrs = draw(mostly(st.integers(0, 3), st.sampled_from([MAX_XATTRS_PER_ENTRY + 1, U16])))
    out += struct.pack(">H", xattrs)
    for _ in range(min(xattrs, 3)):
        out += blob(">B", 40, st.integers(0, 255)) + blob(
            ">I", 40, st.sampled_from([U32, MAX_XATTR_VALUE + 1])
        )
    return out


@FUZZ
@given(st.data())
def test_decode_bucket_with_plausible_counts_and_any_length_fields_raises_only_valueerror(
    data: st.DataObject,
) -> None:
    # Random bytes almost always fail the entry-count check; here the count is small and each entry's
    # length fields take any value, including 4 GiB inline content and 65535 xattrs.
    entries = [_entry_bytes(data.draw) for _ in range(data.draw(st.integers(0, 3)))]
    count = data.draw(mostly(st.just(len(entries)), st.integers(0, 5)))
    blob = (
        struct.pack(">I", count) + b"".join(entries) + data.draw(mostly(st.just(b""), st.binary(max_size=10)))
    )

    try:
        decoded = decode_bucket(blob)
    except ValueError as exc:
        event(str(exc)[:30])
    else:
        event(f"accepted {len(decoded)} entries")
        for e in decoded:
            _check_entry(e)
    small_footprint(lambda: decode_bucket(blob), limit=64 * 1024 + 4 * len(blob))


def test_length_fields_claiming_4_gib_are_refused_before_any_allocation() -> None:
    good = Entry(b"n", KIND_FILE, inline=b"x").encode()
    # The inline length field sits after name, the fixed part, an empty cap and an empty sealed cap.
    at = 2 + 1 + 37 + 2 + 2
    assert good[at : at + 4] == struct.pack(">I", 1)
    huge_inline = good[:at] + struct.pack(">I", U32) + good[at + 4 :]
    huge_count = struct.pack(">I", U32) + good
    huge_root_count = ROOT_MAGIC + struct.pack(">BI", 1, U32) + bytes(17)
    huge_ref = ROOT_MAGIC + struct.pack(">BI", 1, 1) + struct.pack(">QIBI", 0, U32, 0, U32)
    for decode, blob in [
        (decode_bucket, struct.pack(">I", 1) + huge_inline),
        (decode_bucket, huge_count),
        (decode_root, huge_root_count),
        (decode_root, huge_ref),
    ]:
        with pytest.raises(ValueError):
            decode(blob)
        small_footprint(lambda decode=decode, blob=blob: decode(blob), limit=16 * 1024)


@FUZZ
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=1200))
def test_unsealing_arbitrary_bytes_raises_only_valueerror(seed: bytes, sealed: bytes) -> None:
    try:
        text = unseal_write_cap(seed, sealed)
    except ValueError:
        return
    assert text.isascii()
    with contextlib.suppress(BadCapError):
        parse_cap(text)


def test_a_sealed_cap_opened_with_another_parent_seed_does_not_yield_the_child() -> None:
    child = str(DirWriteCap(bytes(range(32, 64))))
    sealed = seal_write_cap(bytes(32), child)
    try:
        opened = unseal_write_cap(b"\1" * 32, sealed)
    except ValueError:
        return
    assert opened != child


@pytest.mark.parametrize("kind", [KIND_FILE, KIND_DIR])
def test_decoding_a_bucket_of_many_maximal_entries_is_linear(kind: int) -> None:
    """A 1 MiB bucket of entries at their limits decodes in well under a second (no quadratic
    copying of the input)."""
    entry = Entry(
        b"x" * 200, kind, cap="c" * 1024, sealed_write_cap=b"s" * 1024, inline=b"i" * INLINE_FILE_MAX
    )
    entries = [Entry(b"%06d" % i + entry.name, kind, cap=entry.cap, inline=entry.inline) for i in range(200)]
    blob = encode_bucket(entries)
    assert len(blob) > 1_000_000
    started = time.monotonic()
    assert len(decode_bucket(blob)) == 200
    assert time.monotonic() - started < 1
