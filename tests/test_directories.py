"""Directories on a real local grid: round trips, read-only views, failures, tampering, concurrent writers."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from tahoefs.errors import EntryExistsError, NoSuchEntryError, ReadOnlyError
from tahoefs.formats.caps import DirReadCap, DirWriteCap, parse_cap
from tahoefs.formats.dirformat import (
    BUCKET_SPLIT_BYTES,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    ROOT_INLINE_MAX,
    Entry,
    encode_root,
)
from tahoefs.formats.hashing import b32encode
from tahoefs.grid.client import GridClient
from tahoefs.grid.directory import Directory
from tests.localgrid import LocalGrid


def run_with_grid(grid: LocalGrid, fn: Callable[[GridClient], Awaitable[object]]) -> object:
    async def main() -> object:
        async with GridClient(grid.config(), grid.client_secret()) as client:
            return await fn(client)

    return trio.run(main)


def every_kind() -> list[Entry]:
    return [
        Entry(
            b"inline.txt",
            KIND_FILE,
            0o600,
            1000,
            1000,
            5,
            1_700_000_000_123_456_789,
            1_700_000_001_000_000_000,
            inline=b"hello",
        ),
        Entry(b"big.bin", KIND_FILE, 0o644, 0, 0, 10**9, 1, 2, cap="tahoefs:lit:v1:nbswy3dp"),
        Entry("ünïcødé ✓.txt".encode(), KIND_FILE, 0o644, inline=b""),
        Entry(b"link", KIND_SYMLINK, 0o777, target=b"../somewhere/else"),
        Entry(b"dangling", KIND_SYMLINK, 0o777, target=b"/does/not/exist"),
        Entry(b"attrs", KIND_FILE, 0o640, xattrs={b"user.color": b"blue", b"user.bin": bytes(range(256))}),
        Entry(b"\xff\xfe-not-utf8", KIND_FILE, 0o644, inline=b"raw bytes name"),
    ]


def test_every_entry_kind_round_trips(grid: LocalGrid) -> None:
    async def go(client: GridClient) -> None:
        root = await Directory.create(client)
        for entry in every_kind():
            await root.link(entry)
        sub = await root.mkdir(b"sub", 0o750, 5, 6, 123)
        await sub.link(Entry(b"deep", KIND_FILE, inline=b"deep data"))
        # a fresh Directory object (nothing cached) reads the same
        again = Directory(client, root.cap)
        seen: list[Entry] = []

        async def sink(entries: list[Entry]) -> None:
            seen.extend(entries)

        assert await again.scan(sink) == len(every_kind()) + 1
        by_name = {e.name: e for e in seen}
        for entry in every_kind():
            assert by_name[entry.name] == entry
        sub_entry = by_name[b"sub"]
        assert (sub_entry.kind, sub_entry.mode, sub_entry.uid, sub_entry.gid) == (KIND_DIR, 0o750, 5, 6)
        assert (await again.child(sub_entry).get(b"deep")).inline == b"deep data"

    run_with_grid(grid, go)


def test_link_unlink_and_errors(grid: LocalGrid) -> None:
    async def go(client: GridClient) -> None:
        d = await Directory.create(client)
        await d.link(Entry(b"a", KIND_FILE, inline=b"1"))
        with pytest.raises(EntryExistsError):
            await d.link(Entry(b"a", KIND_FILE, inline=b"2"))
        old = await d.link(Entry(b"a", KIND_FILE, inline=b"3"), replace=True)
        assert old is not None and old.inline == b"1"
        assert (await d.unlink(b"a")).inline == b"3"
        with pytest.raises(NoSuchEntryError):
            await d.unlink(b"a")
        assert await d.lookup(b"a") is None
        with pytest.raises(ValueError):
            await d.link(Entry(b"a/b", KIND_FILE))

    run_with_grid(grid, go)


def test_large_directory_spills_into_buckets_and_stays_correct(grid: LocalGrid) -> None:
    async def go(client: GridClient) -> None:
        d = await Directory.create(client)
        names = [f"file-{i:05d}".encode() for i in range(3000)]
        for start in range(0, len(names), 500):
            batch = names[start : start + 500]
            await d.modify_many(
                {n: (lambda old, n=n: Entry(n, KIND_FILE, size=len(n), inline=n)) for n in batch}
            )
        _version, buckets = await d._load()
        assert len(buckets) > 1 and any(b.cap for b in buckets), "3000 entries should not fit inside the root"
        assert all(b.inline is None for b in buckets)  # past the budget, the root is an index of files
        count = 0

        async def sink(entries: list[Entry]) -> None:
            nonlocal count
            count += len(entries)
            assert all(e.inline == e.name for e in entries)

        assert await d.scan(sink) == 3000 == count
        assert (await d.get(b"file-01234")).size == 10
        await d.unlink(b"file-01234")
        assert await d.lookup(b"file-01234") is None
        assert await d.count() == 2999

    run_with_grid(grid, go)


def test_cli_tree_reads_back_from_a_fresh_home_with_only_grid_file_and_root_cap(
    grid: LocalGrid, tmp_path: Path
) -> None:
    root = grid.run("mkfs", "--alias", "t1", check=True).stdout.decode().strip()
    grid.run("mkdir", "t1:docs", check=True)
    small, big = tmp_path / "small.txt", tmp_path / "big.bin"
    small.write_bytes(b"small file\n")
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    grid.run("put", str(small), "t1:docs/", check=True)
    grid.run("put", str(big), "t1:docs/big.bin", check=True)
    other = LocalGrid(tmp_path / "other-home")
    other.home.mkdir()
    shutil.copy(grid.home / "grid.toml", other.home / "grid.toml")
    other.run("alias", "add", "mine", root, check=True)
    listing = other.run("ls", "mine:docs", check=True).stdout.decode().split()
    assert sorted(listing) == ["big.bin", "small.txt"]
    assert other.run("get", "mine:docs/small.txt", check=True).stdout == b"small file\n"
    assert other.run("get", f"{root}/docs/big.bin", check=True).stdout == big.read_bytes()


def test_read_cap_gives_a_read_only_view(grid: LocalGrid) -> None:
    root = parse_cap(grid.run("mkfs", "--alias", "t2", check=True).stdout.decode().strip())
    assert isinstance(root, DirWriteCap)
    grid.run("mkdir", "t2:sub", check=True)
    ro = str(root.read_cap())
    assert grid.run("ls", f"{ro}").stdout.decode().split() == ["sub/"]
    for args in (["mkdir", f"{ro}/new"], ["mkdir", f"{ro}/sub/new"], ["put", "-", f"{ro}/f"]):
        proc = grid.run(*args, input=b"data")
        assert proc.returncode == 2, args
        err = proc.stderr.decode().strip()
        assert "read-only" in err and len(err.splitlines()) == 1, err

    async def child_is_read_only(client: GridClient) -> None:
        parent = Directory(client, root.read_cap())
        child = parent.child(await parent.get(b"sub"))
        assert isinstance(child.cap, DirReadCap) and not child.writable
        with pytest.raises(ReadOnlyError):
            await child.link(Entry(b"x", KIND_FILE))

    run_with_grid(grid, child_is_read_only)


def test_directories_still_read_with_seven_of_ten_nodes_down(grid: LocalGrid) -> None:
    grid.run("mkfs", "--alias", "t3", check=True)
    grid.run("mkdir", "t3:a", check=True)
    grid.run("put", "-", "t3:a/f", input=b"x" * 10000, check=True)
    down = [1, 3, 4, 5, 6, 8, 9]
    grid.stop(*down)
    try:
        assert grid.run("ls", "t3:a", check=True).stdout.decode().split() == ["f"]
        assert grid.run("get", "t3:a/f", check=True).stdout == b"x" * 10000
        proc = grid.run("mkdir", "t3:b")
        assert proc.returncode == 1 and b"directory update failed" in proc.stderr
    finally:
        grid.start(*down)


def _slot_files(grid: LocalGrid, si: bytes) -> dict[int, Path]:
    s = b32encode(si)
    found = {}
    for i in range(10):
        folder = grid.node_dir(i) / "mutable" / s[:2] / s
        if folder.exists():
            files = list(folder.iterdir())
            assert len(files) == 1
            found[i] = files[0]
    return found


def test_tampered_stale_and_forged_versions_are_caught_and_outvoted(grid: LocalGrid) -> None:
    async def setup(client: GridClient) -> Directory:
        d = await Directory.create(client)
        await d.link(Entry(b"v1", KIND_FILE, inline=b"one"))
        return d

    d = run_with_grid(grid, setup)
    assert isinstance(d, Directory)
    slots = _slot_files(grid, d.obj.si)
    assert len(slots) == 10
    old_copies = {i: p.read_bytes() for i, p in slots.items()}

    async def second(client: GridClient) -> None:
        await Directory(client, d.cap).link(Entry(b"v2", KIND_FILE, inline=b"two"))

    run_with_grid(grid, second)
    nodes = sorted(slots)
    stale, flipped, truncated, forged = nodes[0], nodes[1], nodes[2], nodes[3]
    slots[stale].write_bytes(old_copies[stale])  # an older, validly signed version
    data = bytearray(slots[flipped].read_bytes())
    data[-10] ^= 1
    slots[flipped].write_bytes(bytes(data))
    slots[truncated].write_bytes(slots[truncated].read_bytes()[:-50])
    # A version signed by someone else's key, planted under this storage index.
    from tahoefs.formats.mutable import encode_version

    other = DirWriteCap(os.urandom(32))
    fake = encode_version(other, 99, b"evil", 3, 10)
    header = slots[forged].read_bytes()[:64]
    num = int(slots[forged].name)
    slots[forged].write_bytes(header + fake[num])

    async def read(client: GridClient) -> tuple[list[bytes], list[str]]:
        fresh = Directory(client, d.cap.read_cap())
        names: list[bytes] = []

        async def sink(entries: list[Entry]) -> None:
            names.extend(e.name for e in entries)

        await fresh.scan(sink)
        return sorted(names), fresh.problems

    names, problems = run_with_grid(grid, read)  # type: ignore[misc]
    assert names == [b"v1", b"v2"]
    urls = grid.config().nodes
    text = "\n".join(problems)
    for index in (stale, flipped, truncated, forged):
        assert urls[index].url in text, (index, problems)
    assert "older version" in text


def test_a_write_with_the_wrong_write_enabler_is_refused(grid: LocalGrid) -> None:
    from tahoefs.storage.client import NodeClient

    async def go(client: GridClient) -> None:
        d = await Directory.create(client)
        node: NodeClient = client.nodes[0]
        slots = await node.list_slots(d.obj.si)
        num, info = next(iter(slots.items()))
        with pytest.raises(Exception) as excinfo:
            await node.write_slot(d.obj.si, num, b"x" * 100, b"\0" * 32, info.seqnum, info.seqnum + 1)
        assert "403" in str(excinfo.value) or "enabler" in str(excinfo.value)
        assert (await node.list_slots(d.obj.si))[num].seqnum == info.seqnum

    run_with_grid(grid, go)


def test_two_concurrent_writers_both_land(grid: LocalGrid) -> None:
    grid.run("mkfs", "--alias", "race", check=True)
    procs = []
    for writer in ("a", "b"):
        script = "; ".join(f"{grid_cmd()} put - race:{writer}-{i} < /dev/null" for i in range(8))
        procs.append(subprocess.Popen(["bash", "-c", script], env=grid.env, stderr=subprocess.PIPE))
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    names = sorted(grid.run("ls", "race:", check=True).stdout.decode().split())
    assert names == sorted([f"{w}-{i}" for w in "ab" for i in range(8)])


def grid_cmd() -> str:
    import shlex
    import sys

    return f"{shlex.quote(sys.executable)} -m tahoefs"


def test_many_concurrent_writers_in_one_process_lose_nothing(grid: LocalGrid) -> None:
    async def go(client: GridClient) -> int:
        d = await Directory.create(client)
        async with GridClient(grid.config(), grid.client_secret()) as other:
            writers = [Directory(client, d.cap), Directory(other, d.cap)]
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(writers[i % 2].link, Entry(f"e{i}".encode(), KIND_FILE, inline=b"x"))
        return await Directory(client, d.cap).count()

    assert run_with_grid(grid, go) == 12


def test_a_signed_root_naming_an_impossibly_large_bucket_is_refused_before_any_download(
    grid: LocalGrid,
) -> None:
    """A co-writer (anyone with the write cap) cannot make readers hold a huge bucket in memory."""
    from tahoefs.errors import IntegrityError
    from tahoefs.formats.caps import FileCap
    from tahoefs.formats.dirformat import MAX_BUCKET_BYTES, BucketRef

    async def go(client: GridClient) -> None:
        directory = await Directory.create(client)
        huge = FileCap(os.urandom(32), os.urandom(32), 3, 10, MAX_BUCKET_BYTES + 1)
        version = await directory.obj.retrieve()
        await directory.obj.publish(encode_root([BucketRef(0, 1, cap=str(huge))]), version)
        with pytest.raises(IntegrityError, match="impossibly large"):
            await Directory(client, directory.cap).lookup(b"anything")

    run_with_grid(grid, go)


def test_decoded_buckets_are_shared_bounded_and_never_handed_out_to_be_changed(grid: LocalGrid) -> None:
    """Lookups use a process-wide cache of decoded buckets (a 10,000-entry folder's lstat went from
    6.7 ms to 0.08 ms): bounded by bytes, and what a lookup returns is the caller's own copy."""
    from tahoefs.grid.directory import _BucketCache

    cache = _BucketCache(limit=100)
    for i in range(5):
        cache.put(f"cap{i}", {}, 40)
    assert cache.size <= 100 and cache.get("cap0") is None and cache.get("cap4") == {}

    async def scenario(client: GridClient) -> None:
        d = await Directory.create(client)
        await d.link(Entry(b"a", KIND_FILE, 0o644, xattrs={b"user.k": b"v"}))
        first = await d.lookup(b"a")
        assert first is not None
        first.mode = 0o600
        first.xattrs[b"user.k"] = b"changed"
        again = await Directory(client, d.cap).lookup(b"a")  # a second Directory: served by the cache
        assert again is not None and again.mode == 0o644 and again.xattrs == {b"user.k": b"v"}

    run_with_grid(grid, scenario)


def test_a_directory_is_one_signed_object_until_its_root_reaches_the_inline_budget(grid: LocalGrid) -> None:
    """Entries of about 1 KiB added 20 at a time: while the whole directory fits in ROOT_INLINE_MAX its
    buckets stay inside the root (a change is one slot write per node, no bucket files to upload and
    delete); once it would not, every bucket becomes a file and the root is a compact index."""

    async def go(client: GridClient) -> None:
        d = await Directory.create(client)
        sizes = []
        for start in range(0, 200, 20):
            names = [f"f{i:04d}".encode() for i in range(start, start + 20)]
            await d.modify_many({n: (lambda _o, n=n: Entry(n, KIND_FILE, inline=b"x" * 1000)) for n in names})
            version, buckets = await d.load()
            sizes.append(len(version.plaintext))
            if all(b.inline is not None for b in buckets):
                assert len(version.plaintext) <= ROOT_INLINE_MAX
            else:
                assert all(b.inline is None for b in buckets), "no mix: a root is all inline or an index"
                assert len(version.plaintext) < 200 * len(buckets)
        assert sizes[2] > 3 * BUCKET_SPLIT_BYTES // 2, "60 KB of entries still inside the root"
        assert sizes[-1] < 4096, "200 KB of entries should not fit inside the root"
        assert await d.count() == 200
        assert (await d.get(b"f0123")).inline == b"x" * 1000

    run_with_grid(grid, go)
