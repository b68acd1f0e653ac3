"""Signed, encrypted, erasure-coded versions of a mutable object (directories use these).

Keys, all from the write cap's 32-byte Ed25519 seed (see caps.py and docs/formats.md):

    read key        = H_tag(mutable-read-key, seed)
    storage index   = H_tag(mutable-storage-index, read key)[:16]
    vk hash         = H_tag(mutable-verifying-key, Ed25519 public key)
    write enabler   = H_tag(mutable-write-enabler, seed || node id)       one per node
    data key        = H_tag(mutable-data-key, read key || salt)           one per version

A version's share j is:

    HEADER   ">8sBQ16sHHI32s": magic "TFMUTSH1", format 1, seqnum, salt, k, n, data length,
             blocks root = H_tag(mutable-blocks, hash(block 0) || ... || hash(block n-1))
    VK       32 B Ed25519 public key
    SIG      64 B Ed25519 signature of H_tag(mutable-signed, storage index || HEADER)
    HASHES   n x 32 B block hashes
    NUM      ">H" share number
    BLOCK    ceil(data length / k) bytes: block j of the zfec encoding of the ciphertext

The signature covers everything a reader relies on (seqnum, salt, encoding, length, every block via the
root); the reader checks the VK against the cap's vk hash, so a node can neither forge nor alter a
version. A version is identified by (seqnum, blocks root).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from tahoefs.errors import IntegrityError
from tahoefs.formats.caps import DirWriteCap
from tahoefs.formats.codec import block_hash, crypt, erasure_decode, erasure_encode
from tahoefs.formats.hashing import (
    HASH_SIZE,
    TAG_MUTABLE_BLOCKS,
    TAG_MUTABLE_DATA_KEY,
    TAG_MUTABLE_SIGNED,
    TAG_MUTABLE_VK,
    TAG_MUTABLE_WRITE_ENABLER,
    tagged_hash,
)
from tahoefs.formats.share import ceil_div

HEADER_FORMAT = ">8sBQ16sHHI32s"
HEADER_MAGIC = b"TFMUTSH1"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
VK_SIZE, SIG_SIZE = 32, 64
MAX_VERSION_BYTES = 1024 * 1024  # plaintext of one version; directories keep big content in buckets


def write_enabler(cap: DirWriteCap, node_id: str) -> bytes:
    return tagged_hash(TAG_MUTABLE_WRITE_ENABLER, cap.seed, node_id.encode())


def data_key(read_key: bytes, salt: bytes) -> bytes:
    return tagged_hash(TAG_MUTABLE_DATA_KEY, read_key, salt)


@dataclass(frozen=True)
class MutableShare:
    """One verified share of one version."""

    seqnum: int
    salt: bytes
    needed: int
    total: int
    data_length: int
    root: bytes
    num: int
    block: bytes

    @property
    def version_id(self) -> tuple[int, bytes]:
        return (self.seqnum, self.root)


def encode_version(cap: DirWriteCap, seqnum: int, plaintext: bytes, k: int, n: int) -> list[bytes]:
    """The n shares of a new version. Raises ValueError if the plaintext is over MAX_VERSION_BYTES."""
    if len(plaintext) > MAX_VERSION_BYTES:
        raise ValueError(f"a version holds at most {MAX_VERSION_BYTES} bytes")
    read = cap.read_cap()
    salt = os.urandom(16)
    blocks = erasure_encode(crypt(data_key(read.read_key, salt), 0, plaintext), k, n)
    hashes = b"".join(block_hash(b) for b in blocks)
    root = tagged_hash(TAG_MUTABLE_BLOCKS, hashes)
    header = struct.pack(HEADER_FORMAT, HEADER_MAGIC, 1, seqnum, salt, k, n, len(plaintext), root)
    key = ECC.construct(curve="Ed25519", seed=cap.seed)
    signature = eddsa.new(key, "rfc8032").sign(tagged_hash(TAG_MUTABLE_SIGNED, read.storage_index, header))
    vk = key.public_key().export_key(format="raw")
    prefix = header + vk + signature + hashes
    return [prefix + struct.pack(">H", j) + blocks[j] for j in range(n)]


def parse_share(data: bytes, storage_index: bytes, vk_hash: bytes, expected_num: int) -> MutableShare:
    """Verify one share against the cap's storage index and vk hash. Raises IntegrityError (with the
    node name left as "share" for the caller to fill in) for anything wrong."""
    fixed = HEADER_SIZE + VK_SIZE + SIG_SIZE
    if len(data) < fixed + 2:
        raise IntegrityError("share", "mutable share too short")
    header = data[:HEADER_SIZE]
    magic, fmt, seqnum, salt, k, n, length, root = struct.unpack(HEADER_FORMAT, header)
    if magic != HEADER_MAGIC or fmt != 1:
        raise IntegrityError("share", "not a tahoefs mutable share")
    if not (1 <= k <= n <= 256) or length > MAX_VERSION_BYTES:
        raise IntegrityError("share", "mutable share has impossible parameters")
    vk = data[HEADER_SIZE : HEADER_SIZE + VK_SIZE]
    signature = data[HEADER_SIZE + VK_SIZE : fixed]
    if tagged_hash(TAG_MUTABLE_VK, vk) != vk_hash:
        raise IntegrityError("share", "signed by a key the capability does not name")
    try:
        verifier = eddsa.new(eddsa.import_public_key(vk), "rfc8032")
        verifier.verify(tagged_hash(TAG_MUTABLE_SIGNED, storage_index, header), signature)
    except ValueError:
        raise IntegrityError("share", "bad signature") from None
    block_size = max(1, ceil_div(length, k))
    hashes_end = fixed + n * HASH_SIZE
    if len(data) != hashes_end + 2 + block_size:
        raise IntegrityError("share", "mutable share has the wrong length")
    hashes = data[fixed:hashes_end]
    if tagged_hash(TAG_MUTABLE_BLOCKS, hashes) != root:
        raise IntegrityError("share", "block hashes do not match the signed root")
    (num,) = struct.unpack(">H", data[hashes_end : hashes_end + 2])
    if num != expected_num or num >= n:
        raise IntegrityError("share", f"share says it is number {num}, expected {expected_num}")
    block = data[hashes_end + 2 :]
    if block_hash(block) != hashes[num * HASH_SIZE : (num + 1) * HASH_SIZE]:
        raise IntegrityError("share", "block does not match its hash")
    return MutableShare(seqnum, salt, k, n, length, root, num, block)


def decode_version(read_key: bytes, shares: list[MutableShare]) -> bytes:
    """Plaintext of a version from at least k verified shares of it (same version_id)."""
    first = shares[0]
    k, n = first.needed, first.total
    by_num = {s.num: s.block for s in shares if s.version_id == first.version_id}
    ciphertext = erasure_decode(by_num, k, n, first.data_length)
    return crypt(data_key(read_key, first.salt), 0, ciphertext)
