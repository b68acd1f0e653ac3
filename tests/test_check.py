"""`tahoefs check`: health, verify and repair of files and trees, on a real local grid."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tahoefs.formats.caps import parse_cap
from tahoefs.formats.hashing import b32encode
from tahoefs.storage.smallshares import DB_NAME
from tests.localgrid import LocalGrid


def storage_index(cap: str) -> str:
    return b32encode(parse_cap(cap).storage_index)


def share_count(grid: LocalGrid, cap: str) -> int:
    return sum(len(files) for files in grid.share_files(storage_index(cap)).values())


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def wipe_disks(grid: LocalGrid, *indexes: int) -> None:
    """What a node that lost its disk looks like: no shares, no directory slots, same identity."""
    grid.stop(*indexes)
    for i in indexes:
        for folder in ("shares", "mutable"):
            shutil.rmtree(grid.node_dir(i) / folder, ignore_errors=True)
        for db in grid.node_dir(i).glob(f"{DB_NAME}*"):  # the database and its -wal and -shm files
            db.unlink()
    grid.start(*indexes)


def check(grid: LocalGrid, *args: str) -> tuple[int, str, str]:
    proc = grid.run("check", *args)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def test_a_fresh_file_is_healthy(grid: LocalGrid) -> None:
    cap = grid.put_bytes(os.urandom(300_000))
    code, out, err = check(grid, cap)
    assert code == 0, err
    assert "healthy: 10 of 10 shares on 10 nodes" in out
    assert err == ""


def test_missing_shares_are_reported_and_repaired(grid: LocalGrid) -> None:
    data = os.urandom(2_500_000)  # three segments
    cap = grid.put_bytes(data)
    held = grid.share_files(storage_index(cap))
    for node in list(held)[:4]:
        for f in held[node]:
            f.delete()
    code, out, _ = check(grid, cap)
    assert code == 1
    assert "not healthy: 6 of 10 shares on 6 nodes" in out

    code, out, err = check(grid, "--repair", cap)
    assert code == 0, out + err
    assert "rebuilt 4 of 4 missing shares" in out
    assert "now healthy: 10 of 10 shares on 10 nodes" in out
    assert share_count(grid, cap) == 10
    assert len(grid.share_files(storage_index(cap))) == 10
    assert check(grid, "--verify", cap)[0] == 0
    assert grid.get_bytes(cap) == data


def test_flipped_bytes_are_missed_by_check_found_by_verify_and_fixed_by_repair(grid: LocalGrid) -> None:
    data = os.urandom(1_500_000)
    cap = grid.put_bytes(data)
    held = grid.share_files(storage_index(cap))
    corrupted = list(held)[:2]
    for i, node in enumerate(corrupted):
        held[node][0].flip(1000 + i)  # inside block 0
    assert check(grid, cap)[0] == 0  # a plain check only counts shares

    code, out, _ = check(grid, "--verify", cap)
    assert code == 1
    assert out.count("corrupt: share") == 2
    urls = {grid.config().nodes[i].url for i in corrupted}
    named = {line.split(" on ")[1].split(": ")[0] for line in out.splitlines() if "corrupt: share" in line}
    assert named == urls

    code, out, err = check(grid, "--verify", "--repair", cap)
    assert code == 0, out + err
    assert "removed 2 corrupt shares" in out
    code, out, _ = check(grid, "--verify", cap)
    assert code == 0, out
    assert "corrupt" not in out
    assert grid.get_bytes(cap) == data


def test_a_file_with_fewer_than_k_shares_is_lost_and_repair_says_so(grid: LocalGrid) -> None:
    cap = grid.put_bytes(os.urandom(100_000))
    held = grid.share_files(storage_index(cap))
    for node in list(held)[:8]:
        for f in held[node]:
            f.delete()
    code, out, err = check(grid, "--repair", cap)
    assert code == 1
    assert "lost: 2 of 10 shares" in out
    assert "repair failed: cannot repair" in out
    assert "Traceback" not in err


def test_repair_needs_only_the_verify_cap_and_no_client_secret(grid: LocalGrid, tmp_path: Path) -> None:
    data = os.urandom(700_000)
    cap = grid.put_bytes(data)
    verify_cap = str(parse_cap(cap).verify_cap())  # type: ignore[union-attr]
    held = grid.share_files(storage_index(cap))
    for node in list(held)[:3]:
        for f in held[node]:
            f.delete()
    stranger = LocalGrid(tmp_path / "stranger")  # has only the grid file: another client secret
    stranger.home.mkdir()
    shutil.copy(grid.home / "grid.toml", stranger.home / "grid.toml")
    code, out, err = check(stranger, "--verify", "--repair", verify_cap)
    assert code == 0, out + err
    assert share_count(grid, cap) == 10
    assert grid.get_bytes(cap) == data


def test_json_output_is_one_object_per_line(grid: LocalGrid) -> None:
    cap = grid.put_bytes(os.urandom(10_000))
    code, out, _ = check(grid, "--json", "--verify", cap)
    assert code == 0
    (line,) = out.splitlines()
    record = json.loads(line)
    assert record["state"] == "healthy" and record["verified"] is True
    assert record["shares_found"] == 10 and record["distinct_nodes"] == 10 and record["happiness"] == 10
    assert record["verify_cap"].startswith("tahoefs:file-verify:v1:")


def test_bad_targets_give_one_line_and_exit_2(grid: LocalGrid) -> None:
    for target in ("tahoefs:file:v1:nonsense", "nosuchalias:x", "tahoefs:bogus:v1:aa"):
        code, out, err = check(grid, target)
        assert code == 2, (target, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    root = grid.run("mkfs", "--alias", "badtargets", check=True).stdout.decode().strip()
    code, _out, err = check(grid, f"{root}/missing")
    assert code == 2 and "no such file" in err


def make_tree(
    grid: LocalGrid, alias: str, tmp_path: Path, dirs: int, files: int
) -> tuple[str, dict[str, bytes]]:
    """A small tree made with the CLI: files of 1 KiB (inline) to 40 KiB in `dirs` folders, one nested.
    Returns the root write cap and the files' contents by path."""
    root = grid.run("mkfs", "--alias", alias, check=True).stdout.decode().strip()
    contents: dict[str, bytes] = {}
    for d in range(dirs):
        grid.run("mkdir", f"{alias}:d{d}", check=True)
    grid.run("mkdir", f"{alias}:d0/deeper", check=True)
    folders = [f"d{d}" for d in range(dirs)] + ["d0/deeper"]
    for i in range(files):
        path = f"{folders[i % len(folders)]}/f{i}"
        data = os.urandom(1024 + (i * 7919) % 40_000)
        src = tmp_path / "src"
        src.write_bytes(data)
        grid.run("put", str(src), f"{alias}:{path}", check=True)
        contents[path] = data
    return root, contents


def test_deep_check_and_repair_of_a_tree_after_three_nodes_lost_their_disks(
    grid: LocalGrid, tmp_path: Path
) -> None:
    _root, contents = make_tree(grid, "deep", tmp_path, dirs=3, files=16)
    code, out, _ = check(grid, "--deep", "deep:")
    assert code == 0, out
    assert " 0 not healthy, 0 lost" in out
    wipe_disks(grid, 2, 5, 7)

    code, out, _ = check(grid, "--deep", "deep:")
    assert code == 1
    summary = out.splitlines()[-1]
    assert "5 directories" in summary and " 0 healthy" in summary and "0 lost" in summary

    code, out, err = check(grid, "--deep", "--repair", "deep:")
    assert code == 0, out + err
    assert "repair failed 0" in out.splitlines()[-1]
    code, out, _ = check(grid, "--deep", "--verify", "--json", "deep:")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert records[-1]["summary"]["healthy"] == len(records) - 1
    assert all(r["state"] == "healthy" for r in records[:-1])
    for path, data in contents.items():
        assert grid.run("get", f"deep:{path}", check=True).stdout == data


def test_a_directory_reached_by_a_read_cap_is_checked_but_not_repaired(
    grid: LocalGrid, tmp_path: Path
) -> None:
    root, _contents = make_tree(grid, "ro", tmp_path, dirs=1, files=2)
    read_cap = str(parse_cap(root).read_cap())  # type: ignore[union-attr]
    wipe_disks(grid, 1)
    code, out, _ = check(grid, "--repair", read_cap)
    assert code == 1
    assert "needs its write cap" in out
    code, out, _ = check(grid, "--repair", root)
    assert code == 0, out


def test_a_corrupt_directory_slot_is_found_and_republished(grid: LocalGrid) -> None:
    root = grid.run("mkfs", "--alias", "slot", check=True).stdout.decode().strip()
    grid.run("mkdir", "slot:a", check=True)
    slots = sorted(p for p in (grid.node_dir(3) / "mutable").rglob("*") if p.is_file())
    assert slots, "node 3 holds no directory slot"
    for slot in slots:
        flip_byte(slot, slot.stat().st_size - 5)
    code, out, _ = check(grid, root)
    assert code == 1 and "not healthy" in out
    code, out, err = check(grid, "--repair", root)
    assert code == 0, out + err
    assert "published again" in out
    assert grid.run("ls", "slot:", check=True).stdout.decode().split() == ["a/"]


def test_check_of_a_path_inside_a_mount(mounted: tuple[LocalGrid, Path, str]) -> None:
    grid, mnt, _root = mounted
    (mnt / "big").write_bytes(os.urandom(200_000))
    (mnt / "sub").mkdir()
    code, out, err = check(grid, str(mnt / "big"))
    assert code == 0, err
    assert "healthy: 10 of 10 shares" in out
    code, out, err = check(grid, "--deep", str(mnt))
    assert code == 0, out + err
    # The mount's own root cap is used, so its directories can be repaired by path too.
    wipe_disks(grid, 4)
    code, out, err = check(grid, "--deep", "--repair", str(mnt / "sub"))
    assert code == 0, out + "\n" + err
    assert "published again" in out
    assert check(grid, "--deep", str(mnt / "sub"))[0] == 0
