"""`tahoefs check`: resolve the TARGET, run the checker, print what it found.

Output: one line per object (with --deep only the objects that are not healthy, or were repaired), then
for a directory a summary. `--json` prints JSON Lines instead: one object per line, and with --deep a
last line {"summary": {...}}.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from tahoefs.cli.tree import Target, entry_cap, open_dir, parse_target
from tahoefs.errors import NoSuchEntryError, UsageError
from tahoefs.formats.caps import (
    DirReadCap,
    DirVerifyCap,
    DirWriteCap,
    FileCap,
    LiteralCap,
    VerifyCap,
    parse_cap,
)
from tahoefs.formats.dirformat import KIND_DIR, KIND_SYMLINK
from tahoefs.grid.checker import Checked, Checker, Options
from tahoefs.grid.client import GridClient
from tahoefs.grid.config import GridConfig
from tahoefs.grid.directory import Directory

SUMMARY_KEYS = (
    "healthy", "not healthy", "lost", "directory", "file", "bucket", "inline", "repaired", "repair failed",
    "unreadable",
)  # fmt: skip


class _Printer:
    """Prints results as they come; on a terminal, a progress line on stderr for deep checks."""

    def __init__(self, as_json: bool, deep: bool) -> None:
        self.as_json = as_json
        self.deep = deep
        self.progress = deep and sys.stderr.isatty()
        self.seen = 0
        self._drawn = 0.0

    def __call__(self, checked: Checked) -> None:
        self.seen += 1
        quiet = self.deep and checked.health.healthy and checked.after is None and not checked.health.corrupt
        if self.as_json:
            print(json.dumps(checked.as_json()), flush=True)
        elif not quiet:
            self._clear()
            for line in describe(checked):
                print(line, flush=True)
        if self.progress and time.monotonic() - self._drawn > 0.1:
            self._drawn = time.monotonic()
            sys.stderr.write(f"\rchecked {self.seen} objects")
            sys.stderr.flush()

    def literal(self, path: str) -> None:
        """A file whose bytes live in its cap or its directory entry: no node holds anything."""
        if self.as_json:
            print(json.dumps({"path": path, "kind": "literal", "state": "healthy", "healthy": True}))
        else:
            print(f"{path}: healthy: its bytes live in its cap or directory entry; no node is involved")

    def _clear(self) -> None:
        if self.progress:
            sys.stderr.write("\r\033[K")

    def finish(self) -> None:
        self._clear()


def describe(checked: Checked) -> list[str]:
    """Human lines for one result."""
    health = checked.health
    lines = [f"{checked.path}: {health.describe()}"]
    lines += [f"  corrupt: share {c.num} on {c.node.name}: {c.reason}" for c in health.corrupt]
    lines += [f"  {p}" for p in health.problems[:3]]
    if checked.repair is not None:
        lines.append(f"  repair: {checked.repair}")
    if checked.error is not None:
        lines.append(f"  repair failed: {checked.error}")
    if checked.after is not None:
        lines.append(f"  now {checked.after.describe()}")
    return lines


def summary_line(counts: dict[str, int]) -> str:
    total = counts["healthy"] + counts["not healthy"] + counts["lost"]
    kinds = f"{counts['directory']} directories, {counts['file']} files, {counts['bucket']} entry lists"
    line = f"checked {total} objects ({kinds}; {counts['inline']} small files kept inline): "
    line += f"{counts['healthy']} healthy, {counts['not healthy']} not healthy, {counts['lost']} lost"
    if counts["repaired"] or counts["repair failed"]:
        line += f"; repaired {counts['repaired']}, repair failed {counts['repair failed']}"
    if counts["unreadable"]:
        line += f"; {counts['unreadable']} could not be read"
    return line


def _mount_target(text: str) -> Target | None:
    """A TARGET that is a path inside a mount. A mount of this TAHOEFS_HOME gives its root cap and the
    path below it (so directories come with the write caps the mount has); any other tahoefs mount
    gives the path's read cap through its virtual xattr."""
    if text.startswith("tahoefs:") or not os.path.lexists(text):
        return None
    from tahoefs.cli.home import home_dir
    from tahoefs.fs.mount import mount_of, read_cap_of

    _push_pending(Path(text))
    found = mount_of(home_dir(), Path(text))
    if found is not None:
        return Target(parse_cap(found[0]), found[1], text)
    return Target(parse_cap(read_cap_of(Path(text))), [], text)


def _push_pending(path: Path) -> None:
    """fsync of a directory makes the mount push its journal to the grid and wait for the last PUTs of
    files already closed: the walk, which reads the grid, then sees names that were only in the journal,
    and shares that were still on their way."""
    folder = path if path.is_dir() else path.parent
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def check(
    config: GridConfig, secret: bytes, text: str, options: Options, deep: bool, as_json: bool
) -> bool:
    """Check TARGET; True when everything checked is healthy (after repair, with --repair)."""
    target = _mount_target(text) or parse_target(text)
    printer = _Printer(as_json, deep)
    if isinstance(target.cap, LiteralCap) and not target.path:
        printer.literal(label(text))
        return True
    async with GridClient(config, secret) as grid:
        checker = Checker(grid, options, printer)
        try:
            try:
                await _run(grid, checker, printer, target, deep)
            except NoSuchEntryError:
                if not os.path.lexists(text):
                    raise
                # A name the mount has not yet pushed to the grid (its journal flushes within seconds):
                # the mount still knows the object's read cap.
                from tahoefs.fs.mount import read_cap_of

                await _run(grid, checker, printer, Target(parse_cap(read_cap_of(Path(text))), [], text), deep)
        finally:
            printer.finish()
    counts = checker.counts
    if deep or counts["directory"]:
        if as_json:
            print(json.dumps({"summary": {key: counts[key] for key in SUMMARY_KEYS}}))
        else:
            print(summary_line(counts))
    return checker.all_healthy and not counts["unreadable"]


def label(text: str) -> str:
    """How a TARGET is shown in results: a cap is cut to its kind and first characters (it is long and,
    for a write cap, secret), followed by the path below it."""
    if not text.startswith("tahoefs:"):
        return text
    cap, slash, rest = text.partition("/")
    kind, _, body = cap.removeprefix("tahoefs:").partition(":v1:")
    return f"tahoefs:{kind}:{body[:8]}…" + slash + rest


async def _run(grid: GridClient, checker: Checker, printer: _Printer, target: Target, deep: bool) -> None:
    cap = target.cap
    path = label(target.text)
    if target.path:
        parent = await open_dir(grid, target, target.path[:-1])
        entry = await parent.lookup(target.path[-1])
        if entry is None:
            raise NoSuchEntryError(f"no such file or directory: {target.text}")
        if entry.kind == KIND_SYMLINK:
            raise UsageError(f"{target.text} is a symlink; check what it points to")
        cap = parent.child(entry).cap if entry.kind == KIND_DIR else parse_cap(entry_cap(entry))
    if isinstance(cap, LiteralCap):
        printer.literal(path)
        return
    if isinstance(cap, FileCap | VerifyCap):
        await checker.file(cap.verify_cap() if isinstance(cap, FileCap) else cap, path)
    elif isinstance(cap, DirVerifyCap):
        if deep:
            raise UsageError("--deep needs a directory read or write cap; a verify cap cannot list entries")
        await checker.directory_verify_cap(cap, path)
    elif isinstance(cap, DirWriteCap | DirReadCap):
        directory = Directory(grid, cap)
        if deep:
            await checker.walk(directory, path)
        else:
            _checked, buckets = await checker.directory(directory, path)
            if buckets:
                await checker.buckets(buckets, path)
    else:
        raise UsageError(f"{path}: cannot check this kind of cap")
