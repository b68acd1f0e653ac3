"""Small immutable shares as rows of one SQLite database, `DIR/small-shares.sqlite`.

A share of at most SMALL_SHARE_MAX_BYTES (a file of up to about 190 KB at 3-of-N) is one row instead of
a file in a folder of its own. Committing a file-per-share costs two new inodes (the temp file and the
storage index's folder) and three fsyncs; a row costs one append to SQLite's write-ahead log and one
fsync of it. On a disk where inode allocation is slow (ext4 without a journal, after many deletions) a
row commits about three times as fast for a quarter of the system CPU (docs/protocol.md §8.1).

The database runs in WAL mode with `synchronous=FULL`: a committed INSERT is in the fsynced log before
this module returns, and a crash leaves every row either whole or absent (SQLite's own recovery at the
next open). Rows are never updated; a share is inserted once and deleted once. Memory: SQLite's page
cache (CACHE_KIB) plus, per call, the one share being inserted or read (at most SMALL_SHARE_MAX_BYTES).

Every method is synchronous and is called from the node's one event-loop thread only, so the store's
"check, then commit" sequences have no other request in between (see store.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

DB_NAME = "small-shares.sqlite"
SCHEMA_VERSION = 1
CACHE_KIB = 2048  # SQLite page cache
WAL_LIMIT_BYTES = 8 * 1024 * 1024  # the log is cut back to this size after a checkpoint


class SmallShareExists(Exception):
    """The row (storage index, share number) exists already: shares are never replaced."""


class SmallShareDiskFull(Exception):
    """SQLite could not grow its files: the disk (or the quota) is full."""


class SmallShareDiskError(Exception):
    """Any other failure of the database: I/O error, a damaged file."""


class SmallShares:
    """The rows of DIR/small-shares.sqlite: (storage index, share number) -> (delete-secret digest,
    share bytes). Raises SmallShareDiskFull / SmallShareDiskError for failures of the database."""

    def __init__(self, root: Path) -> None:
        self.path = root / DB_NAME
        # check_same_thread=False: the node makes it in its main thread and uses it from the event loop's
        # (the same thread in practice); never from two threads at once.
        with _errors():
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS shares ("
                    " si TEXT NOT NULL, num INTEGER NOT NULL,"
                    " secret_digest BLOB NOT NULL, data BLOB NOT NULL,"
                    " PRIMARY KEY (si, num))"
                )
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise SmallShareDiskError(f"{self.path} has schema version {version}, not {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def totals(self) -> tuple[int, int]:
        """(rows, their total share bytes). Reads every row's length: called once, at node start."""
        with _errors():
            count, total = self._db.execute(
                "SELECT count(*), coalesce(sum(length(data)), 0) FROM shares"
            ).fetchone()
        return count, total

    def has(self, si: str, num: int) -> bool:
        with _errors():
            return (
                self._db.execute("SELECT 1 FROM shares WHERE si=? AND num=?", (si, num)).fetchone()
                is not None
            )

    def nums(self, si: str) -> list[int]:
        """The share numbers held for `si`, ascending."""
        with _errors():
            rows = self._db.execute("SELECT num FROM shares WHERE si=? ORDER BY num", (si,)).fetchall()
        return [num for (num,) in rows]

    def get(self, si: str, num: int) -> bytes | None:
        """The share's bytes, or None when there is no such row."""
        with _errors():
            row = self._db.execute("SELECT data FROM shares WHERE si=? AND num=?", (si, num)).fetchone()
        return None if row is None else bytes(row[0])

    def secret_digest(self, si: str, num: int) -> tuple[bytes, int] | None:
        """(the delete-secret digest stored with the share, the share's length), or None."""
        with _errors():
            row = self._db.execute(
                "SELECT secret_digest, length(data) FROM shares WHERE si=? AND num=?", (si, num)
            ).fetchone()
        return None if row is None else (bytes(row[0]), row[1])

    def insert(self, si: str, num: int, secret_digest: bytes, data: bytes | bytearray) -> None:
        """Commit one share durably (fsynced write-ahead log) before returning. Raises SmallShareExists
        if the row exists already."""
        try:
            with _errors():
                self._db.execute(
                    "INSERT INTO shares VALUES (?, ?, ?, ?)", (si, num, secret_digest, bytes(data))
                )
        except sqlite3.IntegrityError:
            raise SmallShareExists from None

    def delete_many(self, si: str, nums: list[int]) -> None:
        """Remove these rows of `si` in one transaction: one fsync for all of them."""
        with _errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM shares WHERE si=? AND num=?", [(si, num) for num in nums])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, si: str, num: int) -> None:
        """Remove the row (durably, like insert); no error when it is absent."""
        with _errors():
            self._db.execute("DELETE FROM shares WHERE si=? AND num=?", (si, num))


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turns SQLite's failures into this module's two error types; IntegrityError passes through."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.Error as exc:
        if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL:
            raise SmallShareDiskFull(str(exc)) from None
        raise SmallShareDiskError(str(exc)) from None
