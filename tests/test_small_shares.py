"""Small shares are rows of the node's SQLite database, large ones are files: both behave the same over
the API, survive a killed node, never show half-written, and a full disk is a clean 507."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tahoefs.formats.share import FOOTER_SIZE, pack_footer
from tahoefs.limits import SMALL_SHARE_MAX_BYTES
from tahoefs.storage.smallshares import DB_NAME, SmallShareExists, SmallShares
from tests.test_node import SECRET, SI, Node, put, start_node, stop_node

OTHER_SECRET = "cd" * 32


def share_of_length(num: int, length: int) -> bytes:
    return os.urandom(length - FOOTER_SIZE) + pack_footer(num)


def rows(node_dir: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(node_dir / DB_NAME, isolation_level=None)
    try:
        return db.execute("SELECT si, num FROM shares ORDER BY si, num").fetchall()
    finally:
        db.close()


def files(node_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(node_dir / "shares")) for p in (node_dir / "shares").glob("*/*/*"))


def test_a_share_up_to_the_limit_is_a_row_and_one_byte_more_is_a_file(node: Node) -> None:
    small = share_of_length(0, SMALL_SHARE_MAX_BYTES)
    large = share_of_length(1, SMALL_SHARE_MAX_BYTES + 1)
    with node.client() as c:
        assert put(c, small, num=0).status_code == 201
        assert put(c, large, num=1).status_code == 201
        assert rows(node.dir) == [(SI, 0)]
        assert files(node.dir) == [f"{SI[:2]}/{SI}/1"]
        assert list((node.dir / "incoming").iterdir()) == []
        # Both read back the same way, whole and by range, and list together.
        for num, data in ((0, small), (1, large)):
            assert c.get(f"/v1/immutable/{SI}/{num}").content == data
            r = c.get(f"/v1/immutable/{SI}/{num}", headers={"range": "bytes=-100"})
            assert r.status_code == 206 and r.content == data[-100:]
            assert r.headers["content-range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
            r = c.get(f"/v1/immutable/{SI}/{num}", headers={"range": "bytes=10-19"})
            assert r.content == data[10:20]
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": [0, 1]}
        assert c.post("/v1/immutable", json={"storage_indexes": [SI]}).json() == {"shares": {SI: [0, 1]}}
        info = c.get("/v1/version").json()
        assert (info["shares"], info["share_bytes"]) == (2, len(small) + len(large))


def test_a_row_is_never_replaced_and_is_deleted_only_with_its_secret(node: Node) -> None:
    data = share_of_length(4, 3000)
    with node.client() as c:
        assert put(c, data, num=4).status_code == 201
        r = put(c, share_of_length(4, 3000), num=4)
        assert r.status_code == 409 and r.json() == {"error": "share already exists"}
        # The same share number as a large share is refused too: a share lives in one place only.
        assert put(c, share_of_length(4, SMALL_SHARE_MAX_BYTES + 10), num=4).status_code == 409
        assert files(node.dir) == [] and list((node.dir / "incoming").iterdir()) == []
        assert c.get(f"/v1/immutable/{SI}/4").content == data
        headers = {"x-tahoefs-delete-secret": OTHER_SECRET}
        r = c.delete(f"/v1/immutable/{SI}/4", headers=headers)
        assert r.status_code == 403 and r.json() == {"error": "wrong delete secret"}
        r = c.delete(f"/v1/immutable/{SI}/4", headers={"x-tahoefs-delete-secret": SECRET})
        assert r.status_code == 200 and r.json() == {"deleted": True}
        assert c.get(f"/v1/immutable/{SI}/4").status_code == 404
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}
        assert c.get("/v1/version").json()["shares"] == 0
        assert rows(node.dir) == []


def test_a_large_share_blocks_a_small_one_of_the_same_number(node: Node) -> None:
    with node.client() as c:
        assert put(c, share_of_length(2, SMALL_SHARE_MAX_BYTES + 10), num=2).status_code == 201
        assert put(c, share_of_length(2, 500), num=2).status_code == 409
        assert rows(node.dir) == []


def test_rows_survive_a_killed_node_and_are_counted_at_start(tmp_path: Path) -> None:
    """201 means durable: SIGKILL right after the answers, and every share is there at the next start,
    counted in /v1/version."""
    n = start_node(tmp_path / "n")
    shares = {num: share_of_length(num, 200 + 97 * num) for num in range(20)}
    try:
        with n.client() as c:
            for num, data in shares.items():
                assert put(c, data, num=num).status_code == 201
    finally:
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait()
    n = start_node(tmp_path / "n")
    try:
        with n.client() as c:
            assert c.get(f"/v1/immutable/{SI}").json() == {"shares": list(shares)}
            for num, data in shares.items():
                assert c.get(f"/v1/immutable/{SI}/{num}").content == data
            info = c.get("/v1/version").json()
            assert (info["shares"], info["share_bytes"]) == (20, sum(map(len, shares.values())))
    finally:
        stop_node(n)


def test_a_small_share_cut_off_mid_body_leaves_nothing(node: Node) -> None:
    """The client goes away after half the body: no row, no temp file, and the share can be sent again."""
    data = share_of_length(0, 5000)

    def half_then_gone() -> Iterator[bytes]:
        yield data[:2500]
        raise ConnectionAbortedError("client gone")

    with node.client() as c:
        with pytest.raises((httpx.HTTPError, ConnectionAbortedError)):
            c.put(
                f"/v1/immutable/{SI}/0",
                content=half_then_gone(),
                headers={"x-tahoefs-delete-secret": SECRET},
            )
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}
        assert put(c, data).status_code == 201
    assert rows(node.dir) == [(SI, 0)]
    assert list((node.dir / "incoming").iterdir()) == []


def test_a_full_disk_is_a_clean_507_and_the_node_recovers(tmp_path: Path) -> None:
    """A real 4 MiB tmpfs, filled up behind the node's back (its reserve set to 0, so only SQLite notices):
    the small share is refused with 507, nothing is visible, and after space is freed it is accepted."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    try:
        n = start_node(folder / "node", "--reserve-mib", "0")
        try:
            filler = folder / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            data = share_of_length(0, 20_000)
            with n.client() as c:
                # Chunked, like the grid client: a declared length would be refused up front (507,
                # "nearly full") by the free-space check, before SQLite is reached.
                r = put(c, iter([data]))  # type: ignore[arg-type]
                assert r.status_code == 507 and r.json() == {"error": "node disk is full"}
                assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}
                filler.unlink()
                assert put(c, data).status_code == 201
                assert c.get(f"/v1/immutable/{SI}/0").content == data
        finally:
            stop_node(n)
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_damaged_database_stops_the_node_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / DB_NAME).write_bytes(b"this is not an SQLite database" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "tahoefs", "node", "--dir", str(folder)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "cannot use node folder" in err and "database" in err


# --- the database module on its own ------------------------------------------------------------------


def test_small_shares_round_trip_and_refuse_a_second_insert(tmp_path: Path) -> None:
    db = SmallShares(tmp_path)
    try:
        db.insert(SI, 3, b"d" * 32, b"share three")
        db.insert(SI, 1, b"e" * 32, bytearray(b"share one"))
        db.insert("b" * 26, 0, b"f" * 32, b"")
        assert db.nums(SI) == [1, 3] and db.has(SI, 3) and not db.has(SI, 2)
        assert db.get(SI, 1) == b"share one" and db.get(SI, 2) is None
        assert db.secret_digest(SI, 3) == (b"d" * 32, len(b"share three"))
        with pytest.raises(SmallShareExists):
            db.insert(SI, 3, b"x" * 32, b"other")
        assert db.get(SI, 3) == b"share three"
        assert db.totals() == (3, len(b"share three") + len(b"share one"))
        db.delete(SI, 3)
        db.delete(SI, 3)  # absent: no error
        assert db.nums(SI) == [1]
    finally:
        db.close()
    reopened = SmallShares(tmp_path)
    try:
        assert reopened.totals() == (2, len(b"share one"))
    finally:
        reopened.close()


def test_one_delete_removes_a_files_shares_rows_and_files_alike(node: Node) -> None:
    """DELETE /v1/immutable/SI: every share stored with the secret goes, whichever place it is in;
    another uploader's share stays."""
    with node.client() as c:
        assert put(c, share_of_length(0, 800), num=0).status_code == 201
        assert put(c, share_of_length(1, SMALL_SHARE_MAX_BYTES + 1), num=1).status_code == 201
        assert put(c, share_of_length(2, 900), num=2, secret=OTHER_SECRET).status_code == 201
        r = c.delete(f"/v1/immutable/{SI}", headers={"x-tahoefs-delete-secret": SECRET})
        assert r.status_code == 200 and r.json() == {"deleted": [0, 1]}
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": [2]}
        assert files(node.dir) == []
        # Only another uploader's shares left: refused, nothing deleted.
        r = c.delete(f"/v1/immutable/{SI}", headers={"x-tahoefs-delete-secret": SECRET})
        assert r.status_code == 403 and r.json() == {"error": "wrong delete secret"}
        r = c.delete(f"/v1/immutable/{SI}", headers={"x-tahoefs-delete-secret": OTHER_SECRET})
        assert r.json() == {"deleted": [2]}
        # Nothing held: nothing to do.
        r = c.delete(f"/v1/immutable/{SI}", headers={"x-tahoefs-delete-secret": SECRET})
        assert r.status_code == 200 and r.json() == {"deleted": []}
        r = c.delete(f"/v1/immutable/{SI}", headers={"x-tahoefs-delete-secret": "nothex"})
        assert r.status_code == 400
        assert c.get("/v1/version").json()["shares"] == 0
