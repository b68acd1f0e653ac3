"""Directory commands without a mount: mkfs, ls, mkdir, and the DEST/SRC path forms of put and get.

A TARGET is a cap, `CAP/PATH` (caps never contain '/'), or `ALIAS:PATH` (`root:photos/2024`).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import trio

from tahoefs.cli import home
from tahoefs.cli.progress import Progress
from tahoefs.errors import NoSuchEntryError, NotADirError, UsageError
from tahoefs.formats.caps import DirReadCap, DirWriteCap, FileCap, LiteralCap, parse_cap
from tahoefs.formats.dirformat import INLINE_FILE_MAX, KIND_DIR, KIND_FILE, KIND_NAMES, KIND_SYMLINK, Entry
from tahoefs.grid.client import GridClient
from tahoefs.grid.config import GridConfig
from tahoefs.grid.delete import delete_file
from tahoefs.grid.directory import Directory
from tahoefs.grid.upload import upload

ALIAS_FILE = "aliases.toml"


# -- aliases -------------------------------------------------------------------------------------
def aliases_path() -> Path:
    return home.home_dir() / ALIAS_FILE


def load_aliases() -> dict[str, str]:
    path = aliases_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    table = data.get("aliases", {})
    return {str(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {}


def save_alias(name: str, cap: str) -> None:
    if not (name.isascii() and name.replace("-", "").replace("_", "").isalnum()):
        raise UsageError(f"alias names are letters, digits, '-' and '_': {name!r}")
    aliases = load_aliases()
    aliases[name] = cap
    path = aliases_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# tahoefs aliases: names for root capabilities. Keep this file secret.\n[aliases]\n")
        for key, value in sorted(aliases.items()):
            f.write(f'{key} = "{value}"\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- targets -------------------------------------------------------------------------------------
@dataclass
class Target:
    cap: object  # the starting cap
    path: list[bytes]  # components below it
    text: str


def parse_target(text: str) -> Target:
    """Split a TARGET into its starting cap and path components. Raises UsageError/BadCapError."""
    if text.startswith("tahoefs:"):
        cap_text, _, rest = text.partition("/")
        cap = parse_cap(cap_text)
    else:
        alias, sep, rest = text.partition(":")
        if not sep or not alias:
            raise UsageError(f"{text!r} is neither a cap nor ALIAS:PATH (e.g. root:photos)")
        aliases = load_aliases()
        if alias not in aliases:
            raise UsageError(f"no alias {alias!r} (create one with 'tahoefs mkfs --alias {alias}')")
        cap = parse_cap(aliases[alias])
    parts = [os.fsencode(p) for p in rest.split("/") if p not in ("", ".")]
    if any(p == b".." for p in parts):
        raise UsageError("'..' is not allowed in grid paths")
    return Target(cap, parts, text)


async def open_dir(grid: GridClient, target: Target, parts: list[bytes]) -> Directory:
    """Walk `parts` from the target's cap; every component must be a directory."""
    if not isinstance(target.cap, DirWriteCap | DirReadCap):
        raise NotADirError(f"{target.text}: the cap is not a directory")
    directory = Directory(grid, target.cap)
    walked: list[bytes] = []
    for part in parts:
        walked.append(part)
        entry = await directory.lookup(part)
        shown = b"/".join(walked).decode(errors="replace")
        if entry is None:
            raise NoSuchEntryError(f"no such file or directory: {shown}")
        if entry.kind != KIND_DIR:
            raise NotADirError(f"not a directory: {shown}")
        directory = directory.child(entry)
    return directory


def entry_cap(entry: Entry) -> str:
    """The read cap to show for an entry (inline files become literal caps)."""
    if entry.kind == KIND_FILE and not entry.cap:
        return str(LiteralCap(entry.inline))
    return entry.cap


def entry_json(entry: Entry) -> dict[str, object]:
    return {
        "name": os.fsdecode(entry.name),
        "kind": KIND_NAMES[entry.kind],
        "size": entry.size,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "mtime_ns": entry.mtime_ns,
        "ctime_ns": entry.ctime_ns,
        "cap": entry_cap(entry),
        "target": os.fsdecode(entry.target) if entry.kind == KIND_SYMLINK else None,
        "xattrs": {os.fsdecode(k): v.hex() for k, v in entry.xattrs.items()},
    }


def entry_line(entry: Entry, long: bool) -> str:
    name = os.fsdecode(entry.name)
    if not long:
        return name + ("/" if entry.kind == KIND_DIR else "")
    kind_bit = {KIND_FILE: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK}[entry.kind]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.mtime_ns / 1e9))
    line = (
        f"{stat.filemode(kind_bit | entry.mode)} {entry.uid:>5} {entry.gid:>5} {entry.size:>12} {when} {name}"
    )
    if entry.kind == KIND_SYMLINK:
        line += f" -> {os.fsdecode(entry.target)}"
    return line


# -- commands ------------------------------------------------------------------------------------
async def mkfs(config: GridConfig, secret: bytes) -> str:
    async with GridClient(config, secret) as grid:
        directory = await Directory.create(grid)
    return str(directory.cap)


async def mkdir(config: GridConfig, secret: bytes, text: str) -> str:
    target = parse_target(text)
    if not target.path:
        raise UsageError(f"{text}: give a path below the root, e.g. root:photos")
    async with GridClient(config, secret) as grid:
        parent = await open_dir(grid, target, target.path[:-1])
        now = time.time_ns()
        child = await parent.mkdir(target.path[-1], 0o755, os.getuid(), os.getgid(), now)
    return str(child.cap)


async def ls(config: GridConfig, secret: bytes, text: str, long: bool, as_json: bool) -> list[str]:
    """Print the entries of a directory (or the one entry of a file) in the directory's stored order,
    one bucket at a time; returns problems seen with nodes."""
    target = parse_target(text)
    async with GridClient(config, secret) as grid:
        if isinstance(target.cap, FileCap | LiteralCap) and not target.path:
            size = target.cap.size
            line = (
                json.dumps([{"kind": "file", "size": size, "cap": str(target.cap)}]) if as_json else str(size)
            )
            print(line)
            return []
        if target.path:
            parent = await open_dir(grid, target, target.path[:-1])
            entry = await parent.lookup(target.path[-1])
            if entry is None:
                raise NoSuchEntryError(f"no such file or directory: {text}")
            if entry.kind != KIND_DIR:
                print(json.dumps([entry_json(entry)]) if as_json else entry_line(entry, long))
                return parent.problems
            directory = parent.child(entry)
        else:
            directory = await open_dir(grid, target, [])
        first = True
        if as_json:
            sys.stdout.write("[")

        async def show(entries: list[Entry]) -> None:
            nonlocal first
            for entry in sorted(entries, key=lambda e: e.name):
                if as_json:
                    sys.stdout.write(("" if first else ",\n") + json.dumps(entry_json(entry)))
                else:
                    sys.stdout.write(entry_line(entry, long) + "\n")
                first = False

        await directory.scan(show)
        if as_json:
            sys.stdout.write("]\n")
        return directory.problems


async def put_at(config: GridConfig, secret: bytes, source: str, dest: str) -> str:
    """Upload `source` and link it at `dest` (into `dest` if that is a directory). Returns the cap."""
    target = parse_target(dest)
    src_stat = None
    if source == "-":
        raw = sys.stdin.buffer
    else:
        try:
            raw = open(source, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise UsageError(f"no such file: {source}") from None
        except IsADirectoryError:
            raise UsageError(f"{source} is a directory; put takes one file") from None
        src_stat = os.fstat(raw.fileno())
    try:
        async with GridClient(config, secret) as grid:
            if dest.endswith("/") and target.path:  # "DIR/": DIR must be an existing directory
                directory = await open_dir(grid, target, target.path)
                name = None
            else:
                directory = await open_dir(grid, target, target.path[:-1]) if target.path else None
                name = target.path[-1] if target.path else None
            if directory is not None and name is not None:
                existing = await directory.lookup(name)
                if existing is not None and existing.kind == KIND_DIR:
                    directory, name = directory.child(existing), None
            if directory is None:
                directory = await open_dir(grid, target, [])
            if name is None:
                if source == "-":
                    raise UsageError("with '-' as the source, DEST must name the new file")
                name = os.fsencode(Path(source).name)
            head = raw.read(INLINE_FILE_MAX + 1)
            now = time.time_ns()
            entry = Entry(
                name,
                KIND_FILE,
                mode=stat.S_IMODE(src_stat.st_mode) if src_stat else 0o644,
                uid=os.getuid(),
                gid=os.getgid(),
                mtime_ns=src_stat.st_mtime_ns if src_stat else now,
                ctime_ns=now,
            )
            if len(head) <= INLINE_FILE_MAX:
                entry.inline, entry.size = head, len(head)
                cap_text = str(LiteralCap(head))
            else:
                progress = Progress("put", src_stat.st_size if src_stat else None)
                try:
                    size = src_stat.st_size if src_stat and stat.S_ISREG(src_stat.st_mode) else None
                    cap = await upload(grid, _Prefixed(head, trio.wrap_file(raw)), progress.update, size)
                finally:
                    progress.finish()
                entry.cap, entry.size, cap_text = str(cap), cap.size, str(cap)
            replaced = await directory.link(entry, replace=True)
            if replaced is not None and replaced.cap and replaced.cap != entry.cap:
                old = parse_cap(replaced.cap)
                if isinstance(old, FileCap):
                    await delete_file(grid, old)  # only now that the directory no longer refers to it
            return cap_text
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()


class _Prefixed:
    """A ByteSource that yields `head` first, then the rest of `tail`."""

    def __init__(self, head: bytes, tail: object) -> None:
        self.head = head
        self.tail = tail

    async def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        return await self.tail.read(n)  # type: ignore[attr-defined]


async def resolve_file(config: GridConfig, secret: bytes, text: str) -> str:
    """The read cap (as text) of the file that `text` names."""
    target = parse_target(text)
    if not target.path:
        if isinstance(target.cap, DirWriteCap | DirReadCap):
            raise UsageError(f"{text} is a directory; get reads one file")
        return str(target.cap)
    async with GridClient(config, secret) as grid:
        parent = await open_dir(grid, target, target.path[:-1])
        entry = await parent.get(target.path[-1])
    if entry.kind == KIND_DIR:
        raise UsageError(f"{text} is a directory; get reads one file")
    if entry.kind == KIND_SYMLINK:
        raise UsageError(f"{text} is a symlink to {os.fsdecode(entry.target)}")
    return entry_cap(entry)
