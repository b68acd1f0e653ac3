"""The checker: check, verify and repair one object or a whole directory tree, reporting as it goes.

A deep walk keeps its to-do list of directories and the set of directories already seen in a temporary
SQLite file (private to this user, deleted at the end), and lists each directory one bucket at a time, so
its memory does not grow with the size of the tree. Files reach the checker through a bounded channel
and are taken CHECK_BATCH at a time: one batch query per node says where all their shares are (instead
of one list request per node per file), then they are checked CHECK_PARALLEL_OBJECTS at a time. Each
result goes to the `report` callback at once and only counts are kept.
"""

from __future__ import annotations

import math
import os
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from tahoefs.errors import GridError, IntegrityError, UsageError
from tahoefs.formats.caps import DirVerifyCap, DirWriteCap, FileCap, VerifyCap, parse_cap
from tahoefs.formats.dirformat import KIND_DIR, KIND_FILE, BucketRef, Entry
from tahoefs.grid.check import (
    Corrupt,
    Health,
    Located,
    check_file,
    check_mutable,
    locate_many,
    version_health,
)
from tahoefs.grid.client import GridClient
from tahoefs.grid.directory import Directory
from tahoefs.grid.repair import repair_file, repair_mutable
from tahoefs.limits import CHECK_BATCH, CHECK_PARALLEL_OBJECTS, VERIFY_PARALLEL_SHARES

BATCH_WAIT = 0.2  # seconds a partial batch waits for more files while the walk reads directories
_JobSender = trio.MemorySendChannel[tuple[VerifyCap, str, str]]  # (cap, path, kind) for a worker


@dataclass
class Checked:
    """One object's check: its health before, and (after a repair attempt) what was done and after."""

    path: str
    health: Health
    repair: str | None = None
    after: Health | None = None
    error: str | None = None

    @property
    def final(self) -> Health:
        return self.after or self.health

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, **self.health.as_json()}
        if self.repair is not None or self.error is not None:
            out["repair"] = {"done": self.repair, "error": self.error}
        if self.after is not None:
            out["after"] = self.after.as_json()
        return out


@dataclass
class Options:
    verify: bool = False
    repair: bool = False


class Checker:
    """Checks objects with `options`, calls `report(checked)` for each, and counts the outcomes in
    `counts` (keys: the final state, "repaired", "repair failed", and the kind of each object)."""

    def __init__(self, grid: GridClient, options: Options, report: Callable[[Checked], None]) -> None:
        self.grid = grid
        self.options = options
        self.report = report
        self.counts: Counter[str] = Counter()
        self._limiter = trio.CapacityLimiter(VERIFY_PARALLEL_SHARES)

    @property
    def all_healthy(self) -> bool:
        return self.counts["not healthy"] == 0 and self.counts["lost"] == 0

    def _done(self, checked: Checked) -> Checked:
        self.counts[checked.final.state] += 1
        self.counts[checked.health.kind] += 1
        if checked.after is not None and checked.after.healthy:
            self.counts["repaired"] += 1
        elif checked.error is not None or checked.after is not None:  # failed, or only partly done
            self.counts["repair failed"] += 1
        self.report(checked)
        return checked

    # -- one object ------------------------------------------------------------------------------
    async def file(
        self, cap: VerifyCap, path: str, kind: str = "file", located: Located | None = None
    ) -> Checked:
        opts = self.options
        health, reader = await check_file(self.grid, cap, opts.verify, self._limiter, kind, located)
        checked = Checked(path, health)
        if opts.repair and (not health.healthy or health.corrupt):
            stuck = health.corrupt
            try:
                checked.repair, stuck = await repair_file(self.grid, cap, health, reader)
            except GridError as exc:
                checked.error = str(exc)
            checked.after, _ = await check_file(self.grid, cap, False, self._limiter, kind)
            _discount(checked.after, stuck)
        return self._done(checked)

    async def directory(self, directory: Directory, path: str) -> tuple[Checked, list[BucketRef] | None]:
        """Check (and repair, if writable) a directory's own object. Returns the buckets of its entry
        list too (None when the directory cannot be read)."""
        buckets: list[BucketRef] | None = None
        version = None
        trouble: list[str] = []
        try:
            version, buckets = await directory.load()
        except GridError as exc:  # lost, or a signed version that does not parse
            trouble.append(str(exc))
        health = version_health(self.grid, directory.cap, version, directory.problems + trouble)
        checked = Checked(path, health)
        if self.options.repair and version is not None and not health.healthy:
            if isinstance(directory.cap, DirWriteCap):
                try:
                    checked.repair = await repair_mutable(self.grid, directory.cap, version)
                except GridError as exc:
                    checked.error = str(exc)
                checked.after, _ = await check_mutable(self.grid, directory.cap)
            else:
                checked.error = "a directory needs its write cap to be repaired; this is a read cap"
        return self._done(checked), buckets

    async def directory_verify_cap(self, cap: DirVerifyCap, path: str) -> Checked:
        health, _version = await check_mutable(self.grid, cap)
        checked = Checked(path, health)
        if self.options.repair and not health.healthy:
            checked.error = "a directory needs its write cap to be repaired; this is a verify cap"
        return self._done(checked)

    async def buckets(self, buckets: list[BucketRef], path: str) -> None:
        """Check the entry-list files (buckets) of a directory."""
        for ref in buckets:
            cap = _bucket_cap(ref)
            if cap is not None:
                await self.file(cap, _bucket_label(path, ref), kind="bucket")

    # -- a tree ----------------------------------------------------------------------------------
    async def walk(self, root: Directory, root_path: str) -> None:
        """Check every directory, entry list and file reachable from `root` (each directory once)."""
        with tempfile.TemporaryDirectory(prefix="tahoefs-check-") as tmp:
            pending = _Pending(Path(tmp) / "walk.sqlite")
            try:
                pending.push(root.obj.si, str(root.cap), root_path)
                await self._walk(pending)
            finally:
                pending.close()

    async def _walk(self, pending: _Pending) -> None:
        send, receive = trio.open_memory_channel[tuple[VerifyCap, str, str]](CHECK_BATCH)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._check_batches, receive)
            async with send:
                while (item := pending.pop()) is not None:
                    cap_text, path = item
                    directory = Directory(self.grid, parse_cap(cap_text))  # type: ignore[arg-type]
                    await self._visit(directory, path, pending, send)

    async def _check_batches(self, jobs: trio.MemoryReceiveChannel[tuple[VerifyCap, str, str]]) -> None:
        """Take up to CHECK_BATCH file jobs at a time (fewer when the walk pauses for BATCH_WAIT), locate
        them all with one query per node, then check them CHECK_PARALLEL_OBJECTS at a time."""
        limiter = trio.CapacityLimiter(CHECK_PARALLEL_OBJECTS)
        async with jobs:
            done = False
            while not done:
                batch: list[tuple[VerifyCap, str, str]] = []
                while len(batch) < CHECK_BATCH:
                    with trio.move_on_after(BATCH_WAIT if batch else math.inf):
                        try:
                            batch.append(await jobs.receive())
                            continue
                        except trio.EndOfChannel:
                            done = True
                    break
                if not batch:
                    continue
                await self._check_batch(batch, limiter)

    async def _check_batch(
        self, batch: list[tuple[VerifyCap, str, str]], limiter: trio.CapacityLimiter
    ) -> None:
        located = await locate_many(self.grid, [cap.storage_index for cap, _, _ in batch])

        async def one(cap: VerifyCap, path: str, kind: str) -> None:
            async with limiter:
                await self.file(cap, path, kind, located)

        async with trio.open_nursery() as nursery:
            for job in batch:
                nursery.start_soon(one, *job)

    async def _visit(self, directory: Directory, path: str, pending: _Pending, send: _JobSender) -> None:
        """Check one directory, queue its entry lists and files for the workers and its subdirectories
        for the walk."""
        _checked, buckets = await self.directory(directory, path)
        if buckets is None:
            return
        for ref in buckets:
            cap = _bucket_cap(ref)
            if cap is not None:
                await send.send((cap, _bucket_label(path, ref), "bucket"))

        async def sink(entries: list[Entry]) -> None:
            for entry in entries:
                await self._entry(directory, path, entry, pending, send)

        try:
            await directory.scan(sink)
        except GridError as exc:
            self.counts["unreadable"] += 1
            self.report(Checked(path, version_health(self.grid, directory.cap, None, [str(exc)])))

    async def _entry(
        self,
        directory: Directory,
        path: str,
        entry: Entry,
        pending: _Pending,
        send: _JobSender,
    ) -> None:
        child_path = _join(path, os.fsdecode(entry.name))
        if entry.kind == KIND_DIR:
            try:
                child = directory.child(entry)
            except (IntegrityError, UsageError) as exc:
                lost = Health("directory", entry.cap, self.grid.needed, self.grid.total, problems=[str(exc)])
                self._done(Checked(child_path, lost))  # its cap does not open: as good as lost
                return
            pending.push(child.obj.si, str(child.cap), child_path)
        elif entry.kind == KIND_FILE:
            if not entry.cap:
                self.counts["inline"] += 1  # stored inside its directory entry: as healthy as the directory
                return
            try:
                cap = parse_cap(entry.cap)
            except UsageError as exc:
                lost = Health("file", entry.cap, self.grid.needed, self.grid.total, problems=[str(exc)])
                self._done(Checked(child_path, lost))
                return
            if isinstance(cap, FileCap):
                await send.send((cap.verify_cap(), child_path, "file"))
            else:
                self.counts["inline"] += 1  # a literal cap: the bytes are in the cap


def _join(path: str, name: str) -> str:
    """`root:` + `a` is `root:a`; `root:a` + `b` is `root:a/b`."""
    return path + name if path.endswith((":", "/")) else f"{path}/{name}"


def _discount(health: Health, corrupt: list[Corrupt]) -> None:
    """Move copies known to be corrupt (a check without verify lists them as held) to health.corrupt."""
    for bad in corrupt:
        nodes = health.holders.get(bad.num, [])
        if bad.node in nodes:
            nodes.remove(bad.node)
            health.corrupt.append(bad)
            if not nodes:
                del health.holders[bad.num]


def _bucket_label(path: str, ref: BucketRef) -> str:
    return f"{path} (entries {ref.lo:016x})"


def _bucket_cap(ref: BucketRef) -> VerifyCap | None:
    if ref.inline is not None or not ref.cap:
        return None
    try:
        cap = parse_cap(ref.cap)
    except UsageError:
        return None
    return cap.verify_cap() if isinstance(cap, FileCap) else None


class _Pending:
    """Directories still to visit, and those already seen (by storage index), in a SQLite file."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE seen (si BLOB PRIMARY KEY)")
        self.db.execute("CREATE TABLE todo (id INTEGER PRIMARY KEY, cap TEXT, path TEXT)")

    def push(self, si: bytes, cap: str, path: str) -> None:
        if self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (si,)).rowcount:
            self.db.execute("INSERT INTO todo (cap, path) VALUES (?, ?)", (cap, path))

    def pop(self) -> tuple[str, str] | None:
        row = self.db.execute("SELECT id, cap, path FROM todo ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        self.db.execute("DELETE FROM todo WHERE id = ?", (row[0],))
        return row[1], row[2]

    def close(self) -> None:
        self.db.close()
