"""Flat memory (Tahoe-LAFS ticket #29): the peak RSS of put and get does not grow with the file size.
scripts/bench/memory measures the same at 16 MiB vs 1 GiB; this test uses 16 vs 192 MiB to stay quick."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.localgrid import LocalGrid

MiB = 1024 * 1024
BUDGET_MIB = 128
GROWTH_MIB = 16

_MEASURE = (
    "import resource, subprocess, sys, json;"
    "r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'wb'));"
    "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
)


def peak_rss_mib(grid: LocalGrid, out: Path, *args: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(out), sys.executable, "-m", "tahoefs", *args],
        env=grid.env,
        capture_output=True,
        check=True,
    )
    rc, rss_kb = json.loads(proc.stdout)
    assert rc == 0, proc.stderr
    return rss_kb / 1024


def _file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        block = bytes(range(256)) * (MiB // 256)
        for i in range(size // MiB):
            f.write(block[i % 256 :] + block[: i % 256])
    return path


def test_put_and_get_peak_rss_does_not_grow_with_file_size(grid: LocalGrid, tmp_path: Path) -> None:
    peaks: dict[str, list[float]] = {"put": [], "get": []}
    for size in (16 * MiB, 192 * MiB):
        src = _file(tmp_path / "src", size)
        cap_file = tmp_path / "cap"
        peaks["put"].append(peak_rss_mib(grid, cap_file, "put", str(src)))
        cap = cap_file.read_text().strip()
        peaks["get"].append(peak_rss_mib(grid, tmp_path / "back", "get", cap))
        assert (tmp_path / "back").stat().st_size == size
    for name, (small, large) in peaks.items():
        assert large <= BUDGET_MIB, f"{name}: {large:.1f} MiB peak"
        assert large - small <= GROWTH_MIB, (
            f"{name}: grew {large - small:.1f} MiB ({small:.1f} -> {large:.1f})"
        )


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_mount_daemon_peak_rss_does_not_grow_with_file_size(mounted, tmp_path: Path) -> None:
    grid, mnt, _root = mounted
    state = next(p for p in (grid.home / "mounts").glob("*.json") if p.name.count(".") == 1)
    pid = json.loads(state.read_text())["pid"]
    peaks = []
    for size in (16 * MiB, 192 * MiB):
        src = _file(tmp_path / "src", size)
        subprocess.run(["cp", str(src), str(mnt / f"f{size}")], check=True)
        peaks.append(_vm_hwm_mib(pid))
    subprocess.run(["cat", str(mnt / f"f{192 * MiB}")], check=True, stdout=subprocess.DEVNULL)
    peaks.append(_vm_hwm_mib(pid))
    after_small, after_large, after_cat = peaks
    assert after_large - after_small <= GROWTH_MIB, peaks
    assert after_cat - after_large <= GROWTH_MIB, peaks
    assert after_cat <= 192, peaks
