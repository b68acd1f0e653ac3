"""The inode table: kernel inode numbers for directory entries, with the lookup counts the kernel holds.

An inode is created when the kernel first learns a name (lookup, create, mkdir, symlink, readdirplus)
and lives until the kernel forgets it (its lookup count drops to zero) and no file handle is open on it.
Each inode keeps the directory Entry it was found under, refreshed on every lookup, and for directories
the Directory object that reads and writes it.
"""

from __future__ import annotations

import copy
import stat
from dataclasses import dataclass, field

import pyfuse3

from tahoefs.formats.dirformat import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry
from tahoefs.grid.directory import Directory

ROOT_INODE = pyfuse3.ROOT_INODE
KIND_BITS = {KIND_FILE: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK}
ATTR_TIMEOUT = 1.0  # seconds the kernel may cache attributes and names


@dataclass
class Inode:
    ino: int
    parent: int  # the directory inode it was last seen in (the root's parent is itself)
    name: bytes
    entry: Entry
    lookups: int = 0
    open_handles: int = 0
    directory: Directory | None = None
    spool: object | None = None  # the Spool holding unsaved content, while open for writing
    children: dict[bytes, int] = field(default_factory=dict)  # names -> inodes we have handed out

    @property
    def is_dir(self) -> bool:
        return self.entry.kind == KIND_DIR


class InodeTable:
    def __init__(self, root_dir: Directory, root_entry: Entry) -> None:
        self.by_ino: dict[int, Inode] = {
            ROOT_INODE: Inode(ROOT_INODE, ROOT_INODE, b"", root_entry, lookups=1, directory=root_dir)
        }
        self._next = ROOT_INODE + 1

    def __getitem__(self, ino: int) -> Inode:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(2) from None  # ENOENT: a stale inode

    def remember(self, parent: Inode, entry: Entry, refresh: bool = True) -> Inode:
        """The inode for `entry` in `parent`, creating it or (with refresh, and unless it holds unsaved
        changes) refreshing its entry; counts one lookup. Keeps its own copy of the entry."""
        ino = parent.children.get(entry.name)
        node = self.by_ino.get(ino) if ino is not None else None
        if node is None or node.entry.kind != entry.kind:
            node = Inode(self._next, parent.ino, entry.name, copy.deepcopy(entry))
            self._next += 1
            self.by_ino[node.ino] = node
            parent.children[entry.name] = node.ino
        elif refresh and node.spool is None:
            node.entry = copy.deepcopy(entry)
        node.lookups += 1
        return node

    def detach(self, parent: Inode, name: bytes) -> None:
        """Forget that `name` in `parent` maps to an inode (after unlink/rename); the inode itself
        lives on until the kernel forgets it."""
        parent.children.pop(name, None)

    def attach(self, parent: Inode, node: Inode, name: bytes) -> None:
        old = parent.children.get(name)
        if old is not None and old != node.ino and old in self.by_ino:
            self.by_ino[old].parent = 0  # replaced: no longer reachable by name
        parent.children[name] = node.ino
        node.parent, node.name = parent.ino, name
        node.entry.name = name

    def forget(self, ino: int, count: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def release(self, node: Inode) -> None:
        node.open_handles -= 1
        self._maybe_drop(node)

    def _maybe_drop(self, node: Inode) -> None:
        if node.lookups == 0 and node.open_handles == 0 and node.spool is None:
            del self.by_ino[node.ino]
            parent = self.by_ino.get(node.parent)
            if parent is not None and parent.children.get(node.name) == node.ino:
                del parent.children[node.name]


def attributes(node: Inode) -> pyfuse3.EntryAttributes:
    e = node.entry
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = node.ino
    attr.generation = 0
    attr.entry_timeout = ATTR_TIMEOUT
    attr.attr_timeout = ATTR_TIMEOUT
    attr.st_mode = KIND_BITS[e.kind] | (e.mode & 0o7777)
    attr.st_nlink = 2 if e.kind == KIND_DIR else 1
    attr.st_uid = e.uid
    attr.st_gid = e.gid
    attr.st_rdev = 0
    size = e.size if e.kind != KIND_SYMLINK else len(e.target)
    attr.st_size = size
    attr.st_blksize = 128 * 1024
    attr.st_blocks = (size + 511) // 512
    attr.st_atime_ns = e.mtime_ns
    attr.st_mtime_ns = e.mtime_ns
    attr.st_ctime_ns = e.ctime_ns
    return attr
