"""Spool files: the local, on-disk copy of a file's content while it is open for writing.

Writes never go to RAM: they land in $TAHOEFS_HOME/spool/ID.data. On flush/fsync the spool is read
back one segment at a time by the uploader. A spool whose upload failed stays on disk (with the path
it belongs to in ID.json), so nothing whose write() succeeded is lost.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from tahoefs.grid.upload import ByteSource

COPY_CHUNK = 1024 * 1024


class Spool:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.id = secrets.token_hex(8)
        self.path = folder / f"{self.id}.data"
        self.meta_path = folder / f"{self.id}.json"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0
        self.loaded = False  # holds the file's content (fetched, or truncated to empty)
        self.dirty = False
        self.version = 0  # bumped by every change, so a flush knows whether writes came meanwhile

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, offset: int, data: bytes) -> int:
        written = os.pwrite(self.fd, data, offset)
        self.size = max(self.size, offset + written)
        self.dirty = True
        self.version += 1
        return written

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size
        self.dirty = True
        self.version += 1

    def describe(self, target: str) -> None:
        """Record what this spool is for, so a failed upload can be found and retried."""
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"target": target, "size": self.size}))
        os.replace(tmp, self.meta_path)

    def source(self) -> ByteSource:
        return _SpoolReader(self)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


class _SpoolReader(ByteSource):
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.pos = 0

    async def read(self, n: int) -> bytes:
        n = max(0, min(n, self.spool.size - self.pos))
        data = self.spool.pread(self.pos, n) if n else b""
        self.pos += len(data)
        return data
