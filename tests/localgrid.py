"""Test harness: a real local grid (real `tahoefs node` processes on 127.0.0.1) and the `tahoefs` CLI run
as a real subprocess against it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tahoefs.cli.home import client_secret
from tahoefs.grid.config import GridConfig, load_grid
from tahoefs.storage.smallshares import DB_NAME
from tahoefs.storage.store import NODE_HEADER_SIZE


@dataclass(frozen=True)
class StoredShare:
    """One committed immutable share on a local node's disk, wherever that node keeps it: a row of its
    small-share database or a file under shares/. Tests play a lying or damaged disk through it; it
    changes the share's bytes the way the disk would, behind the running node's back."""

    node_dir: Path
    si: str
    num: int

    @property
    def path(self) -> Path:
        return self.node_dir / "shares" / self.si[:2] / self.si / str(self.num)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.node_dir / DB_NAME, isolation_level=None, timeout=30)
        try:
            yield db
        finally:
            db.close()

    def _row(self) -> bytes | None:
        with self._db() as db:
            row = db.execute("SELECT data FROM shares WHERE si=? AND num=?", (self.si, self.num)).fetchone()
        return None if row is None else bytes(row[0])

    def read(self) -> bytes:
        """The share's bytes (without the node's file header)."""
        row = self._row()
        return row if row is not None else self.path.read_bytes()[NODE_HEADER_SIZE:]

    def write(self, data: bytes) -> None:
        """Replace the share's bytes (the node's file header, if any, is kept)."""
        if self._row() is not None:
            with self._db() as db:
                db.execute("UPDATE shares SET data=? WHERE si=? AND num=?", (data, self.si, self.num))
        else:
            header = self.path.read_bytes()[:NODE_HEADER_SIZE]
            self.path.write_bytes(header + data)

    def size(self) -> int:
        return len(self.read())

    def cut(self, length: int) -> None:
        self.write(self.read()[:length])

    def flip(self, *offsets: int) -> None:
        """Flip a bit in the share byte at each offset."""
        data = bytearray(self.read())
        for offset in offsets:
            data[offset] ^= 0x40
        self.write(bytes(data))

    def delete(self) -> None:
        if self._row() is not None:
            with self._db() as db:
                db.execute("DELETE FROM shares WHERE si=? AND num=?", (self.si, self.num))
        else:
            self.path.unlink()


@dataclass
class LocalGrid:
    home: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "TAHOEFS_HOME": str(self.home)}

    def run(
        self, *args: str, input: bytes | None = None, timeout: float = 300, check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `tahoefs ARGS...`; returns the completed process (stdout/stderr as bytes)."""
        proc = subprocess.run(
            [sys.executable, "-m", "tahoefs", *args],
            input=input,
            capture_output=True,
            env=self.env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"tahoefs {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
        return proc

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tahoefs", *args], env=self.env, **kwargs)  # type: ignore[call-overload]

    def up(self, nodes: int | None = None) -> None:
        extra = ["--nodes", str(nodes)] if nodes else []
        self.run("grid", "up", *extra, check=True)

    def down(self) -> None:
        self.run("grid", "down", check=True)

    def stop(self, *indexes: int) -> None:
        self.run("grid", "stop", *map(str, indexes), check=True)

    def start(self, *indexes: int) -> None:
        self.run("grid", "start", *map(str, indexes), check=True)

    def node_dir(self, index: int) -> Path:
        return self.home / "nodes" / f"node-{index:02d}"

    def config(self) -> GridConfig:
        return load_grid(self.home / "grid.toml")

    def client_secret(self) -> bytes:
        old = os.environ.get("TAHOEFS_HOME")
        os.environ["TAHOEFS_HOME"] = str(self.home)
        try:
            return client_secret()
        finally:
            if old is None:
                del os.environ["TAHOEFS_HOME"]
            else:
                os.environ["TAHOEFS_HOME"] = old

    def share_files(self, storage_index_b32: str) -> dict[int, list[StoredShare]]:
        """node index -> committed shares of that storage index on that node, by share number."""
        found: dict[int, list[StoredShare]] = {}
        si = storage_index_b32
        for node in sorted((self.home / "nodes").glob("node-*")):
            folder = node / "shares" / si[:2] / si
            nums = {int(p.name) for p in folder.iterdir()} if folder.exists() else set()
            if (node / DB_NAME).exists():
                db = sqlite3.connect(node / DB_NAME, isolation_level=None, timeout=30)
                try:
                    nums.update(n for (n,) in db.execute("SELECT num FROM shares WHERE si=?", (si,)))
                finally:
                    db.close()
            if nums:
                found[int(node.name.removeprefix("node-"))] = [StoredShare(node, si, n) for n in sorted(nums)]
        return found

    def share_count(self) -> int:
        """Committed immutable shares on every node of the grid."""
        nodes = list((self.home / "nodes").glob("node-*"))
        return sum(sum(1 for _ in (node / "shares").glob("*/*/*")) + _rows(node) for node in nodes)

    def put_bytes(self, data: bytes) -> str:
        proc = self.run("put", "-", input=data, check=True)
        return proc.stdout.decode().strip()

    def get_bytes(self, cap: str) -> bytes:
        return self.run("get", cap, check=True).stdout


def _rows(node_dir: Path) -> int:
    if not (node_dir / DB_NAME).exists():
        return 0
    db = sqlite3.connect(node_dir / DB_NAME, isolation_level=None, timeout=30)
    try:
        return db.execute("SELECT count(*) FROM shares").fetchone()[0]
    finally:
        db.close()


def fsync_folder(path: Path) -> None:
    """fsync of a directory: in a mount, every pending directory change goes onto the grid and the
    last PUTs of files already closed finish (see docs/architecture.md, the mount)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_filesystem_mounted(grid: LocalGrid, mnt: Path, *mount_args: str) -> Iterator[str]:
    """A new filesystem (under an alias of its own) mounted at `mnt`, which is created, with `mount_args`
    added to `tahoefs mount` (e.g. `--grid FILE`). Yields its root write cap; unmounted at the end even
    when the body fails."""
    import uuid

    alias = "t" + uuid.uuid4().hex[:8]
    root = grid.run("mkfs", "--alias", alias, check=True).stdout.decode().strip()
    mnt.mkdir()
    grid.run("mount", *mount_args, alias, str(mnt), check=True)
    try:
        yield root
    finally:
        if grid.run("umount", str(mnt)).returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
