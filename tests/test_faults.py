"""Node failures during transfers, with real processes killed for real."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tahoefs.formats.caps import FileCap, parse_cap
from tahoefs.formats.hashing import b32encode
from tahoefs.limits import SEGMENT_SIZE
from tests.localgrid import LocalGrid


def _pid(grid: LocalGrid, index: int) -> int:
    return int((grid.node_dir(index) / "pid").read_text())


def test_node_killed_during_upload_put_still_succeeds_and_leaves_no_partial_share(grid: LocalGrid) -> None:
    victim = 4
    first, rest = os.urandom(8 * SEGMENT_SIZE), os.urandom(12 * SEGMENT_SIZE + 3)
    proc = grid.popen("put", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(first)
    proc.stdin.flush()
    time.sleep(0.5)  # let the first segments reach the nodes
    incoming = list((grid.node_dir(victim) / "incoming").iterdir())
    assert incoming, "the victim should be receiving a share right now"
    os.kill(_pid(grid, victim), signal.SIGKILL)
    out, err = proc.communicate(rest, timeout=120)
    assert proc.returncode == 0, err
    cap = parse_cap(out.decode().strip())
    assert isinstance(cap, FileCap)
    si = b32encode(cap.storage_index)
    holders = grid.share_files(si)
    assert victim not in holders and len(holders) == 9
    grid.start(victim)  # restart: the abandoned temp file is wiped, no share appears
    assert victim not in grid.share_files(si)
    assert list((grid.node_dir(victim) / "incoming").iterdir()) == []
    assert grid.get_bytes(str(cap)) == first + rest
    # check --verify tells the truth about the damage, and repair undoes it.
    proc = grid.run("check", "--verify", str(cap))
    assert proc.returncode == 1 and b"not healthy: 9 of 10 shares on 9 nodes" in proc.stdout
    assert grid.run("check", "--repair", str(cap)).returncode == 0
    assert grid.run("check", "--verify", str(cap)).returncode == 0


def test_node_killed_during_download_get_still_returns_exact_bytes(grid: LocalGrid) -> None:
    data = os.urandom(24 * SEGMENT_SIZE + 1)
    cap = parse_cap(grid.put_bytes(data))
    assert isinstance(cap, FileCap)
    # Find the node holding primary share 0: the reader uses it first.
    holders = grid.share_files(b32encode(cap.storage_index))
    victim = next(node for node, files in holders.items() if files[0].num == 0)
    proc = grid.popen("get", str(cap), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    head = proc.stdout.read(4 * SEGMENT_SIZE)
    os.kill(_pid(grid, victim), signal.SIGKILL)
    tail, err = proc.communicate(timeout=120)
    try:
        assert proc.returncode == 0, err
        assert head + tail == data
        check = grid.run("check", str(cap))
        assert check.returncode == 1 and grid.config().nodes[victim].url.encode() in check.stdout
    finally:
        grid.start(victim)
    assert grid.run("check", "--verify", str(cap)).returncode == 0  # nothing was lost


def test_restart_of_every_node_between_write_and_read(grid: LocalGrid) -> None:
    data = os.urandom(3 * SEGMENT_SIZE + 77)
    cap = grid.put_bytes(data)
    grid.down()
    grid.up()
    assert grid.get_bytes(cap) == data
    assert grid.run("check", "--verify", cap).returncode == 0


def _set_stall_timeout(grid: LocalGrid, seconds: float) -> None:
    path = grid.home / "grid.toml"
    text = path.read_text()
    if "[timeouts]" not in text:
        path.write_text(text.replace("[encoding]", f"[timeouts]\nstall = {seconds}\n\n[encoding]", 1))


def test_a_stalled_node_costs_at_most_its_deadline_on_read_and_write(grid: LocalGrid) -> None:
    """SIGSTOP freezes a node: the kernel still accepts connections, nothing answers."""
    data = os.urandom(24 * SEGMENT_SIZE + 1)
    cap = parse_cap(grid.put_bytes(data))
    assert isinstance(cap, FileCap)
    holders = grid.share_files(b32encode(cap.storage_index))
    frozen = next(node for node, files in holders.items() if files[0].num == 0)  # a primary
    _set_stall_timeout(grid, 2.0)
    pid = _pid(grid, frozen)
    try:
        # Frozen before the read: it never answers "which shares do you hold", and is simply not used.
        os.kill(pid, signal.SIGSTOP)
        proc = grid.run("get", str(cap), timeout=60)
        assert proc.returncode == 0 and proc.stdout == data, proc.stderr
        # Frozen in the middle of a read: its block requests stall, it is dropped after the deadline.
        os.kill(pid, signal.SIGCONT)
        started = time.monotonic()
        reader = grid.popen("get", str(cap), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert reader.stdout is not None
        head = reader.stdout.read(4 * SEGMENT_SIZE)
        os.kill(pid, signal.SIGSTOP)
        tail, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert head + tail == data
        assert grid.config().nodes[frozen].url in err.decode() and b"stalled" in err
        assert time.monotonic() - started < 40  # bounded by the deadline, not forever
        # check names the frozen node and says the file is not healthy, within the deadline too.
        proc = grid.run("check", str(cap), timeout=60)
        assert proc.returncode == 1
        assert b"not healthy: 9 of 10" in proc.stdout and b"did not answer in time" in proc.stdout
        # A write with a frozen node: the node is dropped as stalled, the other nine hold shares.
        proc = grid.run("put", "-", input=os.urandom(SEGMENT_SIZE * 8), timeout=60)
        assert proc.returncode == 0, proc.stderr
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_node_whose_disk_is_full_costs_a_share_not_the_upload(grid: LocalGrid, tmp_path) -> None:
    """Node 3's data folder is moved onto a 16 MiB tmpfs: below its free-space reserve it answers 507."""
    import shutil

    victim = 3
    folder = grid.node_dir(victim)
    aside = tmp_path / "aside"
    grid.stop(victim)
    # Only the node's identity goes onto the tmpfs; its old shares stay underneath, back after umount.
    shutil.copytree(folder, aside, ignore=shutil.ignore_patterns("shares", "mutable", "incoming"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], check=True)
    try:
        shutil.copytree(aside, folder, dirs_exist_ok=True)
        grid.start(victim)
        data = os.urandom(3 * SEGMENT_SIZE)
        proc = grid.run("put", "-", input=data)
        assert proc.returncode == 0, proc.stderr
        cap = proc.stdout.decode().strip()
        assert victim not in grid.share_files(b32encode(parse_cap(cap).storage_index))  # type: ignore[union-attr]
        assert grid.get_bytes(cap) == data
        check = grid.run("check", "--verify", cap)
        assert check.returncode == 1 and b"not healthy: 9 of 10 shares on 9 nodes" in check.stdout
    finally:
        grid.stop(victim)
        subprocess.run(["umount", str(folder)], check=False)
        grid.start(victim)
