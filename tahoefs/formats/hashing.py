"""Tagged SHA-256 hashes and base32.

Every hash the client puts into a cap or a share is *tagged*: SHA-256(netstring(tag) || data), so a hash
made for one purpose can never be replayed as another. The tags are listed here and in docs/formats.md.
(Two hashes are deliberately plain: ring placement, and the node's digest of a delete secret.)
"""

import base64
import hashlib

TAG_STORAGE_INDEX = b"tahoefs:storage-index:v1"
TAG_BLOCK = b"tahoefs:block:v1"
TAG_HASH_CHUNK = b"tahoefs:hash-chunk:v1"
TAG_SHARE_ROOT = b"tahoefs:share-root:v1"
TAG_SHARE_ROOTS = b"tahoefs:share-roots:v1"
TAG_UEB = b"tahoefs:ueb:v1"
TAG_DELETE_SECRET = b"tahoefs:delete-secret:v1"
TAG_MUTABLE_READ_KEY = b"tahoefs:mutable-read-key:v1"
TAG_MUTABLE_SI = b"tahoefs:mutable-storage-index:v1"
TAG_MUTABLE_VK = b"tahoefs:mutable-verifying-key:v1"
TAG_MUTABLE_WRITE_ENABLER = b"tahoefs:mutable-write-enabler:v1"
TAG_MUTABLE_DATA_KEY = b"tahoefs:mutable-data-key:v1"
TAG_MUTABLE_BLOCKS = b"tahoefs:mutable-blocks:v1"
TAG_MUTABLE_SIGNED = b"tahoefs:mutable-signed:v1"
TAG_DIR_CHILD_WRITE_KEY = b"tahoefs:dir-child-write-key:v1"
TAG_DIR_NAME = b"tahoefs:dir-name:v1"

HASH_SIZE = 32


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def tagged_hasher(tag: bytes) -> "hashlib._Hash":
    """A fresh SHA-256 object already fed with the tag prefix, for hashing data in pieces."""
    return hashlib.sha256(netstring(tag))


def tagged_hash(tag: bytes, *parts: bytes) -> bytes:
    """SHA-256(netstring(tag) || part0 || part1 ...). Releases the GIL for large parts."""
    h = tagged_hasher(tag)
    for part in parts:
        h.update(part)
    return h.digest()


def b32encode(data: bytes) -> str:
    """Lowercase RFC 4648 base32 without padding: safe in URLs, paths and shells."""
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str) -> bytes:
    """Inverse of b32encode. Raises ValueError on any character outside [a-z2-7] or a bad length."""
    if not text.isascii() or text != text.lower() or "=" in text:
        raise ValueError("not lowercase unpadded base32")
    if len(text) % 8 in (1, 3, 6):
        raise ValueError("impossible base32 length")
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        data = base64.b32decode(padded, casefold=False)
    except (ValueError, base64.binascii.Error) as exc:  # type: ignore[attr-defined]
        raise ValueError(f"bad base32: {exc}") from None
    if b32encode(data) != text:
        raise ValueError("non-canonical base32")
    return data


def storage_index_for_key(key: bytes) -> bytes:
    """The 16-byte name nodes see for a file: a tagged hash of its key, revealing nothing about it."""
    return tagged_hash(TAG_STORAGE_INDEX, key)[:16]
