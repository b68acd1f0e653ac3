"""Mutable slots on a real node process: test-and-set writes, write enablers, atomic replacement, and the
NodeClient methods that speak to them."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tahoefs.errors import NodeError, NodeFullError
from tahoefs.limits import NODE_MAX_SLOT_BYTES
from tahoefs.storage.client import MutableSlotInfo, NodeClient
from tahoefs.storage.client import TestFailedError as SlotTestFailedError
from tests.test_node import Node, a_share, put, start_node, stop_node

SI = "a" * 26
SI_BYTES = bytes(16)  # base32 "aaaa...": SI
ENABLER = "ab" * 32
OTHER_ENABLER = "cd" * 32
SECRET = "ab" * 32


def slot_path(num: int = 0, si: str = SI) -> str:
    return f"/v1/mutable/{si}/{num}"


def write(
    c: httpx.Client,
    content: bytes,
    test: int | str,
    new: int | str,
    num: int = 0,
    enabler: str = ENABLER,
    si: str = SI,
) -> httpx.Response:
    headers = {
        "x-tahoefs-write-enabler": enabler,
        "x-tahoefs-test-seqnum": str(test),
        "x-tahoefs-new-seqnum": str(new),
    }
    return c.put(slot_path(num, si), content=content, headers=headers)


def read(c: httpx.Client, num: int = 0) -> tuple[bytes, int]:
    r = c.get(slot_path(num))
    assert r.status_code == 200, r.text
    return r.content, int(r.headers["x-tahoefs-seqnum"])


def listing(c: httpx.Client, si: str = SI) -> dict[str, dict[str, int]]:
    r = c.get(f"/v1/mutable/{si}")
    assert r.status_code == 200
    return r.json()["shares"]


def incoming_is_empty(node: Node) -> bool:
    return list((node.dir / "incoming").iterdir()) == []


def incoming_files(node: Node) -> int:
    return len(list((node.dir / "incoming").iterdir()))


def soon(condition: Callable[[], bool], within: float = 20) -> bool:
    """Whether `condition` holds within `within` seconds (a node reacts to a socket event on its own
    time; a busy machine may take a while)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def raw_put(node: Node, path: str, headers: dict[str, str], length: int | None) -> socket.socket:
    """Open a connection and send a PUT's head (Content-Length, or chunked when `length` is None); the
    caller sends the body with `sendall` and reads the answer with `raw_answer`."""
    host, port = node.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {node.token}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n"
    s.sendall(head.encode() + b"\r\n")
    return s


def raw_answer(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def slot_headers(test: int, new: int, enabler: str = ENABLER) -> dict[str, str]:
    return {
        "x-tahoefs-write-enabler": enabler,
        "x-tahoefs-test-seqnum": str(test),
        "x-tahoefs-new-seqnum": str(new),
    }


# ---- the HTTP API


def test_first_write_creates_the_slot_and_it_reads_back(node: Node) -> None:
    data = bytes(range(256)) * 20
    with node.client() as c:
        assert c.get(slot_path(3)).status_code == 404
        assert c.get(slot_path(3)).json() == {"error": "no such slot"}
        assert listing(c) == {}
        r = write(c, data, 0, 1, num=3)
        assert r.status_code == 201 and r.json() == {"seqnum": 1}

        r = c.get(slot_path(3))
        assert r.status_code == 200 and r.content == data
        assert r.headers["x-tahoefs-seqnum"] == "1"
        assert r.headers["content-length"] == str(len(data))
        r = c.get(slot_path(3), headers={"range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
        assert r.headers["x-tahoefs-seqnum"] == "1"
        r = c.get(slot_path(3), headers={"range": "bytes=-16"})
        assert r.status_code == 206 and r.content == data[-16:]
        assert c.get(slot_path(3), headers={"range": "bytes=9999-"}).status_code == 416

        assert listing(c) == {"3": {"seqnum": 1, "length": len(data)}}
        info = c.get("/v1/version").json()
        assert info["mutable_slots"] == 1 and info["mutable_slot_bytes"] == len(data)
        assert info["max_slot_bytes"] == NODE_MAX_SLOT_BYTES
        # slots and immutable shares are separate namespaces
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}
        assert c.get(f"/v1/immutable/{SI}/3").status_code == 404
        assert info["shares"] == 0
    assert incoming_is_empty(node)


def test_slot_file_holds_the_node_header_then_the_bytes(node: Node) -> None:
    with node.client() as c:
        assert write(c, b"payload", 0, 42, num=7).status_code == 201
    raw = (node.dir / "mutable" / SI[:2] / SI / "7").read_bytes()
    magic, version, digest, seqnum, pad = struct.unpack(">8sI32sQ12s", raw[:64])
    assert (magic, version, seqnum, pad) == (b"TFNODEMU", 1, 42, bytes(12))
    assert digest == hashlib.sha256(b"tahoefs:node-write-enabler:v1:" + bytes.fromhex(ENABLER)).digest()
    assert bytes.fromhex(ENABLER) not in raw  # only a digest of the enabler is kept
    assert raw[64:] == b"payload"


def test_a_write_with_the_right_enabler_and_test_seqnum_replaces_the_slot(node: Node) -> None:
    with node.client() as c:
        assert write(c, b"one", 0, 1).status_code == 201
        r = write(c, b"version two, longer", 1, 2)
        assert r.status_code == 201 and r.json() == {"seqnum": 2}
        assert read(c) == (b"version two, longer", 2)
        assert write(c, b"3", 2, 3).status_code == 201
        assert read(c) == (b"3", 3)
        assert listing(c) == {"0": {"seqnum": 3, "length": 1}}
        info = c.get("/v1/version").json()
        assert info["mutable_slots"] == 1 and info["mutable_slot_bytes"] == 1
    assert incoming_is_empty(node)


def test_a_wrong_test_seqnum_gets_409_with_the_current_seqnum(node: Node) -> None:
    with node.client() as c:
        r = write(c, b"x", 5, 6)  # no slot yet: only test seqnum 0 may create it
        assert r.status_code == 409
        assert r.json() == {"error": "test failed: slot holds seqnum 0", "seqnum": 0}
        assert c.get(slot_path()).status_code == 404
        assert write(c, b"first", 0, 1).status_code == 201
        assert write(c, b"second", 1, 2).status_code == 201
        for test in (0, 1, 3, 100):
            r = write(c, b"stale", test, test + 1)
            assert r.status_code == 409, test
            assert r.json() == {"error": "test failed: slot holds seqnum 2", "seqnum": 2}
        assert read(c) == (b"second", 2)
    assert incoming_is_empty(node)


def test_a_wrong_write_enabler_gets_403_and_changes_nothing(node: Node) -> None:
    with node.client() as c:
        assert write(c, b"mine", 0, 1).status_code == 201
        for test in (1, 0, 7):  # the enabler is checked before the seqnum: no seqnum leaks
            r = write(c, b"theirs", test, 9, enabler=OTHER_ENABLER)
            assert r.status_code == 403 and r.json() == {"error": "wrong write enabler"}
        assert read(c) == (b"mine", 1)
        assert listing(c) == {"0": {"seqnum": 1, "length": 4}}
        # another share number of the same SI is another slot, with an enabler of its own
        assert write(c, b"theirs", 0, 1, num=1, enabler=OTHER_ENABLER).status_code == 201
        assert write(c, b"mine again", 1, 2, num=1).status_code == 403


def test_new_seqnum_must_be_above_test_seqnum(node: Node) -> None:
    with node.client() as c:
        for test, new in [(0, 0), (3, 3), (5, 2)]:
            r = write(c, b"x", test, new)
            assert r.status_code == 400, (test, new)
            assert r.json() == {"error": "new seqnum must be greater than test seqnum"}
        assert listing(c) == {}


def test_the_seqnum_never_goes_backwards(node: Node) -> None:
    with node.client() as c:
        assert write(c, b"a", 0, 5).status_code == 201  # seqnums may jump
        seen = [5]
        for test, new in [(2, 3), (4, 5), (5, 5), (5, 4), (0, 1), (5, 9), (9, 10), (3, 4)]:
            write(c, b"b", test, new)
            seen.append(read(c)[1])
        assert seen == sorted(seen) and seen[-1] == 10
        assert write(c, b"top", 10, 2**63 - 1).status_code == 201
        assert read(c) == (b"top", 2**63 - 1)
        assert write(c, b"over", 2**63 - 1, 2**63).status_code == 400
        assert read(c) == (b"top", 2**63 - 1)


def test_oversized_slots_get_413_and_change_nothing(node: Node) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        for pos in range(0, total, 65536):
            yield b"z" * min(65536, total - pos)

    with node.client() as c:
        assert write(c, b"old", 0, 1).status_code == 201
        r = write(c, b"z" * (NODE_MAX_SLOT_BYTES + 1), 1, 2)  # refused by Content-Length
        assert r.status_code == 413 and r.json() == {"error": "slot is larger than this node accepts"}
        r = write(c, chunks(NODE_MAX_SLOT_BYTES + 1), 1, 2)  # chunked: refused while streaming
        assert r.status_code == 413
        assert read(c) == (b"old", 1)
        r = write(c, chunks(NODE_MAX_SLOT_BYTES), 1, 2)  # chunked bodies are fine up to the limit
        assert r.status_code == 201
        content, seqnum = read(c)
        assert len(content) == NODE_MAX_SLOT_BYTES and seqnum == 2
    assert incoming_is_empty(node)


def test_an_empty_slot_is_allowed(node: Node) -> None:
    with node.client() as c:
        assert write(c, b"", 0, 1).status_code == 201
        assert read(c) == (b"", 1)
        assert listing(c) == {"0": {"seqnum": 1, "length": 0}}


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-tahoefs-write-enabler", None),
        ("x-tahoefs-write-enabler", "AB" * 32),
        ("x-tahoefs-write-enabler", "ab" * 31),
        ("x-tahoefs-write-enabler", "ab" * 32 + "a"),
        ("x-tahoefs-write-enabler", "zz" * 32),
        ("x-tahoefs-test-seqnum", None),
        ("x-tahoefs-test-seqnum", ""),
        ("x-tahoefs-test-seqnum", "-1"),
        ("x-tahoefs-test-seqnum", "+1"),
        ("x-tahoefs-test-seqnum", "01"),
        ("x-tahoefs-test-seqnum", "1.0"),
        ("x-tahoefs-test-seqnum", "1e3"),
        ("x-tahoefs-test-seqnum", "0x1"),
        ("x-tahoefs-test-seqnum", str(2**63)),
        ("x-tahoefs-new-seqnum", None),
        ("x-tahoefs-new-seqnum", "two"),
        ("x-tahoefs-new-seqnum", "1 2"),
        ("x-tahoefs-new-seqnum", str(2**63)),
        ("x-tahoefs-new-seqnum", "9" * 30),
    ],
)
def test_malformed_headers_get_400(node: Node, header: str, value: str | None) -> None:
    headers = slot_headers(1, 2)
    if value is None:
        del headers[header]
    else:
        headers[header] = value
    with node.client() as c:
        assert write(c, b"old", 0, 1).status_code == 201
        r = c.put(slot_path(), content=b"new", headers=headers)
        assert r.status_code == 400 and header.removeprefix("x-tahoefs-").split("-")[0] in r.json()["error"]
        assert read(c) == (b"old", 1)
        bad_delete = {header: value} if header == "x-tahoefs-write-enabler" and value is not None else {}
        assert c.delete(slot_path(), headers=bad_delete).status_code == 400
        assert read(c) == (b"old", 1)


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/mutable/{SI}/256",
        f"/v1/mutable/{SI}/01",
        f"/v1/mutable/{SI}/-1",
        f"/v1/mutable/{SI[:-1]}/0",
        "/v1/mutable/AAAAAAAAAAAAAAAAAAAAAAAAAA/0",
        f"/v1/mutable/{SI}/../../node.json",
        "/v1/mutable/%2e%2e%2f%2e%2e%2fetc/0",
        f"/v1/mutable/{SI}/0/extra",
        "/v1/mutable",
    ],
)
def test_slot_path_tricks_get_a_clean_4xx(node: Node, path: str) -> None:
    with node.client() as c:
        for method in ("GET", "PUT", "DELETE"):
            r = c.request(method, path, headers=slot_headers(0, 1), content=b"x")
            assert 400 <= r.status_code < 500 and r.status_code not in (401, 409), (method, r.status_code)
            assert node.token not in r.text
    assert not any((node.dir / "mutable").iterdir())


def test_other_methods_get_405(node: Node) -> None:
    with node.client() as c:
        assert c.post(slot_path(), content=b"x", headers=slot_headers(0, 1)).status_code == 405
        assert c.put(f"/v1/mutable/{SI}", content=b"x", headers=slot_headers(0, 1)).status_code == 405
        assert c.delete(f"/v1/mutable/{SI}").status_code == 405
        assert c.head(slot_path()).status_code == 405
        assert listing(c) == {}


def test_slots_need_the_token(node: Node) -> None:
    with node.client("wrong") as c:
        assert write(c, b"x", 0, 1).status_code == 401
        assert c.get(f"/v1/mutable/{SI}").status_code == 401
        assert c.get(slot_path()).status_code == 401
        assert c.delete(slot_path(), headers={"x-tahoefs-write-enabler": ENABLER}).status_code == 401
    with node.client() as c:
        assert listing(c) == {}


@pytest.mark.parametrize("chunked", [False, True])
def test_a_client_that_disconnects_mid_write_leaves_the_old_version(node: Node, chunked: bool) -> None:
    with node.client() as c:
        assert write(c, b"old version", 0, 1).status_code == 201
    s = raw_put(node, slot_path(), slot_headers(1, 2), None if chunked else 100_000)
    s.sendall(b"%x\r\n" % 100_000 + b"y" * 50_000 if chunked else b"y" * 50_000)
    time.sleep(0.3)
    s.close()
    assert soon(lambda: incoming_is_empty(node))  # the cut-off version is thrown away
    with node.client() as c:
        assert read(c) == (b"old version", 1)
        assert listing(c) == {"0": {"seqnum": 1, "length": 11}}


def test_the_old_version_stays_readable_until_the_replace(node: Node) -> None:
    new = b"n" * 300_000
    with node.client() as c:
        assert write(c, b"old version", 0, 1).status_code == 201
        s = raw_put(node, slot_path(), slot_headers(1, 2), len(new))
        s.sendall(new[:150_000])
        assert soon(lambda: incoming_files(node) == 1)  # the new version, not yet visible
        assert read(c) == (b"old version", 1)
        assert listing(c) == {"0": {"seqnum": 1, "length": 11}}
        s.sendall(new[150_000:])
        assert raw_answer(s) == (201, {"seqnum": 2})
        s.close()
        assert read(c) == (new, 2)
    assert incoming_is_empty(node)


def test_concurrent_writers_with_the_same_test_seqnum_exactly_one_wins(node: Node) -> None:
    writers = 20
    bodies = [bytes([i]) * 1_000_000 for i in range(writers)]
    with node.client() as c:
        assert write(c, b"base", 0, 1).status_code == 201
    barrier = threading.Barrier(writers)
    results: list[httpx.Response | None] = [None] * writers

    def writer(i: int) -> None:
        with node.client() as c:
            barrier.wait()
            results[i] = write(c, bodies[i], 1, 2)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = [r.status_code for r in results if r is not None]
    assert sorted(statuses) == [201] + [409] * (writers - 1)
    assert all(r.json()["seqnum"] == 2 for r in results if r is not None)
    winner = next(i for i, r in enumerate(results) if r is not None and r.status_code == 201)
    with node.client() as c:
        assert read(c) == (bodies[winner], 2)
        assert c.get("/v1/version").json()["mutable_slots"] == 1
    assert incoming_is_empty(node)


@pytest.mark.parametrize("first_write", [False, True])
def test_writers_that_all_passed_the_early_test_cannot_both_win(node: Node, first_write: bool) -> None:
    """Every writer sends its head and half its body before any finishes, so all of them pass the check
    made before the body is read; only the final check at commit can stop all but one."""
    writers = 20
    test = 0 if first_write else 1
    bodies = [bytes([65 + i]) * 200_000 for i in range(writers)]
    with node.client() as c:
        if not first_write:
            assert write(c, b"base", 0, 1).status_code == 201
    sockets = [raw_put(node, slot_path(), slot_headers(test, 7), len(b)) for b in bodies]
    for s, body in zip(sockets, bodies, strict=True):
        s.sendall(body[:100_000])
    assert soon(lambda: incoming_files(node) == writers)  # all passed the early test
    for s, body in zip(sockets, bodies, strict=True):
        s.sendall(body[100_000:])
    answers = [raw_answer(s) for s in sockets]
    for s in sockets:
        s.close()
    assert sorted(status for status, _ in answers) == [201] + [409] * (writers - 1)
    losers = [a for a in answers if a[0] == 409]
    assert all(a == {"error": "test failed: slot holds seqnum 7", "seqnum": 7} for _, a in losers)
    winner = next(i for i, (status, _) in enumerate(answers) if status == 201)
    with node.client() as c:
        assert read(c) == (bodies[winner], 7)
    assert incoming_is_empty(node)


def test_delete_needs_the_write_enabler(node: Node) -> None:
    with node.client() as c:
        no_slot = c.delete(slot_path(), headers={"x-tahoefs-write-enabler": ENABLER})
        assert no_slot.status_code == 404 and no_slot.json() == {"error": "no such slot"}
        assert write(c, b"x" * 100, 0, 1).status_code == 201
        assert write(c, b"y" * 10, 0, 1, num=1).status_code == 201
        assert c.delete(slot_path()).status_code == 400
        r = c.delete(slot_path(), headers={"x-tahoefs-write-enabler": OTHER_ENABLER})
        assert r.status_code == 403 and r.json() == {"error": "wrong write enabler"}
        assert read(c) == (b"x" * 100, 1)
        r = c.delete(slot_path(), headers={"x-tahoefs-write-enabler": ENABLER})
        assert r.status_code == 200 and r.json() == {"deleted": True}
        assert c.get(slot_path()).status_code == 404
        assert listing(c) == {"1": {"seqnum": 1, "length": 10}}
        info = c.get("/v1/version").json()
        assert info["mutable_slots"] == 1 and info["mutable_slot_bytes"] == 10
        assert c.delete(slot_path(1), headers={"x-tahoefs-write-enabler": ENABLER}).status_code == 200
        assert listing(c) == {}
        assert not (node.dir / "mutable" / SI[:2] / SI).exists()
        # a deleted slot starts over: test seqnum 0, and any write enabler
        assert write(c, b"again", 1, 2).json() == {"error": "test failed: slot holds seqnum 0", "seqnum": 0}
        assert write(c, b"again", 0, 1, enabler=OTHER_ENABLER).status_code == 201


def test_immutable_shares_and_slots_do_not_mix(node: Node) -> None:
    with node.client() as c:
        assert put(c, a_share(0)).status_code == 201
        assert listing(c) == {}
        assert c.get(slot_path()).status_code == 404
        assert write(c, b"slot", 0, 1).status_code == 201
        assert c.get(f"/v1/immutable/{SI}/0").content == a_share(0)
        assert c.delete(slot_path(), headers={"x-tahoefs-write-enabler": SECRET}).status_code == 200
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": [0]}
        info = c.get("/v1/version").json()
        assert (info["shares"], info["mutable_slots"]) == (1, 0)


def test_slot_counters_survive_a_restart_and_incoming_is_wiped(tmp_path: Path) -> None:
    n = start_node(tmp_path / "n")
    try:
        with n.client() as c:
            assert write(c, b"a" * 10, 0, 1).status_code == 201
            assert write(c, b"b" * 20, 0, 3, num=4).status_code == 201
    finally:
        stop_node(n)
    (tmp_path / "n" / "incoming" / f"{SI}.0.0123456789abcdef.tmp").write_bytes(b"partial")
    n = start_node(tmp_path / "n")
    try:
        with n.client() as c:
            info = c.get("/v1/version").json()
            assert (info["mutable_slots"], info["mutable_slot_bytes"]) == (2, 30)
            assert listing(c) == {"0": {"seqnum": 1, "length": 10}, "4": {"seqnum": 3, "length": 20}}
            assert write(c, b"c", 3, 4, num=4).status_code == 201
        assert incoming_is_empty(n)
    finally:
        stop_node(n)


def test_a_nearly_full_node_answers_507_to_slot_writes(tmp_path: Path) -> None:
    n = start_node(tmp_path / "full", "--reserve-mib", str(1 << 30))
    try:
        with n.client() as c:
            r = write(c, b"x", 0, 1)
            assert r.status_code == 507 and r.json()["error"]
            assert listing(c) == {}
    finally:
        stop_node(n)


# ---- NodeClient


def run_client(node: Node, scenario: Callable[[NodeClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
            await scenario(NodeClient(http, node.url, node.token, "node-id", "test-node"))

    trio.run(main)


def test_node_client_slot_methods(node: Node) -> None:
    we = bytes.fromhex(ENABLER)
    other = bytes.fromhex(OTHER_ENABLER)

    async def scenario(nc: NodeClient) -> None:
        assert await nc.list_slots(SI_BYTES) == {}
        with pytest.raises(NodeError) as no_slot:
            await nc.read_slot(SI_BYTES, 0, 1000)
        assert no_slot.value.reason == "no such slot"

        await nc.write_slot(SI_BYTES, 0, b"version 1", we, 0, 1)
        await nc.write_slot(SI_BYTES, 5, b"five", we, 0, 3)
        assert await nc.read_slot(SI_BYTES, 0, 1000) == (b"version 1", 1)
        slots = await nc.list_slots(SI_BYTES)
        assert slots == {0: MutableSlotInfo(1, 9), 5: MutableSlotInfo(3, 4)}
        assert slots[0].seqnum == 1 and slots[0].length == 9

        with pytest.raises(SlotTestFailedError) as failed:
            await nc.write_slot(SI_BYTES, 0, b"stale", we, 0, 1)
        assert failed.value.current_seqnum == 1
        assert isinstance(failed.value, NodeError)
        with pytest.raises(SlotTestFailedError) as failed:
            await nc.write_slot(SI_BYTES, 1, b"nothing there", we, 4, 5)
        assert failed.value.current_seqnum == 0

        await nc.write_slot(SI_BYTES, 0, b"version 2", we, 1, 2)
        assert await nc.read_slot(SI_BYTES, 0, 9) == (b"version 2", 2)  # exactly the limit is fine
        with pytest.raises(NodeError, match="larger than"):
            await nc.read_slot(SI_BYTES, 0, 8)

        with pytest.raises(NodeError, match="403") as wrong:
            await nc.write_slot(SI_BYTES, 0, b"intruder", other, 2, 3)
        assert not isinstance(wrong.value, SlotTestFailedError)
        with pytest.raises(NodeError, match="400"):
            await nc.write_slot(SI_BYTES, 0, b"backwards", we, 2, 2)
        with pytest.raises(NodeError, match="413"):
            await nc.write_slot(SI_BYTES, 0, b"z" * (NODE_MAX_SLOT_BYTES + 1), we, 2, 3)
        assert await nc.read_slot(SI_BYTES, 0, 1000) == (b"version 2", 2)

        with pytest.raises(NodeError, match="403"):
            await nc.delete_slot(SI_BYTES, 0, other)
        await nc.delete_slot(SI_BYTES, 0, we)
        with pytest.raises(NodeError, match="404"):
            await nc.delete_slot(SI_BYTES, 0, we)
        assert await nc.list_slots(SI_BYTES) == {5: MutableSlotInfo(3, 4)}
        assert await nc.list_shares(SI_BYTES) == []  # immutable namespace untouched
        assert (await nc.version())["mutable_slots"] == 1

    run_client(node, scenario)


def test_node_client_reports_a_full_node_and_an_unreachable_one(tmp_path: Path) -> None:
    n = start_node(tmp_path / "full", "--reserve-mib", str(1 << 30))

    async def full(nc: NodeClient) -> None:
        with pytest.raises(NodeFullError):
            await nc.write_slot(SI_BYTES, 0, b"x", bytes(32), 0, 1)

    try:
        run_client(n, full)
    finally:
        stop_node(n)

    async def gone(nc: NodeClient) -> None:
        for call in (
            nc.list_slots(SI_BYTES),
            nc.read_slot(SI_BYTES, 0, 10),
            nc.write_slot(SI_BYTES, 0, b"x", bytes(32), 0, 1),
            nc.delete_slot(SI_BYTES, 0, bytes(32)),
        ):
            with pytest.raises(NodeError, match="unreachable"):
                await call

    run_client(n, gone)  # the node has stopped: nothing listens on its port


def fake_node_client(status: int, body: object, headers: dict[str, str] | None = None) -> NodeClient:
    """A NodeClient whose "node" answers every request with `status` and `body` (bytes as they are,
    anything else as JSON), streamed like a real answer. Use inside `async with nc.http:`."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        all_headers = {"content-length": str(len(content)), **(headers or {})}
        return httpx.Response(status, headers=all_headers, stream=httpx.ByteStream(content))

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return NodeClient(http, "http://fake", "token", "fake-id", "fake")


@pytest.mark.parametrize(
    "answer",
    [
        {"shares": []},
        {"shares": {"256": {"seqnum": 1, "length": 1}}},
        {"shares": {"01": {"seqnum": 1, "length": 1}}},
        {"shares": {"x": {"seqnum": 1, "length": 1}}},
        {"shares": {"0": {"seqnum": 0, "length": 1}}},
        {"shares": {"0": {"seqnum": -1, "length": 1}}},
        {"shares": {"0": {"seqnum": 2**63, "length": 1}}},
        {"shares": {"0": {"seqnum": 1.0, "length": 1}}},
        {"shares": {"0": {"seqnum": True, "length": 1}}},
        {"shares": {"0": {"seqnum": "1", "length": 1}}},
        {"shares": {"0": {"seqnum": 1, "length": -1}}},
        {"shares": {"0": {"seqnum": 1}}},
        {"shares": {"0": [1, 1]}},
        {"slots": {}},
        [],
    ],
)
def test_node_client_refuses_malformed_slot_listings(answer: object) -> None:
    async def main() -> None:
        nc = fake_node_client(200, answer)
        async with nc.http:
            with pytest.raises(NodeError, match="malformed"):
                await nc.list_slots(SI_BYTES)

    trio.run(main)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (409, {"error": "test failed"}, "without a valid seqnum"),
        (409, {"error": "test failed", "seqnum": -2}, "without a valid seqnum"),
        (409, {"error": "test failed", "seqnum": "1"}, "without a valid seqnum"),
        (409, b"conflict", "without a valid seqnum"),
        (201, {"seqnum": 3}, "malformed answer"),  # not the seqnum written
        (201, b"ok", "malformed answer"),
        (200, {"seqnum": 2}, "HTTP 200"),
        (404, {"error": "unknown path"}, "unknown path"),  # a node without slots
    ],
)
def test_node_client_refuses_odd_write_answers(status: int, body: object, expected: str) -> None:
    async def main() -> None:
        nc = fake_node_client(status, body)
        async with nc.http:
            with pytest.raises(NodeError, match=expected) as caught:
                await nc.write_slot(SI_BYTES, 0, b"x", bytes(32), 1, 2)
            assert not isinstance(caught.value, SlotTestFailedError)

    trio.run(main)


@pytest.mark.parametrize(
    ("status", "body", "seqnum", "expected"),
    [
        (200, b"data", None, "x-tahoefs-seqnum"),
        (200, b"data", "0", "x-tahoefs-seqnum"),
        (200, b"data", "07", "x-tahoefs-seqnum"),
        (200, b"data", str(2**63), "x-tahoefs-seqnum"),
        (200, b"x" * 11, "1", "larger than"),
        (404, {"error": "unknown path"}, None, "HTTP 404 unknown path"),  # a node without slots
        (206, b"data", "1", "HTTP 206"),
    ],
)
def test_node_client_refuses_odd_read_answers(
    status: int, body: object, seqnum: str | None, expected: str
) -> None:
    async def main() -> None:
        nc = fake_node_client(status, body, {} if seqnum is None else {"x-tahoefs-seqnum": seqnum})
        async with nc.http:
            with pytest.raises(NodeError, match=expected) as caught:
                await nc.read_slot(SI_BYTES, 0, 10)
            assert caught.value.reason != "no such slot"

    trio.run(main)
