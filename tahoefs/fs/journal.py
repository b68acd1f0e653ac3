"""The namespace journal: directory changes made durable on local disk first, pushed to the grid in
batches.

A change (set or remove one entry of one directory) is appended to $TAHOEFS_HOME/journal/ROOT.log and
fsynced before the FUSE call returns; the kernel then sees it at once through `pending`. A flusher task
applies the pending changes of each directory in one `modify_many` (one publish for many files), deletes
the content the changes dropped, and empties the journal once nothing is pending. A mount replays the
journal left by a crashed one before it serves. Records are idempotent (set / remove by name), and a
torn last line from a crash is ignored.

Record: one JSON line {"dir": DIR WRITE CAP, "name": b64, "entry": b64(Entry.encode()) or null,
"drop": [file caps whose shares go once this is on the grid]}, or {"dir": DIR WRITE CAP, "own":
b64(encode_own(...))} for the directory's own attributes (the tree root's mode, owner, times, xattrs),
kept among the pending changes under the name OWN, which no entry can have.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tahoefs.errors import TahoefsError, UsageError
from tahoefs.formats.dirformat import Entry, decode_bucket, decode_own, encode_bucket, encode_own

log = logging.getLogger("tahoefs.journal")
FLUSH_DELAY = 2.0  # seconds changes wait to be batched with others (they are durable meanwhile)
RETRY_DELAY = 2.0
OWN = b""  # the pending-changes key of a directory's own attributes (no entry name is empty)


def encode_entry_b64(entry: Entry) -> str:
    return base64.b64encode(encode_bucket([entry])).decode()


def decode_entry_b64(text: str) -> Entry:
    return decode_bucket(base64.b64decode(text))[0]


class Journal:
    """Pending directory changes, durable in a local file. `apply` does the grid work for one
    directory's batch: apply(dir_cap, {name: entry or None}) -> None (raises TahoefsError)."""

    def __init__(
        self,
        path: Path,
        apply: Callable[[str, dict[bytes, Entry | None]], Awaitable[None]],
        drop: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        self.path = path
        self.apply = apply
        self.drop = drop
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pending: dict[str, dict[bytes, Entry | None]] = {}
        self._drops: list[tuple[str, bytes, int, list[str]]] = []
        self._generation: dict[tuple[str, bytes], int] = {}
        self._counter = 0
        self._wakeup = trio.Event()
        self._batching: trio.CancelScope | None = None  # the flusher's batching delay, while it runs
        self._urgent = 0  # callers in wait_idle: no batching delay while there are any
        self._idle = trio.Event()
        self._idle.set()
        self.errors: list[str] = []
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(
                "this tree is already mounted writable from this TAHOEFS_HOME; unmount it first "
                "(or mount this one --read-only)"
            ) from None

    # -- recording -------------------------------------------------------------------------------
    def record(self, dir_cap: str, name: bytes, entry: Entry | None, drop: list[str] | None = None) -> None:
        """Durably note that `name` in `dir_cap` becomes `entry` (None: removed). Raises ValueError
        for an entry that does not belong under `name` or would not decode (never journaled)."""
        encoded = None
        if entry is not None:
            if entry.name != name:
                raise ValueError("journal entry name mismatch")
            encoded = encode_entry_b64(entry)
            entry = decode_entry_b64(encoded)  # our own copy, proven to decode
        line = {
            "dir": dir_cap,
            "name": base64.b64encode(name).decode(),
            "entry": encoded,
            "drop": drop or [],
        }
        self._append(line)
        self._note(dir_cap, name, entry, drop or [])

    def record_own(self, dir_cap: str, own: Entry) -> None:
        """Durably note the directory's new own attributes (mode, owner, times, xattrs of `own`)."""
        encoded = base64.b64encode(encode_own(own)).decode()
        own = decode_own(base64.b64decode(encoded))  # our own copy, proven to decode
        self._append({"dir": dir_cap, "own": encoded})
        self._note(dir_cap, OWN, own, [])

    def _append(self, record: dict) -> None:
        """One record, on disk (fdatasync) before this returns."""
        os.write(self.fd, (json.dumps(record) + "\n").encode())
        os.fdatasync(self.fd)

    def _note(self, dir_cap: str, name: bytes, entry: Entry | None, drop: list[str]) -> None:
        if entry is not None and entry.name != name:
            raise ValueError("journal entry name mismatch")
        self.pending.setdefault(dir_cap, {})[name] = entry
        self._counter += 1
        self._generation[(dir_cap, name)] = self._counter
        if drop:
            self._drops.append((dir_cap, name, self._counter, drop))
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    def lookup(self, dir_cap: str, name: bytes) -> tuple[bool, Entry | None]:
        """(known, entry): known is False when the journal says nothing about the name."""
        changes = self.pending.get(dir_cap)
        if changes is None or name not in changes:
            return False, None
        return True, changes[name]

    def overlay(self, dir_cap: str) -> dict[bytes, Entry | None]:
        """Pending entry changes of `dir_cap` (not its own attributes)."""
        return {name: e for name, e in self.pending.get(dir_cap, {}).items() if name != OWN}

    def count(self) -> int:
        return sum(len(c) for c in self.pending.values())

    # -- replay ----------------------------------------------------------------------------------
    def load(self) -> int:
        """Read what a previous mount left (ignoring a torn last line). Returns records found."""
        found = 0
        good_end = 0
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("torn")
                    line = json.loads(raw)
                    if "own" in line:
                        self._note(line["dir"], OWN, decode_own(base64.b64decode(line["own"])), [])
                    else:
                        entry = None if line["entry"] is None else decode_entry_b64(line["entry"])
                        self._note(line["dir"], base64.b64decode(line["name"]), entry, list(line["drop"]))
                    found += 1
                    good_end += len(raw)
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a damaged journal line (a crash while writing it)")
                    break
        os.ftruncate(self.fd, good_end)  # new records must not be glued onto a torn one
        os.fsync(self.fd)
        return found

    # -- flushing --------------------------------------------------------------------------------
    async def flush_once(self) -> None:
        """Push everything pending now; raises TahoefsError if a directory could not be written."""
        failure: Exception | None = None
        for dir_cap in list(self.pending):
            changes = dict(self.pending.get(dir_cap, {}))
            if not changes:
                continue
            marks = {name: self._generation[(dir_cap, name)] for name in changes}
            try:
                await self.apply(dir_cap, changes)
            except Exception as exc:  # other directories still get their turn
                failure = failure or exc
                continue
            current = self.pending.get(dir_cap, {})
            for name, mark in marks.items():
                if self._generation.get((dir_cap, name)) == mark:  # not changed again meanwhile
                    current.pop(name, None)
                    del self._generation[(dir_cap, name)]
            if not current:
                self.pending.pop(dir_cap, None)
            done = [d for d in self._drops if d[0] == dir_cap and d[2] <= marks.get(d[1], -1)]
            for item in done:
                self._drops.remove(item)
                await self.drop(item[3])
        if not self.pending:
            self._truncate()
            self._idle.set()
        if failure is not None:
            raise failure

    def _truncate(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)

    async def run(self) -> None:
        """The flusher: batches changes for FLUSH_DELAY, pushes them, retries after errors. While
        someone waits in wait_idle it does not batch: it pushes at once."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            if not self._urgent:
                with trio.CancelScope() as self._batching:
                    await trio.sleep(FLUSH_DELAY)
                self._batching = None
            try:
                await self.flush_once()
            except Exception as exc:
                self.errors = [*self.errors, f"directory update failed, will retry: {exc}"][-20:]
                log.error("journal flush failed: %s", exc, exc_info=not isinstance(exc, TahoefsError))
                await trio.sleep(RETRY_DELAY)
                self._wakeup.set()

    async def drain(self, seconds: float) -> None:
        """Push everything pending, retrying, for at most `seconds` (at unmount; no flusher runs)."""
        with trio.move_on_after(seconds):
            while self.pending:
                try:
                    await self.flush_once()
                except TahoefsError as exc:
                    log.error("journal flush failed: %s", exc)
                    await trio.sleep(RETRY_DELAY)
                except Exception as exc:  # not the grid: retrying will not help; the journal keeps it
                    log.error("journal flush failed: %s", exc, exc_info=True)
                    break
        if not self.pending:
            self._truncate()

    async def wait_idle(self) -> None:
        """Until nothing is pending; the flusher pushes right away (cutting its batching delay short)
        until then."""
        self._urgent += 1
        try:
            self._wakeup.set()
            if self._batching is not None:
                self._batching.cancel()
            await self._idle.wait()
        finally:
            self._urgent -= 1

    def close(self) -> None:
        os.close(self.fd)
