"""The node's share store on local disk.

    DIR/node.json                  node id and access token (mode 0600)
    DIR/small-shares.sqlite        committed shares of at most SMALL_SHARE_MAX_BYTES (smallshares.py)
    DIR/shares/AB/SI/N             committed larger share N of storage index SI (AB = first two characters)
    DIR/mutable/AB/SI/N            mutable slot N of storage index SI (a namespace of its own)
    DIR/incoming/SI.N.RANDOM.tmp   shares and slot versions being received; never readable; wiped at start

A stored share file is a 64-byte node header (magic, hash of the delete secret) followed by the share
bytes exactly as the client sent them. A share becomes visible only by `link()` of a complete, fsynced
temp file into its final name, so a reader never sees a partial share, and an existing share is never
overwritten. All names come from strict regexes, so no request can reach outside DIR. A share that ends
within SMALL_SHARE_MAX_BYTES never touches `incoming/`: it is received in memory and committed as one
row, so it too is visible whole or not at all. A share is in one place only: each commit checks the other
place first, with no await in between.

A slot file is a 64-byte node header (magic, hash of the write enabler, sequence number) followed by the
slot's bytes. A new version becomes visible only by `os.replace()` of a complete, fsynced temp file onto
the slot's name, right after re-checking the test-and-set condition with no await in between: the store
is synchronous code on the node's single event loop, so two writers can never both pass the test, and a
reader sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tahoefs.limits import NODE_MIN_FREE_BYTES, SMALL_SHARE_MAX_BYTES
from tahoefs.storage.smallshares import SmallShareDiskError, SmallShareDiskFull, SmallShareExists, SmallShares

STORAGE_INDEX_RE = re.compile(r"[a-z2-7]{26}")
SHARE_NUM_RE = re.compile(r"0|[1-9][0-9]{0,2}")
NODE_HEADER_FORMAT = ">8sI32s20s"
NODE_HEADER_MAGIC = b"TFNODESH"
NODE_HEADER_SIZE = struct.calcsize(NODE_HEADER_FORMAT)  # 64
MAX_SHARE_NUM = 255
# Mutable slot file header: magic, version, write-enabler digest, seqnum (u64), zero padding.
SLOT_HEADER_FORMAT = ">8sI32sQ12s"
SLOT_HEADER_MAGIC = b"TFNODEMU"
SLOT_HEADER_SIZE = struct.calcsize(SLOT_HEADER_FORMAT)  # 64
SEQNUM_RE = re.compile(r"0|[1-9][0-9]{0,18}")
SEQNUM_LIMIT = 1 << 63  # seqnums are < 2^63


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status the app answers with. `fields` are
    extra members of the JSON error body, next to "error"."""

    def __init__(self, status: int, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.fields = fields


def check_storage_index(text: str) -> str:
    if not STORAGE_INDEX_RE.fullmatch(text):
        raise StoreError(400, "malformed storage index (26 base32 characters expected)")
    return text


def check_share_num(text: str) -> int:
    if not SHARE_NUM_RE.fullmatch(text) or int(text) > MAX_SHARE_NUM:
        raise StoreError(400, "malformed share number (0..255 expected)")
    return int(text)


def check_secret(text: str | None) -> bytes:
    if text is None or not re.fullmatch(r"[0-9a-f]{64}", text):
        raise StoreError(400, "missing or malformed delete secret (64 hex digits expected)")
    return bytes.fromhex(text)


def secret_digest(secret: bytes) -> bytes:
    return hashlib.sha256(b"tahoefs:node-delete-secret:v1:" + secret).digest()


def check_write_enabler(text: str | None) -> bytes:
    if text is None or not re.fullmatch(r"[0-9a-f]{64}", text):
        raise StoreError(400, "missing or malformed write enabler (64 hex digits expected)")
    return bytes.fromhex(text)


def check_seqnum(text: str | None, header: str) -> int:
    """A seqnum header: canonical decimal (no sign, no leading zero, no spaces), below 2^63."""
    if text is None or not SEQNUM_RE.fullmatch(text) or int(text) >= SEQNUM_LIMIT:
        raise StoreError(400, f"missing or malformed {header} (a decimal number below 2^63 expected)")
    return int(text)


def write_enabler_digest(write_enabler: bytes) -> bytes:
    return hashlib.sha256(b"tahoefs:node-write-enabler:v1:" + write_enabler).digest()


class SlotState(NamedTuple):
    """What a slot's node header says, and the length of the slot's bytes."""

    enabler_digest: bytes
    seqnum: int
    length: int


@dataclass
class NodeIdentity:
    node_id: str
    token: str


def new_token() -> str:
    """A random bearer token (256 bits, URL-safe base64) that never starts with "-": one in 64 did, and
    `tahoefs grid add URL TOKEN` then took it for an option ("the following arguments are required")."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


def load_or_create_identity(root: Path) -> NodeIdentity:
    """Read DIR/node.json, creating it with a fresh id and token the first time."""
    path = root / "node.json"
    if path.exists():
        data = json.loads(path.read_text())
        return NodeIdentity(data["node_id"], data["token"])
    identity = NodeIdentity(secrets.token_hex(16), new_token())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"node_id": identity.node_id, "token": identity.token}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return identity


class ShareStore:
    """Committed shares and mutable slots on disk plus the counters a status page wants."""

    def __init__(self, root: Path, min_free_bytes: int = NODE_MIN_FREE_BYTES) -> None:
        self.root = root
        self.shares_dir = root / "shares"
        self._shares_prefix = f"{self.shares_dir}{os.sep}"  # share_file's, without pathlib's cost per request
        self.mutable_dir = root / "mutable"
        self.incoming_dir = root / "incoming"
        self.min_free_bytes = min_free_bytes
        self.shares_dir.mkdir(parents=True, exist_ok=True)
        self.mutable_dir.mkdir(exist_ok=True)
        if self.incoming_dir.exists():
            shutil.rmtree(self.incoming_dir)  # abandoned partial uploads from a previous run
        self.incoming_dir.mkdir()
        self.share_count, self.share_bytes = _count(self.shares_dir, NODE_HEADER_SIZE)
        with _small_errors():
            self.small = SmallShares(root)
            rows, row_bytes = self.small.totals()
        self.share_count += rows
        self.share_bytes += row_bytes
        self.slot_count, self.slot_bytes = _count(self.mutable_dir, SLOT_HEADER_SIZE)

    def close(self) -> None:
        self.small.close()

    def share_path(self, si: str, num: int) -> Path:
        return Path(self.share_file(si, num))

    def share_file(self, si: str, num: int) -> str:
        """Where share `num` of `si` lives, as a string: checked on every PUT, where building a Path
        cost ~10% of a small PUT's CPU."""
        return f"{self._shares_prefix}{si[:2]}{os.sep}{si}{os.sep}{num}"

    def has_share(self, si: str, num: int) -> bool:
        with _small_errors():
            return _exists(self.share_file(si, num)) or self.small.has(si, num)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def total_bytes(self) -> int:
        return shutil.disk_usage(self.root).total

    def check_space(self, more: int = 0) -> None:
        if self.free_bytes() - more < self.min_free_bytes:
            raise StoreError(507, "node is nearly full")

    def list_shares(self, si: str) -> list[int]:
        folder = self.shares_dir / si[:2] / si
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            names = []
        with _small_errors():
            rows = self.small.nums(si)
        return sorted({int(n) for n in names if SHARE_NUM_RE.fullmatch(n)}.union(rows))

    def open_share(self, si: str, num: int) -> StoredShare:
        """A committed share to read from; close it after use. It keeps serving the bytes it opened
        even if the share is deleted meanwhile. Raises StoreError(404, 500)."""
        with _small_errors():
            data = self.small.get(si, num)
        if data is not None:
            return StoredShare(len(data), data=data)
        try:
            fd = os.open(self.share_path(si, num), os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(404, "no such share") from None
        length = os.fstat(fd).st_size - NODE_HEADER_SIZE
        if length < 0:  # cut inside the node header (disk damage): never answer a negative length
            os.close(fd)
            raise StoreError(500, "stored share has a damaged node header")
        return StoredShare(length, fd=fd)

    @contextlib.contextmanager
    def receive(self, si: str, num: int, secret: bytes) -> Iterator[IncomingShare]:
        """A temp file to stream a new share into. Commit with `incoming.commit()`; leaving the block
        without commit (error, disconnect) deletes the temp file."""
        if self.has_share(si, num):
            raise StoreError(409, "share already exists")
        self.check_space()
        incoming = IncomingShare(self, si, num, secret)
        try:
            yield incoming
        finally:
            incoming.discard()

    def delete(self, si: str, num: int, secret: bytes) -> None:
        """Remove a share if `secret` is the one given at upload. Raises StoreError(404/403)."""
        with _small_errors():
            row = self.small.secret_digest(si, num)
            if row is not None:
                digest, size = row
                if not hmac.compare_digest(digest, secret_digest(secret)):
                    raise StoreError(403, "wrong delete secret")
                self.small.delete(si, num)
                self.share_count -= 1
                self.share_bytes -= size
                return
        self._delete_file(si, num, secret)

    def _delete_file(self, si: str, num: int, secret: bytes) -> None:
        """Remove a share stored as a file (see delete). Raises StoreError(404/403/500)."""
        path = self.share_path(si, num)
        try:
            with open(path, "rb") as f:
                header = f.read(NODE_HEADER_SIZE)
        except FileNotFoundError:
            raise StoreError(404, "no such share") from None
        if len(header) != NODE_HEADER_SIZE or header[:8] != NODE_HEADER_MAGIC:
            raise StoreError(500, "stored share has a damaged node header")
        _magic, _version, digest, _pad = struct.unpack(NODE_HEADER_FORMAT, header)
        if not hmac.compare_digest(digest, secret_digest(secret)):
            raise StoreError(403, "wrong delete secret")
        size = path.stat().st_size - NODE_HEADER_SIZE
        path.unlink()
        self.share_count -= 1
        self.share_bytes -= size
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only succeeds when no share of this SI is left

    def delete_all(self, si: str, secret: bytes) -> list[int]:
        """Remove every share of `si` stored with `secret`; returns their numbers, ascending (empty
        when the node holds none). Rows go in one transaction (one fsync). Raises StoreError(403) when
        the node holds some but none with `secret`."""
        held = self.list_shares(si)
        digest = secret_digest(secret)
        rows: dict[int, int] = {}  # num -> length, of the matching rows
        with _small_errors():
            for num in held:
                row = self.small.secret_digest(si, num)
                if row is not None and hmac.compare_digest(row[0], digest):
                    rows[num] = row[1]
            if rows:
                self.small.delete_many(si, list(rows))
        self.share_count -= len(rows)
        self.share_bytes -= sum(rows.values())
        deleted = set(rows)
        for num in held:
            if num in rows:
                continue
            try:
                self._delete_file(si, num, secret)  # the rows were all looked at above
            except StoreError as exc:
                if exc.status not in (403, 404):  # 403: another uploader's share, left alone
                    raise
            else:
                deleted.add(num)
        if held and not deleted:
            raise StoreError(403, "wrong delete secret")
        return sorted(deleted)

    # ---- mutable slots

    def slot_path(self, si: str, num: int) -> Path:
        return self.mutable_dir / si[:2] / si / str(num)

    def slot_state(self, si: str, num: int) -> SlotState | None:
        """The slot's header fields and length, or None when there is no slot SI/N."""
        try:
            fd = os.open(self.slot_path(si, num), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return _read_slot_header(fd)
        finally:
            os.close(fd)

    def list_slots(self, si: str) -> dict[int, SlotState]:
        """Every slot held for `si`, by share number (empty if none)."""
        folder = self.mutable_dir / si[:2] / si
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return {}
        found = {}
        for name in names:
            if SHARE_NUM_RE.fullmatch(name) and int(name) <= MAX_SHARE_NUM:
                state = self.slot_state(si, int(name))
                if state is not None:  # None: deleted since listdir
                    found[int(name)] = state
        return dict(sorted(found.items()))

    def open_slot(self, si: str, num: int) -> tuple[int, SlotState]:
        """Open the slot's current version: (fd, its state). Slot byte x is at file offset
        SLOT_HEADER_SIZE + x; the fd keeps serving this version even if it is replaced meanwhile.
        Raises StoreError(404)."""
        try:
            fd = os.open(self.slot_path(si, num), os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(404, "no such slot") from None
        try:
            return fd, _read_slot_header(fd)
        except BaseException:
            os.close(fd)
            raise

    def check_slot_test(self, si: str, num: int, write_enabler: bytes, test_seqnum: int) -> SlotState | None:
        """The test of a test-and-set write; returns the current state (None: no slot). Raises
        StoreError(403) when the slot exists and `write_enabler` is not the one it was created with,
        StoreError(409, seqnum=C) when the slot's seqnum C (0 when there is no slot) is not `test_seqnum`."""
        state = self.slot_state(si, num)
        if state is not None and not hmac.compare_digest(
            state.enabler_digest, write_enabler_digest(write_enabler)
        ):
            raise StoreError(403, "wrong write enabler")
        current = 0 if state is None else state.seqnum
        if current != test_seqnum:
            raise StoreError(409, f"test failed: slot holds seqnum {current}", seqnum=current)
        return state

    @contextlib.contextmanager
    def receive_slot(
        self, si: str, num: int, write_enabler: bytes, test_seqnum: int, new_seqnum: int, more: int = 0
    ) -> Iterator[IncomingSlot]:
        """A temp file to stream a new slot version into, after checking the test (403/409) and the
        free space (507; `more` is the declared body length). Commit with `incoming.commit()`, which
        checks the test again; leaving the block without commit (error, disconnect) deletes the temp
        file and leaves the current version untouched."""
        self.check_slot_test(si, num, write_enabler, test_seqnum)
        self.check_space(more)
        try:
            incoming = IncomingSlot(self, si, num, write_enabler, test_seqnum, new_seqnum)
        except OSError as exc:
            raise _disk_error(exc) from None
        try:
            yield incoming
        finally:
            incoming.discard()

    def delete_slot(self, si: str, num: int, write_enabler: bytes) -> None:
        """Remove a slot if `write_enabler` is the one it was created with. Raises StoreError(404/403)."""
        state = self.slot_state(si, num)
        if state is None:
            raise StoreError(404, "no such slot")
        if not hmac.compare_digest(state.enabler_digest, write_enabler_digest(write_enabler)):
            raise StoreError(403, "wrong write enabler")
        path = self.slot_path(si, num)
        path.unlink()
        self.slot_count -= 1
        self.slot_bytes -= state.length
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only succeeds when no slot of this SI is left


class StoredShare:
    """A committed share opened for reading: `length` share bytes, read by `read(offset, size)`. A row's
    bytes (at most SMALL_SHARE_MAX_BYTES) are held in memory; a file is read through its open fd."""

    def __init__(self, length: int, *, data: bytes | None = None, fd: int | None = None) -> None:
        self.length = length
        self._data = data
        self._fd = fd

    def read(self, offset: int, size: int) -> bytes:
        if self._data is not None:
            return self._data[offset : offset + size]
        assert self._fd is not None
        return os.pread(self._fd, size, NODE_HEADER_SIZE + offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class IncomingShare:
    """One share being received: in memory while it is at most SMALL_SHARE_MAX_BYTES (it then commits as
    a row of the small-share database), spilled to a temp file in DIR/incoming once it grows past that."""

    SPACE_CHECK_EVERY = 64 * 1024 * 1024

    def __init__(self, store: ShareStore, si: str, num: int, secret: bytes) -> None:
        self.store = store
        self.si = si
        self.num = num
        self.digest = secret_digest(secret)
        self.buffer = bytearray()
        self.tmp_path: Path | None = None
        self.file: Any = None  # the temp file once spilled
        self.length = 0
        self._since_check = 0
        self.committed = False

    def write(self, data: bytes, max_length: int) -> None:
        self.length += len(data)
        if self.length > max_length:
            raise StoreError(413, "share is larger than this node accepts")
        if self.file is None:
            if self.length <= SMALL_SHARE_MAX_BYTES:
                self.buffer += data
                return
            self._spill()
        self._since_check += len(data)
        if self._since_check >= self.SPACE_CHECK_EVERY:
            self._since_check = 0
            self.store.check_space()
        try:
            self.file.write(data)
        except OSError as exc:
            raise _disk_error(exc) from None

    def _spill(self) -> None:
        """Move what was received so far into a new temp file, which takes every later byte."""
        self.tmp_path = self.store.incoming_dir / f"{self.si}.{self.num}.{secrets.token_hex(8)}.tmp"
        try:
            self.file = open(self.tmp_path, "w+b")  # noqa: SIM115 - closed in commit/discard
            self.file.write(struct.pack(NODE_HEADER_FORMAT, NODE_HEADER_MAGIC, 1, self.digest, b""))
            self.file.write(self.buffer)
        except OSError as exc:
            raise _disk_error(exc) from None
        self.buffer = bytearray()

    def commit(self, check_tail: Callable[[bytes], None]) -> None:
        """Make the share durable and visible atomically. `check_tail(last_bytes)` may veto it first.
        Raises StoreError(409) if the share exists meanwhile, 507/500 for disk errors."""
        if self.file is None:
            check_tail(bytes(self.buffer[-64:]))
            if _exists(self.store.share_file(self.si, self.num)):
                raise StoreError(409, "share already exists")
            with _small_errors():
                try:
                    self.store.small.insert(self.si, self.num, self.digest, self.buffer)
                except SmallShareExists:
                    raise StoreError(409, "share already exists") from None
        else:
            self._commit_file(check_tail)
        self.committed = True
        self.store.share_count += 1
        self.store.share_bytes += self.length

    def _commit_file(self, check_tail: Callable[[bytes], None]) -> None:
        assert self.tmp_path is not None
        try:
            self.file.flush()
        except OSError as exc:
            raise _disk_error(exc) from None
        tail_len = min(self.length, 64)
        check_tail(os.pread(self.file.fileno(), tail_len, NODE_HEADER_SIZE + self.length - tail_len))
        try:
            os.fsync(self.file.fileno())
            self.file.close()
            final = self.store.share_path(self.si, self.num)
            _make_durable_dirs(final.parent, self.store.shares_dir)
            with _small_errors():
                if self.store.small.has(self.si, self.num):
                    raise StoreError(409, "share already exists")
            try:
                os.link(self.tmp_path, final)
            except FileExistsError:
                raise StoreError(409, "share already exists") from None
            _fsync_dir(final.parent)
        except OSError as exc:
            raise _disk_error(exc) from None

    def discard(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
        if self.tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.tmp_path.unlink()


class IncomingSlot:
    """One slot version being received into DIR/incoming. Its header already holds the new seqnum and
    the digest of the offered write enabler (equal to the stored one whenever the commit succeeds)."""

    def __init__(
        self, store: ShareStore, si: str, num: int, write_enabler: bytes, test_seqnum: int, new_seqnum: int
    ) -> None:
        self.store = store
        self.si = si
        self.num = num
        self.write_enabler = write_enabler
        self.test_seqnum = test_seqnum
        self.new_seqnum = new_seqnum
        self.tmp_path = store.incoming_dir / f"{si}.{num}.{secrets.token_hex(8)}.tmp"
        self.file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/discard
        header = struct.pack(
            SLOT_HEADER_FORMAT, SLOT_HEADER_MAGIC, 1, write_enabler_digest(write_enabler), new_seqnum, b""
        )
        try:
            self.file.write(header)
        except BaseException:
            self.discard()
            raise
        self.length = 0

    def write(self, data: bytes, max_length: int) -> None:
        self.length += len(data)
        if self.length > max_length:
            raise StoreError(413, "slot is larger than this node accepts")
        try:
            self.file.write(data)
        except OSError as exc:
            raise _disk_error(exc) from None

    def commit(self) -> None:
        """fsync the temp file, check the test again and replace the slot atomically; synchronous, so
        no other request runs between the final check and the replace. Raises StoreError(403/409) if
        another writer changed the slot meanwhile, 507/500 for disk errors."""
        final = self.store.slot_path(self.si, self.num)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            _make_durable_dirs(final.parent, self.store.mutable_dir)
        except OSError as exc:
            raise _disk_error(exc) from None
        old = self.store.check_slot_test(self.si, self.num, self.write_enabler, self.test_seqnum)
        try:
            os.replace(self.tmp_path, final)
        except OSError as exc:
            raise _disk_error(exc) from None
        if old is None:
            self.store.slot_count += 1
        self.store.slot_bytes += self.length - (0 if old is None else old.length)
        try:
            _fsync_dir(final.parent)
        except OSError as exc:
            raise _disk_error(exc) from None

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()


def _read_slot_header(fd: int) -> SlotState:
    header = os.pread(fd, SLOT_HEADER_SIZE, 0)
    if len(header) != SLOT_HEADER_SIZE or header[:8] != SLOT_HEADER_MAGIC:
        raise StoreError(500, "stored slot has a damaged node header")
    _magic, _version, digest, seqnum, _pad = struct.unpack(SLOT_HEADER_FORMAT, header)
    return SlotState(digest, seqnum, os.fstat(fd).st_size - SLOT_HEADER_SIZE)


def _count(folder: Path, header_size: int) -> tuple[int, int]:
    """(files, their total length without headers) in folder/AB/SI/N."""
    count = total = 0
    for path in folder.glob("*/*/*"):
        count += 1
        total += path.stat().st_size - header_size
    return count, total


@contextlib.contextmanager
def _small_errors() -> Iterator[None]:
    """The small-share database's failures as the answers the node gives for disk errors."""
    try:
        yield
    except SmallShareDiskFull:
        raise StoreError(507, "node disk is full") from None
    except SmallShareDiskError as exc:
        raise StoreError(500, f"node disk error: {exc}") from None


def _disk_error(exc: OSError) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(507, "node disk is full")
    return StoreError(500, f"node disk error: {exc.strerror}")


def _exists(path: str) -> bool:
    """Like Path.exists, but for a string (cheaper): an unreadable or failing disk raises OSError
    instead of passing for "no such share"."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_dirs(path: Path, top: Path) -> None:
    """mkdir -p `path` below `top`, fsyncing the parent of every folder it creates, so a committed
    share's name survives a crash."""
    missing = []
    p = path
    while p != top and not p.exists():
        missing.append(p)
        p = p.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(folder.parent)
