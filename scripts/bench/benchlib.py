"""Shared helpers of the benchmarks in scripts/bench: a throwaway local grid, and running a command
while measuring its wall time, peak RSS and CPU seconds (and the nodes' CPU seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
TAHOEFS = [sys.executable, "-m", "tahoefs"]
MiB = 1024 * 1024

_MEASURE = (
    "import resource, subprocess, sys, time, json;"
    "t = time.perf_counter();"
    "r = subprocess.run(sys.argv[2:], stdout=(open(sys.argv[1], 'wb') if sys.argv[1] != '-' else None));"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN);"
    "print(json.dumps({'wall': time.perf_counter() - t, 'rss_kb': u.ru_maxrss,"
    " 'cpu': u.ru_utime + u.ru_stime, 'rc': r.returncode}))"
)


@dataclass
class Run:
    wall: float
    peak_rss_mib: float
    cpu: float
    node_cpu: float = 0.0


class BenchGrid:
    """A local grid in a temp TAHOEFS_HOME (or the given one), torn down on exit."""

    def __init__(self, nodes: int = 10, home: Path | None = None) -> None:
        self._tmp = None if home else tempfile.TemporaryDirectory(prefix="tahoefs-bench-", dir=bench_dir())
        self.home = home or Path(self._tmp.name)  # type: ignore[union-attr]
        self.env = {**os.environ, "TAHOEFS_HOME": str(self.home)}
        self.nodes = nodes

    def __enter__(self) -> BenchGrid:
        subprocess.run(
            [*TAHOEFS, "grid", "up", "--nodes", str(self.nodes)],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([*TAHOEFS, "grid", "down"], env=self.env, stdout=subprocess.DEVNULL)
        if self._tmp:
            self._tmp.cleanup()

    def node_pids(self) -> list[int]:
        rows = json.loads(
            subprocess.run(
                [*TAHOEFS, "grid", "status", "--json"], env=self.env, check=True, capture_output=True
            ).stdout
        )
        return [r["pid"] for r in rows if r["pid"]]

    def node_cpu(self) -> float:
        total = 0.0
        for pid in self.node_pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def measure(self, args: list[str], stdout_path: str = "-", ok_codes: tuple[int, ...] = (0,)) -> Run:
        """Run `tahoefs ARGS` (or any command when args[0] starts with '/'), measured; an exit code
        outside `ok_codes` ends the benchmark."""
        cmd = args if args[0].startswith("/") else [*TAHOEFS, *args]
        before = self.node_cpu()
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, stdout_path, *cmd], env=self.env, capture_output=True, check=True
        )
        stats = json.loads(out.stdout.decode().strip().splitlines()[-1])
        if stats["rc"] not in ok_codes:
            raise SystemExit(f"command failed ({stats['rc']}): {' '.join(cmd)}\n{out.stderr.decode()}")
        return Run(stats["wall"], stats["rss_kb"] / 1024, stats["cpu"], self.node_cpu() - before)

    def put(self, path: Path) -> tuple[str, Run]:
        cap_file = self.home / "cap.out"
        run = self.measure(["put", str(path)], str(cap_file))
        return cap_file.read_text().strip(), run


def bench_dir() -> str:
    """Where benchmark files live: $TAHOEFS_BENCH_DIR, else /var/tmp (a real disk, not tmpfs)."""
    return os.environ.get("TAHOEFS_BENCH_DIR", "/var/tmp")


def random_file(path: Path, size: int) -> Path:
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, MiB)
            f.write(chunk[:n] if left % 7 else os.urandom(n))
            left -= n
    return path


def drop_caches() -> bool:
    """Drop the page cache (root only), for cold reads. Returns whether it worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t
