"""Directories on the grid: a mutable object whose versions hold a bucket index (formats/dirformat.py).

Reading one entry costs the root plus one bucket; listing streams bucket by bucket; changing one entry
rewrites one bucket (uploaded as a small immutable file unless it fits inside the root) and publishes a
new root. Every change goes through `modify`, which re-reads and re-applies the change when another
writer published first, so concurrent writers never drop each other's work.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from tahoefs.errors import (
    BadCapError,
    EntryExistsError,
    GridError,
    IntegrityError,
    NoSuchEntryError,
    NotEnoughSharesError,
    ReadOnlyError,
    UsageError,
)
from tahoefs.formats.caps import DirReadCap, DirWriteCap, FileCap, LiteralCap, parse_cap
from tahoefs.formats.dirformat import (
    BUCKET_REF_HEADER,
    BUCKET_SPLIT_BYTES,
    HASH_SPACE,
    KIND_DIR,
    MAX_BUCKET_BYTES,
    ROOT_INLINE_MAX,
    BucketRef,
    Entry,
    bucket_index,
    check_name,
    decode_bucket,
    decode_root_own,
    encode_bucket,
    encode_own,
    encode_root,
    name_hash,
    seal_write_cap,
    split_entries,
    unseal_write_cap,
)
from tahoefs.formats.mutable import MAX_VERSION_BYTES
from tahoefs.grid.client import GridClient
from tahoefs.grid.delete import delete_file
from tahoefs.grid.download import FileReader
from tahoefs.grid.mutable import ConflictError, MutableObject, Version, delete_versions
from tahoefs.grid.upload import BytesSource, upload

MAX_ATTEMPTS = 30
FRESH_SECONDS = 5.0  # how old a directory version reads may use
# Decoded buckets kept for lookups and changes, the ones read and the ones written, shared by every
# Directory of the process and bounded by the bytes of their encodings (a decoded bucket takes several
# times that): without it every lookup of a name decoded its whole bucket again, 6.7 ms for a name in a
# 10,000-entry folder (an lstat after the kernel's 1 s), and every change fetched back from the grid the
# bucket it had just written.
BUCKET_CACHE_BYTES = 4 * 1024 * 1024
Change = Callable[["Entry | None"], "Entry | None"]
Piece = tuple[int, list[Entry], bytes]  # a bucket to store: its lo, its entries, their encoding
EMPTY_ROOT = encode_root([BucketRef(0, 0, inline=encode_bucket([]))])


def _copy_entry(entry: Entry) -> Entry:
    """A copy a caller may change (every field but xattrs is immutable)."""
    return dataclasses.replace(entry, xattrs=dict(entry.xattrs))


class _BucketCache:
    """Decoded buckets by key (a bucket's cap, or an inline bucket's bytes), least recently used out
    first once their encodings pass `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[str | bytes, tuple[dict[bytes, Entry], int]] = OrderedDict()

    def get(self, key: str | bytes) -> dict[bytes, Entry] | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str | bytes, entries: dict[bytes, Entry], size: int) -> None:
        if key in self._items:
            return
        self._items[key] = (entries, size)
        self.size += size
        while self.size > self.limit and len(self._items) > 1:
            _key, (_entries, old_size) = self._items.popitem(last=False)
            self.size -= old_size


_BUCKETS = _BucketCache(BUCKET_CACHE_BYTES)


def drop_bucket_cache() -> None:
    """Forget every decoded bucket, as a new process would start (benchmarks of a fresh reader)."""
    global _BUCKETS
    _BUCKETS = _BucketCache(BUCKET_CACHE_BYTES)


def _own_size(own: Entry | None) -> int:
    """Bytes a directory's own attributes take in its root (their length field included)."""
    return 0 if own is None else 4 + len(encode_own(own))


def _pieces(lo: int, entries: list[Entry]) -> list[Piece]:
    """The bucket starting at `lo` holding `entries`, split when its encoding is over BUCKET_SPLIT_BYTES:
    (lo, entries, encoding) per piece."""
    encoded = encode_bucket(entries)
    if len(encoded) <= BUCKET_SPLIT_BYTES:
        return [(lo, entries, encoded)]
    return [(piece_lo, piece, encode_bucket(piece)) for piece_lo, piece in split_entries(lo, entries)]


class Directory:
    """One directory, writable if opened with its write cap. Use inside trio."""

    def __init__(self, grid: GridClient, cap: DirWriteCap | DirReadCap) -> None:
        self.grid = grid
        self.cap = cap
        self.obj = MutableObject(grid, cap)
        self._cached: tuple[Version, list[BucketRef], float] | None = None
        self._own: Entry | None = None  # the cached version's own attributes (a tree's root only)

    @property
    def writable(self) -> bool:
        return isinstance(self.cap, DirWriteCap)

    @property
    def problems(self) -> list[str]:
        return self.obj.problems

    @classmethod
    async def create(cls, grid: GridClient) -> Directory:
        """A new, empty directory, published on the grid (at least a quorum of nodes)."""
        directory = cls(grid, DirWriteCap(os.urandom(32)))
        version = await directory.obj.publish(EMPTY_ROOT, None)
        directory._cached = (version, decode_root_own(EMPTY_ROOT)[0], trio.current_time())
        return directory

    # -- reading ---------------------------------------------------------------------------------
    async def _load(self, fresh: bool = False) -> tuple[Version, list[BucketRef]]:
        """The current version and its bucket index. Reads use a version at most FRESH_SECONDS old
        (as long as the kernel caches names anyway); writers use it optimistically, because publish's
        test-and-set catches a stale base and modify_many then reloads with fresh=True."""
        now = trio.current_time()
        if not fresh and self._cached is not None and now - self._cached[2] < FRESH_SECONDS:
            return self._cached[0], self._cached[1]
        version = await self.obj.retrieve()
        try:
            buckets, own = decode_root_own(version.plaintext)
        except ValueError as exc:
            raise IntegrityError("directory", f"signed directory does not parse: {exc}") from None
        self._cached = (version, buckets, now)
        self._own = own
        return version, buckets

    async def load(self) -> tuple[Version, list[BucketRef]]:
        """Read the current version afresh (with the nodes that hold it) and its bucket index; later
        reads within FRESH_SECONDS use it. Raises NotEnoughSharesError or IntegrityError."""
        return await self._load(fresh=True)

    async def own(self) -> Entry | None:
        """The directory's own attributes (mode, owner, times, xattrs) if it carries them: only a
        tree's root does, as nothing else describes it. None if it never had any set."""
        await self._load()
        return None if self._own is None else _copy_entry(self._own)

    async def _bucket(self, ref: BucketRef) -> list[Entry]:
        """The bucket's entries: copies, the caller's to keep and change."""
        return [_copy_entry(e) for e in (await self._bucket_entries(ref)).values()]

    async def _bucket_entries(self, ref: BucketRef) -> dict[bytes, Entry]:
        """The bucket's entries by name, from the shared cache: never to be changed."""
        key = ref.cap if ref.inline is None else ref.inline  # a cap names immutable content
        entries = _BUCKETS.get(key)
        if entries is not None:
            return entries
        if ref.inline is not None:
            data = ref.inline
        else:
            try:
                cap = parse_cap(ref.cap)
            except UsageError:
                raise IntegrityError("directory", "bucket reference is not a cap") from None
            if isinstance(cap, LiteralCap):  # a bucket of 56 bytes or less uploads as a literal cap
                data = cap.data
            elif not isinstance(cap, FileCap):
                raise IntegrityError("directory", "bucket reference is not a file cap")
            elif cap.size > MAX_BUCKET_BYTES:  # held whole: a signed root must not make readers hold more
                raise IntegrityError("directory", f"bucket of {cap.size} bytes is impossibly large")
            else:
                data = await FileReader(self.grid, cap).read(0, cap.size)
        try:
            entries = {e.name: e for e in decode_bucket(data)}
        except ValueError as exc:
            raise IntegrityError("directory", f"bucket does not parse: {exc}") from None
        _BUCKETS.put(key, entries, len(data))
        return entries

    async def lookup(self, name: bytes) -> Entry | None:
        """The entry called `name`, or None."""
        for attempt in range(2):
            _version, buckets = await self._load(fresh=attempt > 0)
            try:
                entries = await self._bucket_entries(buckets[bucket_index(buckets, name)])
            except NotEnoughSharesError:
                if attempt:
                    raise
                continue  # a writer replaced that bucket after we read the root: read again
            entry = entries.get(name)
            return None if entry is None else _copy_entry(entry)
        return None

    async def get(self, name: bytes) -> Entry:
        entry = await self.lookup(name)
        if entry is None:
            raise NoSuchEntryError(f"no such entry: {name.decode(errors='replace')}")
        return entry

    async def scan(self, sink: Callable[[list[Entry]], Awaitable[None]]) -> int:
        """Feed every entry to `sink`, one bucket at a time, in stable (hash) order. Holds one bucket
        (at most BUCKET_SPLIT_BYTES) of entries at a time. Returns the number of entries."""
        _version, buckets = await self._load()
        total = 0
        for index, ref in enumerate(buckets):
            try:
                entries = await self._bucket(ref)
            except NotEnoughSharesError:
                # A writer replaced this bucket after we read the root: take the same hash range
                # from the newest version instead.
                hi = buckets[index + 1].lo if index + 1 < len(buckets) else HASH_SPACE
                entries = await self._range_from_fresh(ref.lo, hi)
            total += len(entries)
            if entries:
                await sink(entries)
        return total

    async def _range_from_fresh(self, lo: int, hi: int) -> list[Entry]:
        _version, fresh = await self._load(fresh=True)
        found: list[Entry] = []
        for i, ref in enumerate(fresh):
            ref_hi = fresh[i + 1].lo if i + 1 < len(fresh) else HASH_SPACE
            if ref_hi > lo and ref.lo < hi:
                found += [e for e in await self._bucket(ref) if lo <= name_hash(e.name) < hi]
        return found

    async def count(self) -> int:
        _version, buckets = await self._load()
        return sum(b.count for b in buckets)

    def child(self, entry: Entry) -> Directory:
        """Open a child directory: writable only if this one is (its write cap is sealed with ours)."""
        if entry.kind != KIND_DIR:
            raise ValueError("not a directory entry")
        if isinstance(self.cap, DirWriteCap) and entry.sealed_write_cap:
            try:
                cap = parse_cap(unseal_write_cap(self.cap.seed, entry.sealed_write_cap))
            except (ValueError, BadCapError) as exc:
                raise IntegrityError("directory", f"child write cap does not unseal: {exc}") from None
            if isinstance(cap, DirWriteCap):
                return Directory(self.grid, cap)
        try:
            cap = parse_cap(entry.cap)
        except BadCapError as exc:
            raise IntegrityError("directory", f"child directory cap does not parse: {exc}") from None
        if not isinstance(cap, DirReadCap):
            raise IntegrityError("directory", "child directory cap is not a directory read cap")
        return Directory(self.grid, cap)

    # -- writing ---------------------------------------------------------------------------------
    async def modify(self, name: bytes, change: Change) -> Entry | None:
        """Apply `change` to the entry called `name` and publish the result; returns the old entry.

        `change(old)` returns the new entry (its name must be `name`) or None to remove it, and may
        raise (e.g. EntryExistsError) to abort. See modify_many for the guarantees."""
        return (await self.modify_many({name: change}))[name]

    async def modify_many(
        self, changes: dict[bytes, Change], own: Entry | None = None
    ) -> dict[bytes, Entry | None]:
        """Apply several changes in one new version; returns {name: old entry}. With `own`, that
        version also carries these as the directory's own attributes (see `own()`); without, it keeps
        the ones it had.

        On a conflict with another writer the whole read-change-publish runs again on the new version
        (the changes are called again), up to MAX_ATTEMPTS times. Costs the root plus each touched
        bucket, read and rewritten. Old buckets' shares are deleted only after the new root is on
        the grid."""
        if not isinstance(self.cap, DirWriteCap):
            raise ReadOnlyError("this directory was opened read-only (with a read cap)")
        for name in changes:
            check_name(name)
        async with self.grid.writing(self.obj.si):
            return await self._modify_many(changes, own)

    async def _modify_many(
        self, changes: dict[bytes, Change], own: Entry | None
    ) -> dict[bytes, Entry | None]:
        for attempt in range(MAX_ATTEMPTS):
            version, buckets = await self._load(fresh=attempt > 0)
            new_own = own if own is not None else self._own  # the own attributes `version` has
            by_bucket: dict[int, list[bytes]] = {}
            for name in changes:
                by_bucket.setdefault(bucket_index(buckets, name), []).append(name)
            olds: dict[bytes, Entry | None] = {}
            replaced: dict[int, list[BucketRef]] = {}
            uploaded: list[str] = []
            try:
                contents: dict[int, list[Piece]] = {}
                for index, names in sorted(by_bucket.items()):
                    current = {e.name: e for e in await self._bucket(buckets[index])}
                    for name in names:
                        olds[name] = current.get(name)
                        new = changes[name](olds[name])
                        if new is not None and new.name != name:
                            raise ValueError("change() must keep the entry's name")
                        current.pop(name, None)
                        if new is not None:
                            current[name] = new
                    if not current and index > 0:
                        replaced[index] = []  # emptied: the previous bucket's range covers it
                    else:
                        contents[index] = _pieces(buckets[index].lo, list(current.values()))
                # The whole directory inside its root while it fits: every bucket left as it is must be
                # inline already, and the root with the rewritten ones inline must stay in the budget.
                kept = [ref for index, ref in enumerate(buckets) if index not in by_bucket]
                inline_size = len(version.plaintext) - sum(buckets[i].encoded_size for i in by_bucket)
                inline_size += _own_size(new_own) - _own_size(self._own)  # `version` carries self._own
                inline_size += sum(BUCKET_REF_HEADER + len(p[2]) for ps in contents.values() for p in ps)
                inline = all(ref.inline is not None for ref in kept) and inline_size <= ROOT_INLINE_MAX
                for index, pieces in contents.items():
                    replaced[index] = [await self._store_piece(p, inline, uploaded) for p in pieces]
                if not inline:  # it outgrew its root: the buckets still inside go to files too
                    for index, ref in enumerate(buckets):
                        if index not in by_bucket and ref.inline is not None:
                            entries = list((await self._bucket_entries(ref)).values())
                            piece = (ref.lo, entries, ref.inline)
                            replaced[index] = [await self._store_piece(piece, False, uploaded)]
            except NotEnoughSharesError:
                await self._forget(uploaded)
                if attempt:
                    raise
                continue  # a bucket was replaced after we read the root: read again
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._forget(uploaded)
                raise
            new_buckets: list[BucketRef] = []
            for index, ref in enumerate(buckets):
                # An emptied bucket disappears: the previous bucket's range then covers it.
                new_buckets += replaced.get(index, [ref])
            root = encode_root(new_buckets, new_own)
            if len(root) > MAX_VERSION_BYTES:
                with trio.CancelScope(shield=True):
                    await self._forget(uploaded)
                raise GridError(f"directory too large: its root would be {len(root)} bytes")
            try:
                published = await self.obj.publish(root, version)
            except ConflictError:
                # Our losing version may still sit on some nodes and name these buckets: they are
                # not deleted (garbage collection, planned, reclaims them). Nor after other failures.
                await trio.sleep(random.uniform(0, 0.05 * (attempt + 1)))
                continue
            self._cached = (published, new_buckets, trio.current_time())
            self._own = new_own
            await self._forget([buckets[i].cap for i in replaced if buckets[i].cap])
            return olds
        raise GridError(f"gave up changing the directory after {MAX_ATTEMPTS} conflicting writers")

    async def _store_piece(self, piece: Piece, inline: bool, uploaded: list[str]) -> BucketRef:
        """The reference to one bucket: its encoding inside the root, or an immutable file uploaded now
        (its cap added to `uploaded`). Either way the decoded bucket goes into the shared cache: the
        next change or lookup here starts from it, instead of fetching it back from the grid (a locate
        on every node plus k share reads) or decoding it again."""
        lo, entries, data = piece
        if inline:
            key: str | bytes = data
            ref = BucketRef(lo, len(entries), inline=data)
        else:
            key = str(await upload(self.grid, BytesSource(data), size=len(data)))
            uploaded.append(key)
            ref = BucketRef(lo, len(entries), cap=key)
        _BUCKETS.put(key, {e.name: _copy_entry(e) for e in entries}, len(data))
        return ref

    async def _forget(self, caps: list[str]) -> None:
        for text in caps:
            cap = parse_cap(text)
            if isinstance(cap, FileCap | LiteralCap):
                await delete_file(self.grid, cap)

    async def link(self, entry: Entry, replace: bool = False) -> Entry | None:
        """Add `entry`; with replace=False an existing name raises EntryExistsError. Returns the
        entry it replaced, if any (whose data the caller may now delete)."""

        def change(old: Entry | None) -> Entry:
            # `old == entry` happens when a publish of ours that lost a race still landed on enough
            # nodes to be read back: it is our own change, not a conflict.
            if old is not None and not replace and old != entry:
                raise EntryExistsError(f"already exists: {entry.name.decode(errors='replace')}")
            return entry

        old = await self.modify(entry.name, change)
        return None if old == entry else old

    async def unlink(self, name: bytes) -> Entry:
        """Remove `name`; returns its entry. Raises NoSuchEntryError."""
        seen: list[Entry] = []

        def change(old: Entry | None) -> None:
            if old is not None:
                seen.append(old)
            elif not seen:  # (after a lost race our own removal may already be visible)
                raise NoSuchEntryError(f"no such entry: {name.decode(errors='replace')}")
            return None

        await self.modify(name, change)
        return seen[0]

    def child_entry(
        self,
        name: bytes,
        child: DirWriteCap,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
    ) -> Entry:
        """The entry that links directory `child` here: its read cap in clear, its write cap sealed
        with this directory's key (so holders of our read cap get a read-only child)."""
        if not isinstance(self.cap, DirWriteCap):
            raise ReadOnlyError("this directory was opened read-only (with a read cap)")
        return Entry(
            name,
            KIND_DIR,
            mode=mode,
            uid=uid,
            gid=gid,
            mtime_ns=mtime_ns,
            ctime_ns=mtime_ns,
            cap=str(child.read_cap()),
            sealed_write_cap=seal_write_cap(self.cap.seed, str(child)),
        )

    async def mkdir(
        self, name: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int = 0
    ) -> Directory:
        """Create an empty child directory called `name` and link it; returns it (writable)."""
        if not isinstance(self.cap, DirWriteCap):
            raise ReadOnlyError("this directory was opened read-only (with a read cap)")
        child = await Directory.create(self.grid)
        assert isinstance(child.cap, DirWriteCap)
        try:
            await self.link(self.child_entry(name, child.cap, mode, uid, gid, mtime_ns))
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await delete_versions(self.grid, child.cap)
            raise
        return child
