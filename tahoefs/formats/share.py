"""The immutable share layout, its trailer, and the verification of a trailer against a cap.

A share is written strictly front to back, so an upload can start before the file's size is known:

    BLOCKS        block 0 .. block S-1 of this share (segment i's block j lives in share j)
    LEAVES        S x 32 B     tagged hash of each block
    CHUNK_ROOTS   C x 32 B     chunk c = tagged hash of leaves [c*L, (c+1)*L), L = hash_chunk_leaves
    SHARE_ROOTS   n x 32 B     root of every share: tagged hash of that share's chunk roots
    UEB           UEB_SIZE B   the file's parameters (below); the cap holds its tagged hash
    FOOTER        FOOTER_SIZE  magic, share number, UEB length

The UEB pins the share roots; each share root pins its chunk roots; each chunk root pins its leaves; each
leaf pins one block. A reader holding the cap therefore verifies any single block after fetching the
trailer once (one suffix request; for files over ~2 GiB also the 128 KiB leaf chunk of that block, once per
4096 segments) and the block itself (one ranged request). Byte-level detail is in
docs/formats.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tahoefs.errors import IntegrityError
from tahoefs.formats.hashing import (
    HASH_SIZE,
    TAG_HASH_CHUNK,
    TAG_SHARE_ROOT,
    TAG_SHARE_ROOTS,
    TAG_UEB,
    tagged_hash,
)

UEB_FORMAT = (
    ">4sBHHIQQI32s"  # magic, version, k, n, segment_size, file_size, num_segments, chunk_leaves, roots
)
UEB_MAGIC = b"TFUE"
UEB_SIZE = struct.calcsize(UEB_FORMAT)
FOOTER_FORMAT = ">8sHHI"  # magic, share number, reserved, UEB length
FOOTER_MAGIC = b"TFSHARE1"
FOOTER_SIZE = struct.calcsize(FOOTER_FORMAT)
MAX_SEGMENT_SIZE = 64 * 1024 * 1024


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class UEB:
    """The parameters every share of a file agrees on ("URI extension block", after Tahoe-LAFS)."""

    needed: int
    total: int
    segment_size: int
    file_size: int
    hash_chunk_leaves: int
    share_roots_hash: bytes

    @property
    def num_segments(self) -> int:
        return ceil_div(self.file_size, self.segment_size)

    def pack(self) -> bytes:
        return struct.pack(
            UEB_FORMAT,
            UEB_MAGIC,
            1,
            self.needed,
            self.total,
            self.segment_size,
            self.file_size,
            self.num_segments,
            self.hash_chunk_leaves,
            self.share_roots_hash,
        )

    def hash(self) -> bytes:
        return tagged_hash(TAG_UEB, self.pack())

    @classmethod
    def unpack(cls, data: bytes) -> UEB:
        """Parse and sanity-check a UEB. Raises ValueError for anything out of range."""
        if len(data) != UEB_SIZE:
            raise ValueError("UEB has the wrong length")
        magic, version, k, n, seg, size, nsegs, leaves, roots = struct.unpack(UEB_FORMAT, data)
        if magic != UEB_MAGIC or version != 1:
            raise ValueError("UEB has a bad magic or version")
        if not (1 <= k <= n <= 256):
            raise ValueError("UEB has impossible k/n")
        if not (16 <= seg <= MAX_SEGMENT_SIZE) or seg % 16:
            raise ValueError("UEB has an impossible segment size")
        if not 1 <= leaves <= 1 << 20:
            raise ValueError("UEB has an impossible hash chunk size")
        ueb = cls(k, n, seg, size, leaves, roots)
        if ueb.num_segments != nsegs:
            raise ValueError("UEB segment count disagrees with its size")
        return ueb


@dataclass(frozen=True)
class ShareLayout:
    """Where everything lives in a share of a file with the given UEB (all offsets in bytes)."""

    ueb: UEB

    @property
    def num_segments(self) -> int:
        return self.ueb.num_segments

    @property
    def full_block_size(self) -> int:
        return ceil_div(self.ueb.segment_size, self.ueb.needed)

    def segment_length(self, segment: int) -> int:
        """Plaintext bytes in segment `segment` (the last one may be short)."""
        start = segment * self.ueb.segment_size
        return min(self.ueb.segment_size, self.ueb.file_size - start)

    def block_size(self, segment: int) -> int:
        return ceil_div(self.segment_length(segment), self.ueb.needed)

    def block_offset(self, segment: int) -> int:
        return segment * self.full_block_size

    @property
    def blocks_length(self) -> int:
        if self.num_segments == 0:
            return 0
        last = self.num_segments - 1
        return self.block_offset(last) + self.block_size(last)

    @property
    def num_chunks(self) -> int:
        return ceil_div(self.num_segments, self.ueb.hash_chunk_leaves)

    @property
    def leaves_offset(self) -> int:
        return self.blocks_length

    @property
    def chunk_roots_offset(self) -> int:
        return self.leaves_offset + HASH_SIZE * self.num_segments

    @property
    def share_roots_offset(self) -> int:
        return self.chunk_roots_offset + HASH_SIZE * self.num_chunks

    @property
    def ueb_offset(self) -> int:
        return self.share_roots_offset + HASH_SIZE * self.ueb.total

    @property
    def footer_offset(self) -> int:
        return self.ueb_offset + UEB_SIZE

    @property
    def total_length(self) -> int:
        return self.footer_offset + FOOTER_SIZE

    @property
    def trailer_length(self) -> int:
        return self.total_length - self.leaves_offset

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """(offset, length) of the leaves of hash chunk `chunk`."""
        per = self.ueb.hash_chunk_leaves
        first = chunk * per
        count = min(per, self.num_segments - first)
        return self.leaves_offset + HASH_SIZE * first, HASH_SIZE * count


def pack_footer(share_num: int) -> bytes:
    return struct.pack(FOOTER_FORMAT, FOOTER_MAGIC, share_num, 0, UEB_SIZE)


def unpack_footer(data: bytes) -> tuple[int, int]:
    """(share number, UEB length). Raises ValueError for a bad footer."""
    if len(data) != FOOTER_SIZE:
        raise ValueError("footer has the wrong length")
    magic, share_num, _reserved, ueb_len = struct.unpack(FOOTER_FORMAT, data)
    if magic != FOOTER_MAGIC:
        raise ValueError("not a tahoefs share (bad footer magic)")
    if _reserved != 0:
        raise ValueError("footer reserved field is not zero")
    if ueb_len != UEB_SIZE:
        raise ValueError("unsupported UEB length")
    return share_num, ueb_len


def chunk_root(leaves: bytes) -> bytes:
    return tagged_hash(TAG_HASH_CHUNK, leaves)


def share_root(chunk_roots: bytes) -> bytes:
    return tagged_hash(TAG_SHARE_ROOT, chunk_roots)


def share_roots_hash(roots: list[bytes]) -> bytes:
    return tagged_hash(TAG_SHARE_ROOTS, *roots)


class ChunkedLeafHasher:
    """Folds a share's block hashes, in order, into chunk roots and finally the share root.
    Holds one running hasher and the chunk roots (32 B per 4096 blocks); leaves themselves are the
    caller's to keep."""

    def __init__(self, hash_chunk_leaves: int) -> None:
        self._per_chunk = hash_chunk_leaves
        self._in_chunk = 0
        self._current = bytearray()
        self.chunk_roots = bytearray()

    def add(self, leaf: bytes) -> None:
        self._current += leaf
        self._in_chunk += 1
        if self._in_chunk == self._per_chunk:
            self._close_chunk()

    def _close_chunk(self) -> None:
        self.chunk_roots += chunk_root(bytes(self._current))
        self._current.clear()
        self._in_chunk = 0

    def finish(self) -> bytes:
        """Close the last chunk and return the share root. Call once."""
        if self._in_chunk:
            self._close_chunk()
        return share_root(bytes(self.chunk_roots))


def build_trailer_tail(chunk_roots: bytes, roots: list[bytes], ueb: UEB, share_num: int) -> bytes:
    """Everything after LEAVES: CHUNK_ROOTS || SHARE_ROOTS || UEB || FOOTER."""
    return chunk_roots + b"".join(roots) + ueb.pack() + pack_footer(share_num)


@dataclass
class VerifiedTrailer:
    """A share's trailer after every hash in it was checked against the cap's UEB hash."""

    share_num: int
    ueb: UEB
    layout: ShareLayout
    chunk_roots: list[bytes]
    leaves: dict[int, bytes]  # chunk index -> verified leaves of that chunk
    share_roots: list[bytes] = field(default_factory=list)  # root of every share (what repair rebuilds to)


def parse_trailer(
    suffix: bytes, share_length: int, expected_ueb_hash: bytes, share_num: int
) -> tuple[VerifiedTrailer, int]:
    """Verify the last `len(suffix)` bytes of a share of `share_length` bytes.

    Returns the verified trailer and, if the suffix was too short to hold the whole trailer up to the
    chunk roots, the number of suffix bytes needed instead (else 0). Raises IntegrityError when anything
    disagrees with `expected_ueb_hash` or the layout."""
    node = "share"
    if len(suffix) < FOOTER_SIZE + UEB_SIZE or len(suffix) > share_length:
        raise IntegrityError(node, "share too short to hold a trailer")
    try:
        footer_num, ueb_len = unpack_footer(suffix[-FOOTER_SIZE:])
        ueb_bytes = suffix[-FOOTER_SIZE - ueb_len : -FOOTER_SIZE]
        if tagged_hash(TAG_UEB, ueb_bytes) != expected_ueb_hash:
            raise IntegrityError(node, "UEB does not match the capability")
        ueb = UEB.unpack(ueb_bytes)
    except ValueError as exc:
        raise IntegrityError(node, f"bad trailer: {exc}") from None
    if footer_num != share_num or share_num >= ueb.total:
        raise IntegrityError(node, f"footer says share {footer_num}, expected {share_num}")
    layout = ShareLayout(ueb)
    if layout.total_length != share_length:
        raise IntegrityError(node, f"share is {share_length} bytes, the UEB implies {layout.total_length}")
    suffix_start = share_length - len(suffix)
    if suffix_start > layout.chunk_roots_offset:
        return VerifiedTrailer(share_num, ueb, layout, [], {}), share_length - layout.chunk_roots_offset

    def window(offset: int, length: int) -> bytes:
        return suffix[offset - suffix_start : offset - suffix_start + length]

    roots_blob = window(layout.share_roots_offset, HASH_SIZE * ueb.total)
    roots = [roots_blob[i : i + HASH_SIZE] for i in range(0, len(roots_blob), HASH_SIZE)]
    if share_roots_hash(roots) != ueb.share_roots_hash:
        raise IntegrityError(node, "share roots do not match the UEB")
    chunk_blob = window(layout.chunk_roots_offset, HASH_SIZE * layout.num_chunks)
    if share_root(chunk_blob) != roots[share_num]:
        raise IntegrityError(node, "chunk roots do not match the share root")
    chunk_roots = [chunk_blob[i : i + HASH_SIZE] for i in range(0, len(chunk_blob), HASH_SIZE)]
    trailer = VerifiedTrailer(share_num, ueb, layout, chunk_roots, {}, roots)
    for chunk in range(layout.num_chunks):
        offset, length = layout.chunk_range(chunk)
        if offset >= suffix_start:
            trailer.leaves[chunk] = verify_leaves(trailer, chunk, window(offset, length))
    return trailer, 0


def verify_leaves(trailer: VerifiedTrailer, chunk: int, leaves: bytes) -> bytes:
    """Check the leaves of one hash chunk against the verified chunk roots; return them."""
    _offset, length = trailer.layout.chunk_range(chunk)
    if len(leaves) != length or chunk_root(leaves) != trailer.chunk_roots[chunk]:
        raise IntegrityError("share", f"block hashes of chunk {chunk} do not match their root")
    return leaves
