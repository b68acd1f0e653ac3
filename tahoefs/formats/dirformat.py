"""The plaintext of a directory: a root that lists buckets, and buckets that hold entries.

A directory's entries are spread over buckets by the 64-bit hash of their name; bucket i holds the names
whose hash falls in [lo_i, lo_{i+1}). A small bucket lives inside the root; a large one is an immutable
file whose read cap the root holds, so adding one entry to a huge directory rewrites one bucket and the
small root, not every entry. Byte layouts (all big-endian) are in docs/formats.md.

    ROOT    "TFDIR1" u8 version (1, or 2 with OWN), u32 bucket count, then per bucket:
            u64 lo, u32 entry count, u8 storage (0 inline, 1 cap), u32 length, bytes (bucket or cap);
            version 2 only: u32 length + OWN
    OWN     the directory's own attributes, for a directory no parent entry describes (a tree's root):
            u32 mode, u32 uid, u32 gid, q mtime ns, q ctime ns, u16 xattr count, xattrs as in ENTRY
    BUCKET  u32 entry count, then entries sorted by (name hash, name)
    ENTRY   u16 name length, name, u8 kind, u32 mode, u32 uid, u32 gid, u64 size,
            q mtime ns, q ctime ns, u16 + cap (file read cap / child dir read cap, ASCII),
            u16 + sealed child write cap, u32 + inline data, u16 + symlink target,
            u16 xattr count, then per xattr: u8 + name, u32 + value

Every parser here raises only ValueError on malformed input and never allocates more than its input.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass, field

from Crypto.Cipher import AES

from tahoefs.formats.hashing import TAG_DIR_CHILD_WRITE_KEY, TAG_DIR_NAME, tagged_hash

KIND_FILE, KIND_DIR, KIND_SYMLINK = 1, 2, 3
KIND_NAMES = {KIND_FILE: "file", KIND_DIR: "dir", KIND_SYMLINK: "symlink"}
MAX_NAME = 255
MAX_TARGET = 4096
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 * 1024
MAX_XATTRS_PER_ENTRY = 128
INLINE_FILE_MAX = 4096  # files up to this size live inside their directory entry
# Writers keep a rewritten bucket inside the root (no file of its own) while the root stays within this
# many bytes; beyond, new buckets are immutable files the root names by cap (formats.md §18.9).
ROOT_INLINE_MAX = 64 * 1024
BUCKET_SPLIT_BYTES = 32 * 1024  # a bucket over this size is split into pieces of at most half of it
# The largest entry that can exist (name, cap, sealed cap, symlink target or inline data, every xattr at
# its limit, framing) and so the largest bucket: an entry alone cannot be split. Readers refuse more.
MAX_ENTRY_BYTES = 64 * 1024 + MAX_TARGET + MAX_XATTRS_PER_ENTRY * (4 + MAX_XATTR_NAME + MAX_XATTR_VALUE)
MAX_BUCKET_BYTES = BUCKET_SPLIT_BYTES + MAX_ENTRY_BYTES
# A directory's own attributes (OWN, in its root) encode to at most this: they share the root's 1 MiB
# with the bucket references, so a root's xattrs are held to far less than an entry's.
OWN_MAX_BYTES = 256 * 1024
ROOT_MAGIC = b"TFDIR1"
HASH_SPACE = 1 << 64


def name_hash(name: bytes) -> int:
    return int.from_bytes(tagged_hash(TAG_DIR_NAME, name)[:8], "big")


def check_name(name: bytes) -> None:
    """Raises ValueError for a name no directory may hold."""
    if not 1 <= len(name) <= MAX_NAME or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise ValueError(f"invalid entry name {name!r}")


@dataclass
class Entry:
    name: bytes
    kind: int
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    cap: str = ""  # file read cap, or child directory read cap
    sealed_write_cap: bytes = b""  # child directory write cap, sealed with the parent's write key
    inline: bytes = b""  # content of a small file
    target: bytes = b""  # symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        check_name(self.name)
        cap = self.cap.encode("ascii")
        parts = [
            struct.pack(">H", len(self.name)),
            self.name,
            struct.pack(
                ">BIIIQqq", self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.ctime_ns
            ),
            struct.pack(">H", len(cap)),
            cap,
            struct.pack(">H", len(self.sealed_write_cap)),
            self.sealed_write_cap,
            struct.pack(">I", len(self.inline)),
            self.inline,
            struct.pack(">H", len(self.target)),
            self.target,
            *_encode_xattrs(self.xattrs),
        ]
        return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def blob(self, fmt: str, limit: int) -> bytes:
        (n,) = self.unpack(fmt)
        if n > limit:
            raise ValueError("field too long")
        return self.take(n)

    def done(self) -> bool:
        return self.pos == len(self.data)


def _encode_xattrs(xattrs: dict[bytes, bytes]) -> list[bytes]:
    parts = [struct.pack(">H", len(xattrs))]
    for key in sorted(xattrs):
        value = xattrs[key]
        parts += [struct.pack(">B", len(key)), key, struct.pack(">I", len(value)), value]
    return parts


def _read_xattrs(r: _Reader) -> dict[bytes, bytes]:
    (count,) = r.unpack(">H")
    if count > MAX_XATTRS_PER_ENTRY:
        raise ValueError("too many xattrs")
    xattrs = {}
    for _ in range(count):
        key = r.blob(">B", MAX_XATTR_NAME)
        xattrs[key] = r.blob(">I", MAX_XATTR_VALUE)
    return xattrs


def encode_own(own: Entry) -> bytes:
    """A directory's own attributes (mode, owner, times, xattrs) as ROOT version 2 carries them; the
    entry's name, size and content fields are not part of it."""
    head = struct.pack(">IIIqq", own.mode, own.uid, own.gid, own.mtime_ns, own.ctime_ns)
    encoded = b"".join([head, *_encode_xattrs(own.xattrs)])
    if len(encoded) > OWN_MAX_BYTES:
        raise ValueError(f"a directory's own attributes over {OWN_MAX_BYTES} bytes")
    return encoded


def decode_own(data: bytes) -> Entry:
    """The inverse of encode_own: an Entry of kind KIND_DIR with an empty name. Raises ValueError."""
    r = _Reader(data)
    mode, uid, gid, mtime, ctime = r.unpack(">IIIqq")
    xattrs = _read_xattrs(r)
    if not r.done():
        raise ValueError("trailing bytes after a directory's own attributes")
    return Entry(b"", KIND_DIR, mode, uid, gid, 0, mtime, ctime, xattrs=xattrs)


def _read_entry(r: _Reader) -> Entry:
    name = r.blob(">H", MAX_NAME)
    check_name(name)
    kind, mode, uid, gid, size, mtime, ctime = r.unpack(">BIIIQqq")
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown entry kind {kind}")
    cap = r.blob(">H", 1024)
    if not cap.isascii():
        raise ValueError("entry cap is not ASCII")
    sealed = r.blob(">H", 1024)
    inline = r.blob(">I", INLINE_FILE_MAX)
    target = r.blob(">H", MAX_TARGET)
    xattrs = _read_xattrs(r)
    return Entry(name, kind, mode, uid, gid, size, mtime, ctime, cap.decode(), sealed, inline, target, xattrs)


def encode_bucket(entries: list[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: (name_hash(e.name), e.name))
    return struct.pack(">I", len(ordered)) + b"".join(e.encode() for e in ordered)


def decode_bucket(data: bytes) -> list[Entry]:
    r = _Reader(data)
    (count,) = r.unpack(">I")
    if count > len(data):
        raise ValueError("impossible entry count")
    entries = [_read_entry(r) for _ in range(count)]
    if not r.done():
        raise ValueError("trailing bytes after the entries")
    if len({e.name for e in entries}) != len(entries):
        raise ValueError("duplicate names in a bucket")
    return entries


@dataclass
class BucketRef:
    """One bucket as the root lists it: the names hashing to [lo, next lo), inline or by cap."""

    lo: int
    count: int
    inline: bytes | None = None
    cap: str = ""

    @property
    def encoded_size(self) -> int:
        """Bytes this reference takes in an encoded root."""
        return BUCKET_REF_HEADER + (len(self.inline) if self.inline is not None else len(self.cap))


BUCKET_REF_HEADER = struct.calcsize(">QIBI")  # lo, count, storage, length: 17 bytes


def encode_root(buckets: list[BucketRef], own: Entry | None = None) -> bytes:
    """A root listing `buckets`; version 2 with the directory's `own` attributes, version 1 without."""
    parts = [ROOT_MAGIC, struct.pack(">BI", 1 if own is None else 2, len(buckets))]
    for b in buckets:
        if b.inline is not None:
            parts += [struct.pack(">QIBI", b.lo, b.count, 0, len(b.inline)), b.inline]
        else:
            cap = b.cap.encode("ascii")
            parts += [struct.pack(">QIBI", b.lo, b.count, 1, len(cap)), cap]
    if own is not None:
        encoded = encode_own(own)
        parts += [struct.pack(">I", len(encoded)), encoded]
    return b"".join(parts)


def decode_root(data: bytes) -> list[BucketRef]:
    """The bucket references of a root (either version). Raises ValueError."""
    return decode_root_own(data)[0]


def decode_root_own(data: bytes) -> tuple[list[BucketRef], Entry | None]:
    """The bucket references of a root and, for version 2, the directory's own attributes."""
    r = _Reader(data)
    if r.take(len(ROOT_MAGIC)) != ROOT_MAGIC:
        raise ValueError("not a tahoefs directory")
    version, count = r.unpack(">BI")
    if version not in (1, 2) or count == 0 or count > len(data):
        raise ValueError("bad directory header")
    buckets = []
    for _ in range(count):
        lo, entries, storage, length = r.unpack(">QIBI")
        body = r.take(length)
        if storage == 0:
            buckets.append(BucketRef(lo, entries, inline=body))
        elif storage == 1 and body.isascii() and length <= 1024:
            buckets.append(BucketRef(lo, entries, cap=body.decode()))
        else:
            raise ValueError("bad bucket reference")
    own = decode_own(r.blob(">I", OWN_MAX_BYTES)) if version == 2 else None
    if not r.done():
        raise ValueError("trailing bytes after the buckets")
    if buckets[0].lo != 0 or any(a.lo >= b.lo for a, b in itertools.pairwise(buckets)):
        raise ValueError("bucket ranges are not ordered")
    return buckets, own


def bucket_index(buckets: list[BucketRef], name: bytes) -> int:
    """Which bucket holds (or would hold) `name`."""
    h = name_hash(name)
    lo, hi = 0, len(buckets)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if buckets[mid].lo <= h:
            lo = mid
        else:
            hi = mid
    return lo


def split_entries(lo: int, entries: list[Entry]) -> list[tuple[int, list[Entry]]]:
    """Split one bucket's entries (hash range starting at `lo`) into buckets of about
    BUCKET_SPLIT_BYTES / 2 each (two or more), cutting between distinct hashes.
    Returns [(lo, entries), ...]."""
    ordered = sorted(entries, key=lambda e: (name_hash(e.name), e.name))
    out: list[tuple[int, list[Entry]]] = []
    current: list[Entry] = []
    current_lo, size = lo, 4
    for e in ordered:
        n = len(e.encode())
        if (
            current
            and size + n > BUCKET_SPLIT_BYTES // 2
            and name_hash(e.name) != name_hash(current[-1].name)
        ):
            out.append((current_lo, current))
            current, current_lo, size = [], name_hash(e.name), 4
        current.append(e)
        size += n
    out.append((current_lo, current))
    return out


def child_write_key(parent: bytes) -> bytes:
    """Key sealing child write caps: derived from the parent's write seed, so read-cap holders of the
    parent cannot unseal them."""
    return tagged_hash(TAG_DIR_CHILD_WRITE_KEY, parent)


def seal_write_cap(parent_seed: bytes, write_cap: str) -> bytes:
    nonce = os.urandom(16)
    cipher = AES.new(child_write_key(parent_seed), AES.MODE_CTR, nonce=b"", initial_value=nonce)
    return nonce + cipher.encrypt(write_cap.encode("ascii"))


def unseal_write_cap(parent_seed: bytes, sealed: bytes) -> str:
    """The child's write cap. Raises ValueError if it does not decode (the version's signature already
    vouches for these bytes, so this means a writer bug, not an attack)."""
    if len(sealed) < 17:
        raise ValueError("sealed write cap too short")
    cipher = AES.new(child_write_key(parent_seed), AES.MODE_CTR, nonce=b"", initial_value=sealed[:16])
    text = cipher.decrypt(sealed[16:])
    if not text.isascii():
        raise ValueError("sealed write cap does not decrypt")
    return text.decode()
