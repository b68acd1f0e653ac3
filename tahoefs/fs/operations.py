"""The pyfuse3 handlers: POSIX calls mapped onto directories and files on the grid.

Every namespace change (create, mkdir, symlink, unlink, rmdir, rename, setattr, setxattr) is recorded
in the crash-safe local journal (fs/journal.py) before the call returns and pushed to the grid in
batches; fsync of a directory and unmount wait until it is on the grid. File content goes to a spool
file; flush/fsync (the app's close or fsync) uploads it to at least `happy` nodes and journals the new
entry before returning. Errors are mapped to errno in one place (`_errno`).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import trio

from tahoefs.errors import (
    GridError,
    GridFullError,
    PathError,
    ReadOnlyError,
    TahoefsError,
    UsageError,
)
from tahoefs.formats.caps import DirWriteCap, FileCap, LiteralCap, parse_cap
from tahoefs.formats.dirformat import (
    INLINE_FILE_MAX,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    MAX_XATTRS_PER_ENTRY,
    Entry,
    encode_own,
    seal_write_cap,
    unseal_write_cap,
)
from tahoefs.fs.inodes import ROOT_INODE, Inode, InodeTable, attributes
from tahoefs.fs.journal import OWN, Journal, decode_entry_b64, encode_entry_b64
from tahoefs.fs.readcache import ReadCache
from tahoefs.fs.spool import CHUNK, Spool, SpoolPool, file_source, leftovers
from tahoefs.grid.client import GridClient
from tahoefs.grid.delete import delete_file
from tahoefs.grid.directory import Directory
from tahoefs.grid.streams import Lingering
from tahoefs.grid.upload import upload
from tahoefs.limits import UPLOAD_LINGER_BYTES

log = logging.getLogger("tahoefs.fs")
CAP_XATTR = b"user.tahoefs.cap"  # virtual, read-only: the read cap of a file or directory


@contextlib.contextmanager
def _errno() -> Iterator[None]:
    """Map tahoefs errors to FUSE errnos: the only place this happens."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except ReadOnlyError:
        raise pyfuse3.FUSEError(errno.EROFS) from None
    except PathError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EINVAL) from None
    except GridFullError as exc:
        log.error("grid full: %s", exc)
        raise pyfuse3.FUSEError(errno.ENOSPC) from None
    except (GridError, TahoefsError) as exc:
        log.error("grid error: %s", exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except ValueError as exc:  # a name or entry no directory may hold
        log.info("invalid: %s", exc)
        raise pyfuse3.FUSEError(errno.EINVAL) from None
    except OSError as exc:
        log.error("local I/O error: %s", exc)
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    except Exception:
        log.exception("bug in a filesystem handler; answering EIO")  # never take the mount down
        raise pyfuse3.FUSEError(errno.EIO) from None


def _guarded(method):
    """Run a pyfuse3 handler under _errno(), so no exception escapes into pyfuse3's main loop."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        with _errno():
            return await method(*args, **kwargs)

    return wrapper


class Handle:
    def __init__(self, node: Inode, writable: bool) -> None:
        self.node = node
        self.writable = writable


class TahoeFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, grid: GridClient, root: Directory, root_entry: Entry, spool_dir: Path, read_only: bool
    ) -> None:
        super().__init__()
        self.grid = grid
        self.table = InodeTable(root, root_entry)
        self.spool_dir = spool_dir
        self.spools = SpoolPool(spool_dir)
        self.read_only = read_only
        self.handles: dict[int, Handle] = {}
        self.listings: dict[int, list[Entry]] = {}
        self._next_fh = 1
        self.cache: ReadCache | None = None
        self.uploads_in_flight: dict[str, int] = {}
        self.errors: list[str] = []
        self.dirs: dict[str, Directory] = {str(root.cap): root}
        self.journal: Journal | None = None
        self.lingering: Lingering | None = None  # see start()

    def start(self, nursery: trio.Nursery, journal: Journal | None) -> None:
        self.cache = ReadCache(self.grid, nursery)
        self.journal = journal
        self.lingering = Lingering(nursery, UPLOAD_LINGER_BYTES)

    async def stop_lingering(self) -> None:
        """Wait for the PUTs of uploads that already returned (at most one stall timeout: the rest are
        then cancelled with the mount's nursery; their files keep at least `happy` shares); later
        uploads wait for all of theirs."""
        if self.lingering is not None:
            with trio.move_on_after(self.grid.stall_timeout):
                await self.lingering.wait_idle()
            self.lingering = None

    async def apply_changes(self, dir_cap: str, changes: dict[bytes, Entry | None]) -> None:
        """The journal's grid step: one new version of one directory with all these changes."""
        directory = self.dirs.get(dir_cap)
        if directory is None:
            cap = parse_cap(dir_cap)
            assert isinstance(cap, DirWriteCap)
            directory = self.dirs[dir_cap] = Directory(self.grid, cap)
        own = changes.get(OWN)  # the root's own attributes, carried by the directory itself
        await directory.modify_many(
            {name: (lambda _old, e=e: e) for name, e in changes.items() if name != OWN}, own=own
        )

    async def drop_caps(self, caps: list[str]) -> None:
        """Delete the shares of files no directory refers to any more (their change is on the grid)."""
        for text in caps:
            if any(n.entry.cap == text and n.open_handles for n in self.table.by_ino.values()):
                continue  # still open somewhere; left for garbage collection (planned)
            cap = parse_cap(text)
            if isinstance(cap, FileCap):
                if self.cache is not None:
                    self.cache.drop(text)
                if self.lingering is not None:
                    await self.lingering.settle(cap.storage_index)  # its last PUTs, if any, first
                await delete_file(self.grid, cap)

    # -- helpers ---------------------------------------------------------------------------------
    def _dir(self, node: Inode) -> Directory:
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if node.directory is None:
            parent = self.table[node.parent]
            child = self._dir(parent).child(node.entry)
            node.directory = self.dirs.setdefault(str(child.cap), child)
        return node.directory

    def _record(self, parent: Inode, name: bytes, entry: Entry | None, drop: list[str] | None = None) -> None:
        """Make a change of `parent` durable (journal) and visible (overlay) before returning; the name
        OWN stands for `parent`'s own attributes."""
        directory = self._dir(parent)
        if not isinstance(directory.cap, DirWriteCap) or self.journal is None:
            raise ReadOnlyError("this directory is read-only")
        if name == OWN:
            assert entry is not None
            self.journal.record_own(str(directory.cap), entry)
        else:
            self.journal.record(str(directory.cap), name, entry, drop)

    async def _entry(self, parent: Inode, name: bytes) -> Entry | None:
        """The entry called `name` in `parent`: pending changes first, then the grid."""
        directory = self._dir(parent)
        if self.journal is not None:
            known, entry = self.journal.lookup(str(directory.cap), name)
            if known:
                return copy.deepcopy(entry)
        return await directory.lookup(name)

    async def _must_be_new(self, parent: Inode, name: bytes) -> None:
        """Checks a name for a new entry, before any grid work: valid, writable parent, not taken."""
        _check_name(name)
        if not isinstance(self._dir(parent).cap, DirWriteCap):
            raise pyfuse3.FUSEError(errno.EROFS)
        if await self._entry(parent, name) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)

    async def _get(self, parent: Inode, name: bytes) -> Entry:
        entry = await self._entry(parent, name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def _listing(self, node: Inode) -> list[Entry]:
        directory = self._dir(node)
        listing: list[Entry] = []

        async def sink(entries: list[Entry]) -> None:
            listing.extend(entries)

        await directory.scan(sink)
        overlay = self.journal.overlay(str(directory.cap)) if self.journal is not None else {}
        if overlay:
            listing = [e for e in listing if e.name not in overlay]
            listing += [copy.deepcopy(e) for e in overlay.values() if e is not None]
        return listing

    def _writable(self) -> None:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    def _new_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        handle.node.open_handles += 1
        return fh

    async def _refresh_root(self, node: Inode) -> None:
        """Before a change of the root's own attributes: start from the newest, so that a change made
        through another mount since this one started is not overwritten with this mount's old copy."""
        directory = self._dir(node)
        if self.journal is not None and OWN in self.journal.pending.get(str(directory.cap), {}):
            return  # ours, not on the grid yet, is the newest
        own = await directory.own()
        if own is not None:
            node.entry = own

    async def _publish(self, node: Inode, entry: Entry) -> None:
        """Record `entry` for `node` in its parent directory (replacing what was there); for the root,
        which has no parent, as the root directory's own attributes."""
        if node.ino == ROOT_INODE:
            self._record(node, OWN, entry)
        else:
            self._record(self.table[node.parent], node.name, entry)
        node.entry = entry

    def _error(self, text: str) -> None:
        self.errors = [*self.errors, f"{time.strftime('%H:%M:%S')} {text}"][-20:]

    # -- names -----------------------------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _errno():
            parent = self.table[parent_inode]
            if name == b".":
                parent.lookups += 1
                return attributes(parent)
            if name == b"..":
                up = self.table[parent.parent]
                up.lookups += 1
                return attributes(up)
            _check_name(name)
            entry = await self._get(parent, name)
            if self.journal is not None and parent.is_dir:
                # A change recorded while we were reading the grid is newer than what we read.
                known, newer = self.journal.lookup(str(self._dir(parent).cap), name)
                if known:
                    if newer is None:
                        raise pyfuse3.FUSEError(errno.ENOENT)
                    entry = newer
            return attributes(self.table.remember(parent, entry))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return attributes(self.table[inode])

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.table.forget(ino, count)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.table[inode]
        if node.entry.kind != KIND_SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with _errno():
            node = self.table[inode]
            listing = await self._listing(node)
            fh = self._new_fh(Handle(node, False))
            self.listings[fh] = listing  # a snapshot: offsets stay stable while the handle is open
            return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self.handles[fh].node
        listing = self.listings[fh]
        for index in range(start_id, len(listing)):
            entry = listing[index]
            child = self.table.remember(node, entry, refresh=False)  # the snapshot may be older
            if not pyfuse3.readdir_reply(token, entry.name, attributes(child), index + 1):
                self.table.forget(child.ino, 1)
                break

    async def releasedir(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        self.listings.pop(fh, None)
        self.table.release(handle.node)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Push every pending directory change to the grid (not just the journal); EIO if that takes
        longer than three stall timeouts. Also wait (up to one stall timeout, without failing) for the
        last PUTs of uploads whose close() already returned at `happy` nodes, so that after an fsync of
        a folder the files written before it are on all n nodes unless a node is down or stalls."""
        if self.journal is not None:
            with trio.move_on_after(3 * self.grid.stall_timeout) as pushing:
                await self.journal.wait_idle()
            if pushing.cancelled_caught:
                raise pyfuse3.FUSEError(errno.EIO)
        if self.lingering is not None:
            with trio.move_on_after(self.grid.stall_timeout):
                await self.lingering.wait_current()

    # -- creating and removing -------------------------------------------------------------------
    def _new_entry(self, name: bytes, kind: int, mode: int, ctx: pyfuse3.RequestContext) -> Entry:
        now = time.time_ns()
        return Entry(name, kind, mode & 0o7777, ctx.uid, ctx.gid, 0, now, now)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        with _errno():
            parent = self.table[parent_inode]
            await self._must_be_new(parent, name)
            child = await Directory.create(self.grid)  # an empty directory on the grid
            assert isinstance(child.cap, DirWriteCap)
            self.dirs[str(child.cap)] = child
            entry = self._dir(parent).child_entry(
                name, child.cap, mode & 0o7777, ctx.uid, ctx.gid, time.time_ns()
            )
            self._record(parent, name, entry)
            return attributes(self.table.remember(parent, entry))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        with _errno():
            parent = self.table[parent_inode]
            await self._must_be_new(parent, name)
            entry = self._new_entry(name, KIND_SYMLINK, 0o777, ctx)
            entry.target = target
            self._record(parent, name, entry)
            return attributes(self.table.remember(parent, entry))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._writable()
        with _errno():
            parent = self.table[parent_inode]
            await self._must_be_new(parent, name)
            entry = self._new_entry(name, KIND_FILE, mode, ctx)
            self._record(parent, name, entry)  # visible and durable now, empty
            node = self.table.remember(parent, entry)
            spool = self.spools.new()
            spool.start_from(0)  # a new, empty file: no base content
            node.spool = spool
            fh = self._new_fh(Handle(node, True))
            return pyfuse3.FileInfo(fh=fh), attributes(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        with _errno():
            parent = self.table[parent_inode]
            entry = await self._get(parent, name)
            if entry.kind == KIND_DIR:
                raise pyfuse3.FUSEError(errno.EISDIR)
            self._record(parent, name, None, _content_caps(entry))
            self.table.detach(parent, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        with _errno():
            parent = self.table[parent_inode]
            entry = await self._get(parent, name)
            if entry.kind != KIND_DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            probe = Inode(0, parent.ino, name, entry)
            if await self._listing(probe):
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self._record(parent, name, None)
            self.table.detach(parent, name)
            # The empty child's own versions stay on the grid until garbage collection (planned).

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        with _errno():
            _check_name(name_new)
            old_parent, new_parent = self.table[parent_inode_old], self.table[parent_inode_new]
            old_dir, new_dir = self._dir(old_parent), self._dir(new_parent)
            entry = await self._get(old_parent, name_old)
            target = await self._entry(new_parent, name_new)
            if target is not None:
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise pyfuse3.FUSEError(errno.EEXIST)
                if target.kind == KIND_DIR and entry.kind != KIND_DIR:
                    raise pyfuse3.FUSEError(errno.EISDIR)
                if entry.kind == KIND_DIR and target.kind != KIND_DIR:
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
                if target.kind == KIND_DIR and await self._listing(
                    Inode(0, new_parent.ino, name_new, target)
                ):
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            if old_parent.ino == new_parent.ino and name_old == name_new:
                return
            moved = copy.deepcopy(entry)
            moved.name = name_new
            moved.ctime_ns = time.time_ns()
            if old_parent.ino != new_parent.ino and entry.kind == KIND_DIR and entry.sealed_write_cap:
                # A child's write cap is sealed with its parent's key: re-seal it for the new parent.
                if not isinstance(old_dir.cap, DirWriteCap) or not isinstance(new_dir.cap, DirWriteCap):
                    raise ReadOnlyError("cannot move a directory out of or into a read-only one")
                write_cap = unseal_write_cap(old_dir.cap.seed, entry.sealed_write_cap)
                moved.sealed_write_cap = seal_write_cap(new_dir.cap.seed, write_cap)
            replaced_caps = _content_caps(target) if target is not None and target.cap != entry.cap else []
            self._record(new_parent, name_new, moved, replaced_caps)  # the new name first: never lost
            self._record(old_parent, name_old, None)
            node_ino = old_parent.children.get(name_old)
            self.table.detach(old_parent, name_old)
            if node_ino is not None and node_ino in self.table.by_ino:
                node = self.table.by_ino[node_ino]
                self.table.attach(new_parent, node, name_new)
                if node.spool is None or not node.spool.dirty:
                    node.entry = copy.deepcopy(moved)
                else:
                    node.entry.sealed_write_cap, node.entry.ctime_ns = moved.sealed_write_cap, moved.ctime_ns
                node.directory = None  # reopened from the new parent (its write cap is sealed anew)
            else:
                self.table.detach(new_parent, name_new)

    # -- attributes ------------------------------------------------------------------------------
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        with _errno():
            node = self.table[inode]
            if node.ino == ROOT_INODE:
                await self._refresh_root(node)
            entry = copy.deepcopy(node.entry)
            now = time.time_ns()
            if fields.update_mode:
                entry.mode = attr.st_mode & 0o7777
            if fields.update_uid:
                entry.uid = attr.st_uid
            if fields.update_gid:
                entry.gid = attr.st_gid
            if fields.update_mtime:
                entry.mtime_ns = attr.st_mtime_ns
            entry.ctime_ns = now
            if fields.update_size:
                if entry.kind != KIND_FILE:
                    raise pyfuse3.FUSEError(errno.EINVAL)
                spool = await self._spool(node)
                if attr.st_size % CHUNK:  # the chunk the new end cuts through keeps its start
                    cut = attr.st_size - attr.st_size % CHUNK
                    await self._fill(spool, cut, attr.st_size)
                spool.truncate(attr.st_size)
                entry.size = attr.st_size
                if not fields.update_mtime:
                    entry.mtime_ns = now
                node.entry = entry
                if node.open_handles == 0 or fh is None:
                    await self._commit(node)
                    if node.open_handles == 0 and isinstance(node.spool, Spool) and not node.spool.dirty:
                        node.spool.discard()
                        node.spool = None
                return attributes(node)
            if node.spool is not None and node.spool.dirty:
                node.entry = entry  # published with the content at flush
            else:
                await self._publish(node, entry)
            return attributes(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stat = pyfuse3.StatvfsData()
        free = total = 0
        async with trio.open_nursery() as nursery:
            for node in self.grid.nodes:

                async def ask(node=node) -> None:
                    nonlocal free, total
                    with contextlib.suppress(TahoefsError), trio.move_on_after(2):
                        info = await node.version()
                        free += int(info.get("free_bytes", 0))
                        total += int(info.get("total_bytes", 0))

                nursery.start_soon(ask)
        expansion = self.grid.total / self.grid.needed
        stat.f_bsize = stat.f_frsize = 4096
        stat.f_blocks = int(total / expansion) // 4096
        stat.f_bfree = stat.f_bavail = int(free / expansion) // 4096
        stat.f_files = stat.f_ffree = stat.f_favail = 1 << 32
        stat.f_namemax = 255
        return stat

    # -- xattrs ----------------------------------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.table[inode]
        if name == CAP_XATTR:
            return self._read_cap(node).encode()
        value = node.entry.xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    def _read_cap(self, node: Inode) -> str:
        if node.is_dir:
            return str(self._dir(node).cap.read_cap())
        if node.entry.kind == KIND_FILE and not node.entry.cap:
            return str(LiteralCap(node.entry.inline))
        return node.entry.cap

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return sorted(self.table[inode].entry.xattrs)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        if not name.startswith(b"user.") or name == CAP_XATTR:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if len(value) > MAX_XATTR_VALUE:
            raise pyfuse3.FUSEError(errno.E2BIG)
        if len(name) > MAX_XATTR_NAME:
            raise pyfuse3.FUSEError(errno.ERANGE)
        xattrs = self.table[inode].entry.xattrs
        if name not in xattrs and len(xattrs) >= MAX_XATTRS_PER_ENTRY:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        await self._change_xattrs(inode, lambda x: x.__setitem__(name, value))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        if name not in self.table[inode].entry.xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self._change_xattrs(inode, lambda x: x.pop(name))

    async def _change_xattrs(self, inode: int, change) -> None:
        with _errno():
            node = self.table[inode]
            if node.ino == ROOT_INODE:
                await self._refresh_root(node)
            entry = copy.deepcopy(node.entry)
            change(entry.xattrs)
            entry.ctime_ns = time.time_ns()
            if node.ino == ROOT_INODE:
                try:
                    encode_own(entry)  # the root keeps its xattrs in its own version (OWN_MAX_BYTES)
                except ValueError:
                    raise pyfuse3.FUSEError(errno.ENOSPC) from None
            if node.spool is not None and node.spool.dirty:
                node.entry = entry
            else:
                await self._publish(node, entry)

    # -- file content ----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.table[inode]
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            self._writable()
            parent = self.table.by_ino.get(node.parent)
            if parent is not None and not isinstance(self._dir(parent).cap, DirWriteCap):
                raise pyfuse3.FUSEError(errno.EROFS)  # inside a directory we only hold a read cap for
        with _errno():
            if flags & os.O_TRUNC and writable:
                spool = await self._spool(node)
                spool.truncate(0)
                node.entry.size = 0
            fh = self._new_fh(Handle(node, bool(writable)))
            # The kernel may keep cached pages only while nobody changes the file through us.
            return pyfuse3.FileInfo(fh=fh, keep_cache=node.spool is None)

    async def _spool(self, node: Inode) -> Spool:
        """The node's spool, created on first need. It holds the committed content only where filled
        (`_fill`): an edit fetches just the chunks it touches."""
        if node.spool is None:
            spool = self.spools.new()
            spool.start_from(node.entry.size)
            spool.base_entry = copy.deepcopy(node.entry)
            node.spool = spool
        assert isinstance(node.spool, Spool)
        return node.spool

    async def _fill(
        self, spool: Spool, start: int, end: int, overwrite: tuple[int, int] | None = None
    ) -> None:
        """Fetch the base chunks in [start, end) that are not in the spool yet; chunks wholly inside
        `overwrite` (a range about to be written) are only marked present."""
        for chunk in spool.missing(start, end):
            base = spool.base_entry
            assert isinstance(base, Entry)
            c_start, c_end = chunk * CHUNK, min((chunk + 1) * CHUNK, spool.base_size)
            if overwrite is not None and overwrite[0] <= c_start and overwrite[1] >= c_end:
                spool.present.add(chunk)
                continue
            spool.fill(chunk, await self._read_committed(base, c_start, c_end - c_start))

    async def _read_committed(self, entry: Entry, offset: int, size: int) -> bytes:
        if not entry.cap:
            return entry.inline[offset : offset + size]
        cap = parse_cap(entry.cap)
        if isinstance(cap, LiteralCap):
            return cap.data[offset : offset + size]
        if not isinstance(cap, FileCap):
            raise UsageError("entry cap is not a file cap")
        assert self.cache is not None
        return await self.cache.read(cap, offset, size)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with _errno():
            node = self.handles[fh].node
            spool = node.spool
            if isinstance(spool, Spool) and spool.loaded:
                size = min(size, max(0, spool.size - off))
                await self._fill(spool, off, off + size)
                return spool.pread(off, size)
            return await self._read_committed(node.entry, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        with _errno():
            spool = await self._spool(handle.node)
            await self._fill(spool, off, off + len(buf), overwrite=(off, off + len(buf)))
            written = spool.pwrite(off, buf)
            node = handle.node
            node.entry.size = spool.size
            node.entry.mtime_ns = node.entry.ctime_ns = time.time_ns()
            return written

    async def _commit(self, node: Inode) -> None:
        """Upload a dirty spool and record the new content in the directory. On failure the spool
        stays (on disk, described) and the error reaches the caller. Writes that arrive during the
        upload keep the spool dirty for the next flush; a file unlinked meanwhile is not brought back."""
        spool = node.spool
        if not isinstance(spool, Spool) or not spool.dirty:
            return
        if self._orphaned(node):
            spool.dirty = False  # unlinked or replaced while open: nothing to save, nowhere to put it
            return
        await self._fill(spool, 0, spool.size)  # the rest of the old content, a chunk at a time
        target = os.fsdecode(node.name)
        snapshot, size = spool.version, spool.size
        try:
            if size <= INLINE_FILE_MAX:
                inline, cap_text = spool.pread(0, size), ""
            else:
                self.uploads_in_flight[target] = 0

                def progress(done: int) -> None:
                    self.uploads_in_flight[target] = done

                cap = await upload(self.grid, spool.source(), progress, size, self.lingering)
                inline, cap_text = b"", str(cap)
            old = None
            if not self._orphaned(node):
                old = await self._entry(self.table[node.parent], node.name)
            # No await from here to the record: a rename now cannot put the entry under another name.
            if self._orphaned(node):
                if cap_text:
                    await self.drop_caps([cap_text])
                spool.dirty = False
                return
            parent = self.table[node.parent]
            entry = copy.deepcopy(node.entry)  # metadata changed during the upload is kept
            entry.name = node.name
            entry.size, entry.inline, entry.cap = size, inline, cap_text
            self._record(parent, node.name, entry, _content_caps(old) if old and old.cap != entry.cap else [])
        except TahoefsError as exc:
            self._error(f"saving {target} failed: {exc}")
            if not self._orphaned(node):
                # Kept for a retry: by a later flush here, or by the next mount if this one dies.
                spool.describe(
                    str(self._dir(self.table[node.parent]).cap), node.name, encode_entry_b64(node.entry)
                )
            raise
        finally:
            self.uploads_in_flight.pop(target, None)
        if spool.version == snapshot:
            node.entry = entry
            spool.dirty = False
        else:
            node.entry.inline, node.entry.cap = entry.inline, entry.cap  # newer writes: still dirty

    def _orphaned(self, node: Inode) -> bool:
        parent = self.table.by_ino.get(node.parent)
        return parent is None or parent.children.get(node.name) != node.ino

    async def flush(self, fh: int) -> None:
        with _errno():
            handle = self.handles[fh]
            if handle.writable:
                await self._commit(handle.node)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        node = handle.node
        spool = node.spool
        if isinstance(spool, Spool) and node.open_handles == 1 and not spool.dirty:
            spool.discard()
            node.spool = None
        self.table.release(node)

    def pending_changes(self) -> int:
        return self.journal.count() if self.journal is not None else 0

    async def pending(self) -> list[str]:
        """Targets of spools whose content is not on the grid yet."""
        return [
            os.fsdecode(n.name)
            for n in self.table.by_ino.values()
            if isinstance(n.spool, Spool) and n.spool.dirty
        ]

    async def save_leftovers(self) -> int:
        """Save content a dead mount left in described spools (its flush had not finished): upload
        it and link it where it belonged. Returns how many were saved; failures stay for next time."""
        saved = 0
        for data, meta in leftovers(self.spool_dir):
            try:
                entry = decode_entry_b64(meta["entry"])
                size = data.stat().st_size
                entry.size = size
                if size <= INLINE_FILE_MAX:
                    entry.inline, entry.cap = data.read_bytes(), ""
                else:
                    entry.inline = b""
                    entry.cap = str(await upload(self.grid, file_source(data), None, size))
                directory = self.dirs.get(meta["dir"]) or Directory(self.grid, parse_cap(meta["dir"]))  # type: ignore[arg-type]

                def put_back(old: Entry | None, entry: Entry = entry) -> Entry | None:
                    # Deleted (or replaced by a non-file) since: the leftover is not resurrected.
                    return entry if old is not None and old.kind == KIND_FILE else old

                await directory.modify(bytes.fromhex(meta["name"]), put_back)
            except (TahoefsError, OSError, ValueError, KeyError) as exc:
                log.error("could not save leftover spool %s: %s", data.name, exc)
                continue
            data.unlink(missing_ok=True)
            data.with_suffix(".json").unlink(missing_ok=True)
            saved += 1
        return saved

    async def commit_all(self) -> None:
        """Push every dirty spool, and give back every clean one (at unmount: a RELEASE the kernel
        had not sent yet must not leave a spool file behind). Spools whose push failed stay."""
        for node in list(self.table.by_ino.values()):
            if isinstance(node.spool, Spool) and node.spool.dirty:
                with contextlib.suppress(TahoefsError, pyfuse3.FUSEError):
                    await self._commit(node)
            if isinstance(node.spool, Spool) and not node.spool.dirty:
                node.spool.discard()
                node.spool = None


def _check_name(name: bytes) -> None:
    if len(name) > 255:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise pyfuse3.FUSEError(errno.EINVAL)


def _content_caps(entry: Entry | None) -> list[str]:
    """The file cap whose shares can go once `entry` is no longer referenced."""
    if entry is None or entry.kind != KIND_FILE or not entry.cap.startswith("tahoefs:file:"):
        return []
    return [entry.cap]


HANDLERS = """lookup getattr forget readlink opendir readdir releasedir fsyncdir mkdir symlink create unlink
rmdir rename setattr statfs getxattr listxattr setxattr removexattr open read write flush fsync release"""
for _name in HANDLERS.split():
    setattr(TahoeFS, _name, _guarded(getattr(TahoeFS, _name)))
