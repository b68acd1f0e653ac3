"""Capabilities: plain strings that name a piece of data and grant access to it.

    tahoefs:lit:v1:DATA                              a file of up to LITERAL_CAP_MAX bytes, inside the cap
    tahoefs:file:v1:KEY:UEBHASH:K:N:SIZE             read cap of an immutable file
    tahoefs:file-verify:v1:SI:UEBHASH:K:N:SIZE       verify cap: check and repair, no plaintext
    tahoefs:dir:v1:SEED                              write cap of a directory (Ed25519 signing seed)
    tahoefs:dir-ro:v1:READKEY:VKHASH                 read cap of a directory
    tahoefs:dir-verify:v1:SI:VKHASH                  verify cap of a directory

KEY (32 bytes), UEBHASH (32), SI (16) and DATA are lowercase unpadded base32. A read cap is
self-authenticating: UEBHASH pins the share trailer, which pins every block of every share. Caps never
contain '/' or whitespace, so `CAP/PATH` is unambiguous. See docs/formats.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tahoefs.errors import BadCapError
from tahoefs.formats.hashing import (
    TAG_MUTABLE_READ_KEY,
    TAG_MUTABLE_SI,
    TAG_MUTABLE_VK,
    b32decode,
    b32encode,
    storage_index_for_key,
    tagged_hash,
)
from tahoefs.limits import LITERAL_CAP_MAX

PREFIX = "tahoefs:"
MAX_SHARES = 256


@dataclass(frozen=True)
class LiteralCap:
    """A tiny file whose bytes are the cap itself; needs no node."""

    data: bytes

    def __str__(self) -> str:
        return f"tahoefs:lit:v1:{b32encode(self.data)}"

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class VerifyCap:
    """Enough to locate, check and repair a file's shares; cannot decrypt."""

    storage_index: bytes
    ueb_hash: bytes
    needed: int
    total: int
    size: int

    def __str__(self) -> str:
        return (
            f"tahoefs:file-verify:v1:{b32encode(self.storage_index)}:{b32encode(self.ueb_hash)}"
            f":{self.needed}:{self.total}:{self.size}"
        )


@dataclass(frozen=True)
class FileCap:
    """Read cap of an immutable file: its AES key plus the hash that pins every byte."""

    key: bytes
    ueb_hash: bytes
    needed: int
    total: int
    size: int

    def __str__(self) -> str:
        return (
            f"tahoefs:file:v1:{b32encode(self.key)}:{b32encode(self.ueb_hash)}"
            f":{self.needed}:{self.total}:{self.size}"
        )

    @property
    def storage_index(self) -> bytes:
        return storage_index_for_key(self.key)

    def verify_cap(self) -> VerifyCap:
        return VerifyCap(self.storage_index, self.ueb_hash, self.needed, self.total, self.size)


@dataclass(frozen=True)
class DirVerifyCap:
    """Locate, check and repair a directory's versions; cannot decrypt them."""

    storage_index: bytes
    vk_hash: bytes

    def __str__(self) -> str:
        return f"tahoefs:dir-verify:v1:{b32encode(self.storage_index)}:{b32encode(self.vk_hash)}"


@dataclass(frozen=True)
class DirReadCap:
    """Read a directory: its read key and the hash of the key that signs its versions."""

    read_key: bytes
    vk_hash: bytes

    def __str__(self) -> str:
        return f"tahoefs:dir-ro:v1:{b32encode(self.read_key)}:{b32encode(self.vk_hash)}"

    @property
    def storage_index(self) -> bytes:
        return tagged_hash(TAG_MUTABLE_SI, self.read_key)[:16]

    def verify_cap(self) -> DirVerifyCap:
        return DirVerifyCap(self.storage_index, self.vk_hash)

    def read_cap(self) -> DirReadCap:
        return self


@dataclass(frozen=True)
class DirWriteCap:
    """Write a directory: the 32-byte Ed25519 seed every other key derives from."""

    seed: bytes

    def __str__(self) -> str:
        return f"tahoefs:dir:v1:{b32encode(self.seed)}"

    @functools.cached_property
    def verifying_key(self) -> bytes:
        from Crypto.PublicKey import ECC

        return ECC.construct(curve="Ed25519", seed=self.seed).public_key().export_key(format="raw")

    @functools.cached_property
    def _read_cap(self) -> DirReadCap:
        return DirReadCap(
            tagged_hash(TAG_MUTABLE_READ_KEY, self.seed), tagged_hash(TAG_MUTABLE_VK, self.verifying_key)
        )

    def read_cap(self) -> DirReadCap:
        """Derived once per cap object (an Ed25519 key derivation and two hashes), not on every call."""
        return self._read_cap

    @property
    def storage_index(self) -> bytes:
        return self.read_cap().storage_index

    def verify_cap(self) -> DirVerifyCap:
        return self.read_cap().verify_cap()


Cap = LiteralCap | FileCap | VerifyCap | DirWriteCap | DirReadCap | DirVerifyCap
DirCap = DirWriteCap | DirReadCap


def _b32_field(text: str, name: str, length: int | None) -> bytes:
    try:
        data = b32decode(text)
    except ValueError:
        raise BadCapError(f"malformed capability: the {name} field is not base32") from None
    if length is not None and len(data) != length:
        raise BadCapError(f"malformed capability: the {name} field must be {length} bytes")
    return data


def _int_field(text: str, name: str, lo: int, hi: int) -> int:
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0") or len(text) > 20:
        raise BadCapError(f"malformed capability: the {name} field is not a number")
    value = int(text)
    if not lo <= value <= hi:
        raise BadCapError(f"malformed capability: {name}={value} is out of range {lo}..{hi}")
    return value


def parse_cap(text: str) -> Cap:
    """Parse a capability string. Raises BadCapError (one clear sentence) for anything malformed."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise BadCapError(f"not a tahoefs capability (it should start with '{PREFIX}'): {text[:40]!r}")
    parts = text.split(":")
    if len(parts) < 3:
        raise BadCapError("malformed capability: expected tahoefs:KIND:VERSION:...")
    kind, version = parts[1], parts[2]
    fields = parts[3:]
    if version != "v1":
        raise BadCapError(f"unsupported capability version {version!r} for kind {kind!r}")
    if kind == "lit":
        if len(fields) != 1:
            raise BadCapError("malformed literal capability")
        data = _b32_field(fields[0], "data", None)
        if len(data) > LITERAL_CAP_MAX:
            raise BadCapError("malformed literal capability: too long")
        return LiteralCap(data)
    if kind in ("file", "file-verify"):
        if len(fields) != 5:
            raise BadCapError(f"malformed {kind} capability: expected 5 fields after the version")
        first = _b32_field(
            fields[0], "key" if kind == "file" else "storage index", 32 if kind == "file" else 16
        )
        ueb_hash = _b32_field(fields[1], "hash", 32)
        needed = _int_field(fields[2], "k", 1, MAX_SHARES)
        total = _int_field(fields[3], "n", needed, MAX_SHARES)
        size = _int_field(fields[4], "size", 0, 1 << 62)
        if kind == "file":
            return FileCap(first, ueb_hash, needed, total, size)
        return VerifyCap(first, ueb_hash, needed, total, size)
    if kind == "dir":
        if len(fields) != 1:
            raise BadCapError("malformed dir capability: expected 1 field after the version")
        return DirWriteCap(_b32_field(fields[0], "seed", 32))
    if kind in ("dir-ro", "dir-verify"):
        if len(fields) != 2:
            raise BadCapError(f"malformed {kind} capability: expected 2 fields after the version")
        first = _b32_field(
            fields[0], "read key" if kind == "dir-ro" else "storage index", 32 if kind == "dir-ro" else 16
        )
        vk_hash = _b32_field(fields[1], "key hash", 32)
        return DirReadCap(first, vk_hash) if kind == "dir-ro" else DirVerifyCap(first, vk_hash)
    raise BadCapError(f"unknown capability kind {kind!r}")
