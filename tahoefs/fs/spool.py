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

CHUNK = 1024 * 1024  # base content is fetched into a spool this much at a time
SPOOL_POOL_FILES = 8  # empty spool files a mount keeps open for its next new spools


class SpoolPool:
    """Where a mount's spools come from: empty spool files kept open for reuse, up to `limit`.

    Creating a file for every file written and deleting it after costs an inode allocation and a
    deletion on the spool's disk: 0.2 to 0.5 ms each on a busy ext4, on the event loop, on the path of
    every create and close. A spool given back clean (never described) is truncated to empty and kept
    instead. Files left in the pool by a mount that died have no description, so the next mount removes
    them with the other undescribed leftovers."""

    def __init__(self, folder: Path, limit: int = SPOOL_POOL_FILES) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.limit = limit
        self._free: list[tuple[str, int]] = []  # (spool id, open fd) of empty files

    def new(self) -> Spool:
        """An empty spool, from the pool when it has one."""
        if self._free:
            spool_id, fd = self._free.pop()
            return Spool(self.folder, self, (spool_id, fd))
        return Spool(self.folder, self)

    def take_back(self, spool_id: str, fd: int) -> bool:
        """Keep a clean spool's file for reuse (emptied now); False when the pool is full."""
        if len(self._free) >= self.limit:
            return False
        os.ftruncate(fd, 0)
        self._free.append((spool_id, fd))
        return True

    def close(self) -> None:
        """Delete the pooled files (at unmount)."""
        for spool_id, fd in self._free:
            os.close(fd)
            (self.folder / f"{spool_id}.data").unlink(missing_ok=True)
        self._free = []


class Spool:
    def __init__(
        self, folder: Path, pool: SpoolPool | None = None, reuse: tuple[str, int] | None = None
    ) -> None:
        """A new, empty spool in `folder`: a new file, or `reuse` = (id, fd) of an empty one of `pool`'s.
        `discard` gives a clean spool's file back to `pool`."""
        self.pool = pool
        # The owner's pid leads the name: a live mount's spools are never taken for leftovers.
        if reuse is not None:
            self.id, self.fd = reuse
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.id = f"{os.getpid()}-{secrets.token_hex(8)}"
            self.fd = os.open(folder / f"{self.id}.data", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.path = folder / f"{self.id}.data"
        self.meta_path = folder / f"{self.id}.json"
        self.described = False
        self.size = 0
        self.loaded = False  # holds the file's content (fetched, or truncated to empty)
        self.dirty = False
        # The committed content this spool started from is fetched lazily, CHUNK bytes at a time:
        # `present` holds the chunks of it already in the file; chunks at or past `base_size` are not
        # from the base (new data or zeros).
        self.base_size = 0
        self.base_entry: object | None = None  # the directory Entry the base content comes from
        self.present: set[int] = set()
        self.version = 0  # bumped by every change, so a flush knows whether writes came meanwhile

    def start_from(self, size: int) -> None:
        """This spool stands for a file of `size` bytes whose content is still on the grid."""
        os.ftruncate(self.fd, size)
        self.size = self.base_size = size
        self.present = set()
        self.loaded = True

    def missing(self, start: int, end: int) -> list[int]:
        """Chunks of the base content in [start, end) not in the file yet."""
        end = min(end, self.base_size)
        if start >= end:
            return []
        return [c for c in range(start // CHUNK, -(-end // CHUNK)) if c not in self.present]

    def fill(self, chunk: int, data: bytes) -> None:
        """Put base content of `chunk` in place (not a change: dirty stays as it is)."""
        os.pwrite(self.fd, data, chunk * CHUNK)
        self.present.add(chunk)

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, offset: int, data: bytes) -> int:
        written = os.pwrite(self.fd, data, offset)
        self.size = max(self.size, offset + written)
        self.dirty = True
        self.version += 1
        return written

    def truncate(self, size: int) -> None:
        """Caller first fills the chunk that `size` cuts through; base content past `size` is gone."""
        self.base_size = min(self.base_size, size)
        os.ftruncate(self.fd, size)
        self.size = size
        self.dirty = True
        self.version += 1

    def describe(self, dir_cap: str, name: bytes, entry_b64: str) -> None:
        """Record (durably, content included) where this content belongs after a save failed, so that
        if the mount dies before a retry succeeds, the next mount of the tree finds it (`leftovers`)."""
        os.fsync(self.fd)
        tmp = self.meta_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            meta = {
                "dir": dir_cap,
                "name": name.hex(),
                "entry": entry_b64,
                "size": self.size,
                "pid": os.getpid(),
            }
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)
        self.described = True

    def source(self) -> ByteSource:
        return _SpoolReader(self)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def discard(self) -> None:
        """Done with this spool: its file goes back to the pool (emptied) if it was never described
        and the pool has room, else it is deleted with its description."""
        if (
            self.fd >= 0
            and not self.described
            and self.pool is not None
            and self.pool.take_back(self.id, self.fd)
        ):
            self.fd = -1
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


def leftovers(folder: Path) -> list[tuple[Path, dict]]:
    """Spools a dead mount left with a description: (data path, description). Spools without one
    (never flushed: their close() never returned success) are removed."""
    found = []
    if not folder.exists():
        return found
    for data in folder.glob("*.data"):
        meta = data.with_suffix(".json")
        try:
            description = json.loads(meta.read_text())
        except (OSError, ValueError):
            description = None
        owner = description.get("pid") if description else _owner_of(data)
        if owner and owner != os.getpid() and _running(owner):
            continue  # a live mount's spool
        if description is None:
            data.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
        else:
            found.append((data, description))
    return found


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _owner_of(data: Path) -> int | None:
    try:
        return int(data.name.split(".")[0].split("-")[0])
    except ValueError:
        return None


def file_source(path: Path) -> ByteSource:
    return _FileSource(path)


class _FileSource(ByteSource):
    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed at EOF

    async def read(self, n: int) -> bytes:
        data = self.file.read(n)
        if not data:
            self.file.close()
        return data


class _SpoolReader(ByteSource):
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.pos = 0

    async def read(self, n: int) -> bytes:
        n = max(0, min(n, self.spool.size - self.pos))
        data = self.spool.pread(self.pos, n) if n else b""
        self.pos += len(data)
        return data
