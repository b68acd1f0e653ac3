"""The segment codec: encrypt + erasure-code + hash on the way up; verify + decode + decrypt on the way
down. Pure CPU work with no I/O; every function is safe to run in a worker thread (each call makes its
own cipher object; zfec, AES and SHA-256 release the GIL on large buffers).
"""

from __future__ import annotations

import zfec
from Crypto.Cipher import AES

from tahoefs.formats.hashing import TAG_BLOCK, tagged_hash
from tahoefs.formats.share import ceil_div


def _ctr_cipher(key: bytes, offset: int):
    if offset % 16:
        raise ValueError("CTR offsets must be multiples of the AES block size")
    return AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=offset // 16)


def crypt(key: bytes, offset: int, data: bytes) -> bytes:
    """AES-256-CTR at byte `offset` of the file stream (encrypt and decrypt are the same)."""
    return _ctr_cipher(key, offset).encrypt(data)


def block_hash(block: bytes) -> bytes:
    return tagged_hash(TAG_BLOCK, block)


def erasure_encode(data: bytes, k: int, n: int) -> list[bytes]:
    """Pad `data` with zeros to k equal blocks (at least 1 byte each) and zfec-encode them into n
    blocks; blocks 0..k-1 are the padded data itself."""
    block_size = max(1, ceil_div(len(data), k))
    padded = data + b"\0" * (block_size * k - len(data))
    primaries = tuple(padded[i * block_size : (i + 1) * block_size] for i in range(k))
    return list(zfec.Encoder(k, n).encode(primaries)) if n > k else list(primaries)


def erasure_decode(blocks: dict[int, bytes], k: int, n: int, length: int) -> bytes:
    """The first `length` bytes of the data behind any k blocks {share number: block}. Decoding the
    primaries 0..k-1 is a copy. Raises ValueError if fewer than k blocks are given."""
    if len(blocks) < k:
        raise ValueError(f"need {k} blocks, got {len(blocks)}")
    nums = sorted(blocks)[:k]
    if nums == list(range(k)):
        primaries = [blocks[i] for i in nums]
    else:
        primaries = zfec.Decoder(k, n).decode([blocks[i] for i in nums], nums)
    return b"".join(primaries)[:length]


def encode_segment(
    key: bytes, offset: int, plaintext: bytes, k: int, n: int
) -> tuple[list[bytes], list[bytes]]:
    """Encrypt one segment that starts at file byte `offset`, pad it to k equal blocks, erasure-code it
    into n blocks. Returns (blocks, block hashes), each of length n."""
    blocks = erasure_encode(crypt(key, offset, plaintext), k, n)
    return blocks, [block_hash(b) for b in blocks]


def decode_segment(key: bytes, offset: int, length: int, blocks: dict[int, bytes], k: int, n: int) -> bytes:
    """Inverse of encode_segment from any k verified blocks {share number: block}: decode, trim the
    padding, decrypt. Raises ValueError if fewer than k blocks are given."""
    return crypt(key, offset, erasure_decode(blocks, k, n, length))
