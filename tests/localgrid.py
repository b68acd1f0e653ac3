"""Test harness: a real local grid (real `tahoefs node` processes on 127.0.0.1) and the `tahoefs` CLI run
as a real subprocess against it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tahoefs.cli.home import client_secret
from tahoefs.grid.config import GridConfig, load_grid


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

    def share_files(self, storage_index_b32: str) -> dict[int, list[Path]]:
        """node index -> committed share files of that storage index on that node."""
        found: dict[int, list[Path]] = {}
        for node in sorted((self.home / "nodes").glob("node-*")):
            folder = node / "shares" / storage_index_b32[:2] / storage_index_b32
            files = sorted(folder.iterdir()) if folder.exists() else []
            if files:
                found[int(node.name.removeprefix("node-"))] = files
        return found

    def put_bytes(self, data: bytes) -> str:
        proc = self.run("put", "-", input=data, check=True)
        return proc.stdout.decode().strip()

    def get_bytes(self, cap: str) -> bytes:
        return self.run("get", cap, check=True).stdout
