"""Slow and stalled nodes cost a read a bounded, small amount of time: real nodes, and a real TCP proxy
process (tests/slowproxy.py) in front of the nodes under test, reached through a copy of the grid file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tahoefs.formats.caps import FileCap, parse_cap
from tahoefs.formats.hashing import b32encode
from tahoefs.grid.config import load_grid, save_grid
from tahoefs.limits import DOWNLOAD_WINDOW_SEGMENTS, SEGMENT_SIZE
from tests.localgrid import LocalGrid, fsync_folder, new_filesystem_mounted

PROXY = Path(__file__).with_name("slowproxy.py")


@contextmanager
def _proxied(grid: LocalGrid, nodes: list[int], *mode: str, stall: float | None = None) -> Iterator[Path]:
    """A copy of the grid file in which each of `nodes` is reached through its own slowproxy process
    started with `mode`. Node ids (the placement key) are kept, so placement does not change. The
    proxies are killed on the way out, whatever happened."""
    config = grid.config()
    proxies: list[subprocess.Popen[str]] = []
    try:
        for index in nodes:
            node = config.nodes[index]
            assert node.id, "local grid files name each node's id: the url may change, placement not"
            proc = subprocess.Popen(
                [sys.executable, str(PROXY), "0", urlsplit(node.url).netloc, *mode],
                stdout=subprocess.PIPE,
                text=True,
            )
            proxies.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "listening on 127.0.0.1:PORT"
            assert line.startswith("listening on "), line
            node.url = "http://" + line.split()[-1]
        if stall is not None:
            config.stall_timeout = stall
        path = grid.home / f"grid-proxied-{uuid.uuid4().hex[:8]}.toml"
        save_grid(config, path)
        yield path
    finally:
        for proc in proxies:
            proc.kill()
            proc.wait()


@contextmanager
def _mounted_with_slow_node_0(grid: LocalGrid, tmp_path: Path, *mode: str) -> Iterator[Path]:
    """A new filesystem mounted through a grid file in which node 0 sits behind a slowproxy started
    with `mode`; unmounted on the way out, whatever happened."""
    mnt = tmp_path / "mnt"
    with _proxied(grid, [0], *mode) as grid_file, new_filesystem_mounted(grid, mnt, "--grid", str(grid_file)):
        yield mnt


def _holders_of(grid: LocalGrid, cap: FileCap, shares: set[int]) -> list[int]:
    """The nodes holding any of `shares` of the file."""
    holders = grid.share_files(b32encode(cap.storage_index))
    return sorted(node for node, files in holders.items() if {f.num for f in files} & shares)


def test_slow_nodes_holding_primary_shares_are_routed_around(grid: LocalGrid) -> None:
    """Both nodes holding primary shares 0 and 1 (the cheapest to decode, so tried first) answer every
    block request 2 s late. The reader hedges past them and then leaves them out."""
    delay, segments = 2.0, 32
    data = os.urandom(segments * SEGMENT_SIZE)
    cap = parse_cap(grid.put_bytes(data))
    assert isinstance(cap, FileCap)
    slow = _holders_of(grid, cap, {0, 1})
    # `--pass 1`: each node answers "which shares do you hold" at once; only block requests are slow.
    with _proxied(grid, slow, "--delay", str(delay), "--pass", "1") as grid_file:
        started = time.monotonic()
        proc = grid.run("get", "--grid", str(grid_file), str(cap), timeout=300)
        elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    # Not a speed test: a bound that only routing around can meet. A reader that waited for the slow
    # nodes would spend `delay` on every segment, with at most DOWNLOAD_WINDOW_SEGMENTS segments waiting
    # at once; the bound is half of that (the read itself takes well under a second here).
    cost_of_waiting = segments / DOWNLOAD_WINDOW_SEGMENTS * delay
    assert elapsed < cost_of_waiting / 2, (elapsed, proc.stderr)


@pytest.mark.parametrize("share", [0, 1], ids=["trailer-first-read-from-it", "blocks-read-from-it"])
def test_a_node_that_stops_answering_costs_a_read_at_most_the_stall_deadline(
    grid: LocalGrid, share: int
) -> None:
    """A node that accepts connections and never answers (after telling which shares it holds): the
    read returns exact bytes within one stall deadline plus the read's own time, and names the node.
    Share 0's node is the one whose trailer the reader asks first for the segment size (not hedged:
    it costs the deadline); share 1's node is asked only for blocks (hedged around)."""
    stall_deadline = 3.0
    data = os.urandom(8 * SEGMENT_SIZE + 1)
    cap = parse_cap(grid.put_bytes(data))
    assert isinstance(cap, FileCap)
    stalled = _holders_of(grid, cap, {share})
    with _proxied(grid, stalled, "--stall", "--pass", "1", stall=stall_deadline) as grid_file:
        url = next(n.url for n in load_grid(grid_file).nodes if n.id == grid.config().nodes[stalled[0]].id)
        started = time.monotonic()
        proc = grid.run("get", "--grid", str(grid_file), str(cap), timeout=120)
        elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    assert url in proc.stderr.decode(), proc.stderr
    # Bounded by the deadline, not by the node; the margin is for the read itself on a loaded machine.
    assert elapsed < stall_deadline + 5, (elapsed, proc.stderr)


def test_a_mount_upload_returns_at_happy_and_a_slow_nodes_put_finishes_after(grid: LocalGrid) -> None:
    """With a Lingering (as the mount uploads), an upload returns once `happy` nodes committed; the PUT
    to a node that answers 6 s late finishes in the background, and the file ends with all 10 shares.
    When the stragglers would not fit in the lingering budget, the upload waits for all, as the CLI's."""
    import trio

    from tahoefs.grid.client import GridClient
    from tahoefs.grid.delete import delete_file
    from tahoefs.grid.streams import Lingering
    from tahoefs.grid.upload import BytesSource, upload

    data = os.urandom(6000)
    with _proxied(grid, [0], "--delay", "6") as grid_file:

        async def main() -> tuple[str, str, str]:
            config = load_grid(grid_file)
            async with GridClient(config, grid.client_secret()) as client, trio.open_nursery() as nursery:
                lingering = Lingering(nursery, 1 << 20)
                cap = await upload(client, BytesSource(data), size=len(data), lingering=lingering)
                assert lingering.uploads == 1  # node 0's PUT is still waiting for its answer
                await lingering.wait_idle()
                assert lingering.uploads == 0 and lingering.left == 1 << 20
                tight = Lingering(nursery, 1)  # room for no straggler at all
                other = await upload(client, BytesSource(data), size=len(data), lingering=tight)
                assert tight.uploads == 0  # returned only after every PUT, node 0's included
                # A file dropped while its last PUT still runs: settle() cancels that PUT and waits
                # for it, so the delete that follows leaves no share behind on any node.
                dropped = await upload(client, BytesSource(data), size=len(data), lingering=lingering)
                assert lingering.uploads == 1
                with trio.fail_after(4):  # well before the 6 s the slow node would take to answer
                    await lingering.settle(dropped.storage_index)  # type: ignore[union-attr]
                assert lingering.uploads == 0
                await delete_file(client, dropped)  # type: ignore[arg-type]
            return str(cap), str(other), str(dropped)

        cap, other, dropped = trio.run(main)
    for kept in (cap, other):
        assert len(grid.share_files(b32encode(parse_cap(kept).storage_index))) == 10  # type: ignore[union-attr]
        assert grid.get_bytes(kept) == data
    assert grid.share_files(b32encode(parse_cap(dropped).storage_index)) == {}  # type: ignore[union-attr]


def test_status_shows_uploads_in_flight_lingering_shares_and_pending_directory_changes(
    grid: LocalGrid, tmp_path: Path
) -> None:
    """`tahoefs status` while a mount works: a big file's upload in flight with its progress, a small
    file saved whose last share (to a node answering 5 s late) is still being sent, and the directory
    changes waiting in the journal; then nothing once all is on the grid."""
    import json
    import threading

    # Node 0 answers share PUTs 5 s late: `finishing` stays visible for about that long, several samples
    # of `tahoefs status` even on a busy machine.
    with _mounted_with_slow_node_0(grid, tmp_path, "--delay", "5", "--only", "PUT /v1/immutable/") as mnt:
        seen: dict[str, object] = {}

        def write() -> None:
            (mnt / "big.bin").write_bytes(os.urandom(48 * SEGMENT_SIZE))  # too big to linger
            (mnt / "small.bin").write_bytes(os.urandom(6000))  # lingers: node 0 answers late

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (writer.is_alive() or len(seen) < 3):
            rows = json.loads(grid.run("status", "--json", str(mnt), check=True).stdout)
            st = rows[0].get("status") or {}
            for up in st.get("uploads", []):
                if up["target"] == "big.bin" and up["bytes_done"] > 0:
                    seen["upload"] = up["bytes_done"]
            if st.get("finishing_uploads"):
                seen["finishing"] = st["finishing_uploads"]
            if st.get("pending_directory_changes"):
                seen["pending"] = st["pending_directory_changes"]
            time.sleep(0.2)
        writer.join()
        assert set(seen) == {"upload", "finishing", "pending"}, seen
        fsync_folder(mnt)  # every directory change onto the grid
        text = ""
        for _ in range(50):  # the status file is rewritten every second
            text = grid.run("status", str(mnt), check=True).stdout.decode()
            if "still being sent" not in text and "not yet on the grid" not in text:
                break
            time.sleep(0.2)
        assert text.startswith(f"{mnt}: pid ") and "running" in text, text
        assert "uploading" not in text and "not yet on the grid" not in text, text


def test_fsync_of_a_folder_waits_for_the_last_puts_of_files_closed_before(
    grid: LocalGrid, tmp_path: Path
) -> None:
    """close() returns once `happy` nodes hold a file; the PUT to a node that gets each share 6 s late
    lingers. An fsync of a folder waits for it, so right after it the file sits on all 10 nodes."""
    with _mounted_with_slow_node_0(grid, tmp_path, "--hold", "6", "--only", "PUT /v1/immutable/") as mnt:
        (mnt / "small.bin").write_bytes(os.urandom(6000))
        cap = parse_cap(grid.run("cap", str(mnt / "small.bin"), check=True).stdout.decode().strip())
        assert isinstance(cap, FileCap)
        si = b32encode(cap.storage_index)
        assert len(grid.share_files(si)) < 10  # node 0 has not got its share yet
        fsync_folder(mnt)
        assert len(grid.share_files(si)) == 10
