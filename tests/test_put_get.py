"""put/get through real node processes: round trips, random access, node failures, bad input."""

from __future__ import annotations

import os
import random

import pytest
import trio

from tahoefs.formats.caps import FileCap, LiteralCap, parse_cap
from tahoefs.formats.hashing import b32encode
from tahoefs.grid.client import GridClient
from tahoefs.grid.download import FileReader
from tahoefs.limits import LITERAL_MAX, SEGMENT_SIZE
from tests.localgrid import LocalGrid

SEG = SEGMENT_SIZE


@pytest.mark.parametrize(
    "size",
    [0, 1, LITERAL_MAX, LITERAL_MAX + 1, SEG - 1, SEG, SEG + 1, 3 * SEG + 12345],
    ids=["empty", "1B", "literal-max", "literal-max+1", "seg-1", "seg", "seg+1", "multi-seg"],
)
def test_put_then_get_returns_the_same_bytes(grid: LocalGrid, size: int, tmp_path) -> None:
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    from_stdin = grid.put_bytes(data)  # size unknown: chunked share bodies
    from_file = grid.run("put", str(src), check=True).stdout.decode().strip()  # size known: Content-Length
    for cap in (from_stdin, from_file):
        assert cap.startswith("tahoefs:")
        assert isinstance(parse_cap(cap), LiteralCap if size <= LITERAL_MAX else FileCap)
        assert grid.get_bytes(cap) == data


def test_put_from_a_file_and_get_to_a_file(grid: LocalGrid, tmp_path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(2 * SEG + 7))
    cap = grid.run("put", str(src), check=True).stdout.decode().strip()
    out = tmp_path / "out.bin"
    grid.run("get", cap, "-o", str(out), check=True)
    assert out.read_bytes() == src.read_bytes()
    assert not (tmp_path / "out.bin.part").exists()


def test_every_share_lands_on_its_own_node(grid: LocalGrid) -> None:
    cap = parse_cap(grid.put_bytes(os.urandom(SEG + 5)))
    assert isinstance(cap, FileCap)
    holders = grid.share_files(b32encode(cap.storage_index))
    assert len(holders) == 10
    assert all(len(files) == 1 for files in holders.values())


def test_random_ranges_read_exactly_the_bytes_asked_for(grid: LocalGrid) -> None:
    data = os.urandom(4 * SEG + 999)
    cap = parse_cap(grid.put_bytes(data))
    rng = random.Random(29)
    ranges = [(rng.randrange(len(data)), rng.choice([1, 17, 4096, SEG, 2 * SEG + 3])) for _ in range(25)]
    ranges += [(0, len(data)), (len(data) - 1, 10), (len(data), 5), (SEG - 1, 2)]

    async def check() -> None:
        async with GridClient(grid.config(), grid.client_secret()) as client:
            reader = FileReader(client, cap)  # type: ignore[arg-type]
            for offset, size in ranges:
                assert await reader.read(offset, size) == data[offset : offset + size], (offset, size)
            assert reader.problems == []

    trio.run(check)


@pytest.mark.parametrize("down", [[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 1, 9]])
def test_reads_survive_any_seven_of_ten_nodes_down(grid: LocalGrid, down: list[int]) -> None:
    data = os.urandom(2 * SEG + 100)
    cap = grid.put_bytes(data)
    grid.stop(*down)
    try:
        proc = grid.run("get", cap)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == data
    finally:
        grid.start(*down)


def test_reads_fail_clearly_with_eight_nodes_down(grid: LocalGrid) -> None:
    cap = grid.put_bytes(os.urandom(SEG + 100))
    down = [0, 1, 2, 3, 4, 5, 6, 7]
    grid.stop(*down)
    try:
        proc = grid.run("get", cap)
    finally:
        grid.start(*down)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "need 3 good shares" in lines[0], lines
    assert "Traceback" not in proc.stderr.decode()


def test_flipped_bytes_on_three_nodes_are_caught_and_named(grid: LocalGrid) -> None:
    data = os.urandom(3 * SEG + 5)
    cap = parse_cap(grid.put_bytes(data))
    holders = grid.share_files(b32encode(cap.storage_index))  # type: ignore[union-attr]
    # Corrupt the primary shares (the ones a reader tries first): a block, the trailer, the footer.
    by_share = {shares[0].num: (node, shares[0]) for node, shares in holders.items()}
    bad_nodes = []
    for share, where in zip([0, 1, 2], ["block", "trailer", "footer"], strict=True):
        node, stored = by_share[share]
        size = stored.size()
        stored.flip({"block": SEG // 3 + 10, "trailer": size - 200, "footer": size - 5}[where])
        bad_nodes.append(node)
    proc = grid.run("get", str(cap))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    stderr = proc.stderr.decode()
    urls = {n.url for n in grid.config().nodes}
    named = {u for u in urls if u in stderr}
    expected = {grid.config().nodes[i].url for i in bad_nodes}
    assert named == expected, stderr


def test_put_with_fewer_than_happy_nodes_fails_and_leaves_no_shares(grid: LocalGrid) -> None:
    shares_before = grid.share_count()
    down = [0, 1, 2, 3]
    grid.stop(*down)
    try:
        proc = grid.run("put", "-", input=os.urandom(SEG + 1))
    finally:
        grid.start(*down)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "upload failed" in lines[0] and "of the 7 nodes needed" in lines[0]
    assert proc.stdout == b""
    # The six shares that were placed were deleted again: nothing new is left on any node.
    assert grid.share_count() == shares_before


def test_put_with_exactly_happy_nodes_succeeds(grid: LocalGrid) -> None:
    down = [7, 8, 9]
    grid.stop(*down)
    try:
        data = os.urandom(SEG + 1)
        cap = grid.put_bytes(data)
    finally:
        grid.start(*down)
    holders = grid.share_files(b32encode(parse_cap(cap).storage_index))  # type: ignore[union-attr]
    assert len(holders) == 7
    assert grid.get_bytes(cap) == data


@pytest.mark.parametrize(
    "cap",
    [
        "hello",
        "tahoefs:file:v1:abc",
        "tahoefs:nope:v1:x",
        "tahoefs:file:v9:a:b:3:10:5",
        "URI:CHK:aa:bb:3:10:100",
    ],
)
def test_malformed_cap_exits_2_with_one_line(grid: LocalGrid, cap: str) -> None:
    proc = grid.run("get", cap)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_missing_file_and_unknown_command_exit_2(grid: LocalGrid) -> None:
    proc = grid.run("put", "/nonexistent/file")
    assert proc.returncode == 2 and b"no such file" in proc.stderr
    assert grid.run("frobnicate").returncode == 2


def test_missing_grid_file_is_a_clear_usage_error(fresh_home: LocalGrid) -> None:
    proc = fresh_home.run("put", "-", input=b"x" * 100)
    assert proc.returncode == 2
    assert b"grid up" in proc.stderr and b"Traceback" not in proc.stderr


def test_get_into_a_device_or_a_fifo_writes_into_it_and_leaves_it_in_place(grid: LocalGrid, tmp_path) -> None:
    """`-o /dev/null` must not rename a downloaded file over the device (it once did: /dev/null became a
    regular file). Tested on a private null device and a FIFO, never on the real /dev/null."""
    import stat
    import threading

    data = os.urandom(300_000)
    cap = grid.put_bytes(data)
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    grid.run("get", cap, "-o", str(null), check=True)
    assert stat.S_ISCHR(null.stat().st_mode)
    assert not (tmp_path / "null.part").exists()

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    grid.run("get", cap, "-o", str(fifo), check=True)
    reader.join(timeout=30)
    assert received == [data]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
