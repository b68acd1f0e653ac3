"""The storage node as a real process: its API refuses bad input cleanly and never exposes partial shares."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tahoefs.formats.share import pack_footer
from tahoefs.limits import SMALL_SHARE_MAX_BYTES

SI = "a" * 26
SECRET = "ab" * 32


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    dir: Path

    def client(self, token: str | None = "") -> httpx.Client:
        headers = {} if token is None else {"authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10, trust_env=False)


def start_node(directory: Path, *extra: str) -> Node:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tahoefs", "node", "--dir", str(directory), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    fields = {}
    for _ in range(3):
        key, _, value = proc.stdout.readline().decode().strip().partition(": ")
        fields[key] = value
    return Node(proc, fields["url"], fields["token"], directory)


def stop_node(node: Node) -> None:
    node.proc.send_signal(signal.SIGTERM)
    try:
        node.proc.wait(10)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()


BIG_BODY = b"b" * (SMALL_SHARE_MAX_BYTES + 1)  # a share kept as a file, not a database row


def a_share(num: int, body: bytes = b"x" * 1000) -> bytes:
    return body + pack_footer(num)


def put(
    client: httpx.Client, content: bytes, si: str = SI, num: int = 0, secret: str = SECRET
) -> httpx.Response:
    return client.put(
        f"/v1/immutable/{si}/{num}", content=content, headers={"x-tahoefs-delete-secret": secret}
    )


def test_node_prints_url_and_token_and_answers_version(node: Node) -> None:
    with node.client() as c:
        info = c.get("/v1/version").json()
    assert info["api"] == 1 and info["shares"] == 0 and info["free_bytes"] > 0


@pytest.mark.parametrize("token", [None, "wrong", "x" * 43])
def test_requests_without_the_right_token_are_refused(node: Node, token: str | None) -> None:
    with httpx.Client(base_url=node.url, timeout=10, trust_env=False) as c:
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        for method, path in [
            ("GET", "/v1/version"),
            ("GET", f"/v1/immutable/{SI}"),
            ("PUT", f"/v1/immutable/{SI}/0"),
        ]:
            r = c.request(method, path, headers=headers, content=b"")
            assert r.status_code == 401, (method, path)
            assert r.json()["error"]


def test_store_read_list_and_delete_a_share(node: Node) -> None:
    share = a_share(3, os.urandom(5000))
    with node.client() as c:
        assert put(c, share, num=3).status_code == 201
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": [3]}
        assert c.get(f"/v1/immutable/{SI}/3").content == share
        r = c.get(f"/v1/immutable/{SI}/3", headers={"range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == share[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(share)}"
        r = c.get(f"/v1/immutable/{SI}/3", headers={"range": "bytes=-16"})
        assert r.content == share[-16:]
        assert put(c, share, num=3).status_code == 409  # never overwritten
        bad = c.delete(f"/v1/immutable/{SI}/3", headers={"x-tahoefs-delete-secret": "cd" * 32})
        assert bad.status_code == 403
        ok = c.delete(f"/v1/immutable/{SI}/3", headers={"x-tahoefs-delete-secret": SECRET})
        assert ok.status_code == 200
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/immutable/../../etc/passwd",
        "/v1/immutable/%2e%2e%2f%2e%2e%2fetc/0",
        f"/v1/immutable/{SI}/../../node.json",
        "/v1/immutable/AAAAAAAAAAAAAAAAAAAAAAAAAA/0",
        f"/v1/immutable/{SI}/256",
        f"/v1/immutable/{SI}/01",
        f"/v1/immutable/{SI}/-1",
        f"/v1/immutable/{SI[:-1]}/0",
        f"/v1/immutable/{SI}%0A/0",
        f"/v1/immutable/{SI}/0%0A",
        "/v1/node.json",
        "/v2/version",
        "/",
    ],
)
def test_path_tricks_get_a_clean_4xx(node: Node, path: str) -> None:
    with node.client() as c:
        r = c.get(path)
    assert 400 <= r.status_code < 500
    assert "token" not in r.text and node.token not in r.text


def test_truncated_or_foreign_bodies_are_refused_and_never_visible(node: Node) -> None:
    with node.client() as c:
        assert put(c, b"not a share at all").status_code == 400
        assert put(c, a_share(4), num=5).status_code == 400  # footer names another share
        assert put(c, a_share(0)[:-3]).status_code == 400  # cut short
        assert put(c, a_share(0), secret="nothex").status_code == 400
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}
    assert list((node.dir / "incoming").iterdir()) == []


def test_bad_ranges_get_416(node: Node) -> None:
    with node.client() as c:
        put(c, a_share(0))
        for header in ["bytes=5000-6000", "bytes=abc", "bytes=1-2,5-6", "bytes=-0", "items=0-1"]:
            assert c.get(f"/v1/immutable/{SI}/0", headers={"range": header}).status_code == 416, header


def test_a_client_that_disconnects_mid_upload_leaves_nothing(node: Node) -> None:
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"PUT /v1/immutable/{SI}/0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {node.token}\r\n"
            f"x-tahoefs-delete-secret: {SECRET}\r\nContent-Length: 100000\r\n\r\n".encode()
            + b"y" * 50000
        )
        time.sleep(0.3)
    time.sleep(0.3)
    with node.client() as c:
        assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}
    assert list((node.dir / "incoming").iterdir()) == []


def test_oversized_shares_get_413(tmp_path: Path) -> None:
    n = start_node(tmp_path / "small", "--max-share-mib", "1")
    try:
        with n.client() as c:
            r = put(c, a_share(0, b"z" * (2 * 1024 * 1024)))
            assert r.status_code == 413
            assert c.get(f"/v1/immutable/{SI}").json() == {"shares": []}
    finally:
        stop_node(n)


def test_a_nearly_full_node_answers_507_before_taking_data(tmp_path: Path) -> None:
    n = start_node(tmp_path / "full", "--reserve-mib", str(1 << 30))  # reserve 1 PiB: always "full"
    try:
        with n.client() as c:
            assert put(c, a_share(0)).status_code == 507
            assert c.get("/v1/version").json()["free_bytes"] == 0
    finally:
        stop_node(n)


def test_restart_wipes_abandoned_temp_files(tmp_path: Path) -> None:
    n = start_node(tmp_path / "n")
    stop_node(n)
    (tmp_path / "n" / "incoming" / "leftover.tmp").write_bytes(b"partial")
    n = start_node(tmp_path / "n")
    try:
        assert list((tmp_path / "n" / "incoming").iterdir()) == []
    finally:
        stop_node(n)


def test_a_share_file_cut_inside_its_node_header_answers_500_not_a_negative_length(node: Node) -> None:
    """Disk damage that leaves a share file shorter than the node's 64-byte header: the node used to
    answer with a negative Content-Length; now it is a clean 500 like a damaged slot header."""
    with node.client() as c:
        assert put(c, a_share(0, BIG_BODY)).status_code == 201
        path = node.dir / "shares" / SI[:2] / SI / "0"
        for cut in (0, 30, 63):
            os.truncate(path, cut)
            for headers in ({}, {"range": "bytes=-65536"}, {"range": "bytes=0-9"}):
                r = c.get(f"/v1/immutable/{SI}/0", headers=headers)
                assert r.status_code == 500, (cut, headers)
                assert r.json() == {"error": "stored share has a damaged node header"}
        os.truncate(path, 64)  # exactly the header: an empty share, which is not damage at the node
        r = c.get(f"/v1/immutable/{SI}/0")
        assert r.status_code == 200 and r.content == b""


# --- request heads: bounded in size and in time -----------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _flood(node: Node, start: bytes, filler: bytes, total: int) -> int:
    """Send `start` and then `filler` repeatedly, up to `total` bytes, without ever ending the head.
    Returns how many bytes went out before the node closed the connection (`total` if it never did)."""
    host, port = node.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(10)
        try:
            s.sendall(start)
            sent = len(start)
            while sent < total:
                s.sendall(filler)
                sent += len(filler)
        except (ConnectionResetError, BrokenPipeError):
            return sent
        # Everything went out (the kernel buffers a little): did the node answer and close?
        try:
            s.sendall(b"x" * 65536)
            answer = s.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return sent
        if answer.startswith(b"HTTP/1.1 431") or answer == b"":
            return sent
    return total


@pytest.mark.parametrize(
    ("start", "filler"),
    [
        (b"GET /v1/version HTTP/1.1\r\nHost: x\r\n", b"X-Header-Line: " + b"h" * 48 + b"\r\n"),  # many lines
        (b"GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Big: ", b"v" * 65536),  # one endless header value
        (b"GET /v1/version?q=", b"u" * 65536),  # an endless URL
    ],
    ids=["header-lines", "header-value", "url"],
)
def test_an_endless_request_head_is_cut_off_and_costs_the_node_no_memory(
    node: Node, start: bytes, filler: bytes
) -> None:
    """Without the bound, the node kept every byte of a request head until its blank line: 200 MiB of
    header lines from a client without the token grew it to 710 MB."""
    total = 64 * 1024 * 1024
    before = _rss_bytes(node.proc.pid)
    sent = _flood(node, start, filler * max(1, 65536 // len(filler)), total)
    assert sent < total, "the node took 64 MiB of request head without closing the connection"
    assert _rss_bytes(node.proc.pid) - before < 16 * 1024 * 1024
    with node.client() as c:
        assert c.get("/v1/version").status_code == 200


def _raw_status(node: Node, head: bytes) -> int | None:
    """Send a whole request head at once; the answer's status, or None if the node reset the
    connection first (it closes after a 431 without reading the rest, and unread bytes make the kernel
    send a reset, which can overtake the answer)."""
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(10)
        try:
            s.sendall(head)
            answer = s.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            return None
    return int(answer.split()[1]) if answer else None


def test_request_heads_over_64_kib_get_431_and_smaller_ones_are_served(node: Node) -> None:
    auth = f"Authorization: Bearer {node.token}\r\n".encode()
    with node.client() as c:
        assert c.get("/v1/version", headers={"x-pad": "p" * 60_000}).status_code == 200
        assert c.get("/v1/version", headers={f"x-h{i}": "v" for i in range(2000)}).status_code == 200
        assert c.get("/v1/version", headers={"x-pad": "p" * 70_000}).status_code == 431
    assert _raw_status(node, b"GET /v1/version?" + b"q" * 60_000 + b" HTTP/1.1\r\n" + auth + b"\r\n") == 200
    assert _raw_status(node, b"GET /v1/version?" + b"q" * 70_000 + b" HTTP/1.1\r\n" + auth + b"\r\n") == 431
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 20) for i in range(10_000))  # 10,000 lines, 300 KB
    assert _raw_status(node, b"GET /v1/version HTTP/1.1\r\n" + auth + lines + b"\r\n") in (431, None)
    with node.client() as c:  # the node is fine, and an upload (head and body in one read) is unaffected
        share = a_share(0, os.urandom(300_000))
        assert put(c, share).status_code == 201
        assert c.get(f"/v1/immutable/{SI}/0").content == share


def _start_node_with(directory: Path, **constants: float) -> Node:
    """A node process whose node_main constants (REQUEST_HEAD_TIMEOUT, KEEP_ALIVE_SECONDS) are set
    shorter, so that the tests need not wait a minute."""
    settings = "; ".join(f"m.{name} = {value!r}" for name, value in constants.items())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import tahoefs.storage.node_main as m; {settings}; from tahoefs.cli.main import main; main()",
            *("node", "--dir", str(directory), "--listen", "127.0.0.1:0"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    fields = dict(proc.stdout.readline().decode().strip().partition(": ")[::2] for _ in range(3))
    return Node(proc, fields["url"], fields["token"], directory)


def test_unfinished_request_heads_are_timed_out_and_cannot_lock_clients_out(tmp_path: Path) -> None:
    """520 connections whose heads never end (half of them send nothing at all) used to hold all of the
    node's 512 connections, so every other client got 503, until it restarted. With the head deadline
    (60 s; 5 s in this test) they are closed and the node serves again."""
    timeout = 5.0
    n = _start_node_with(tmp_path / "node", REQUEST_HEAD_TIMEOUT=timeout)
    host, port = n.url.removeprefix("http://").split(":")
    stuck = []
    try:
        started = time.monotonic()
        for i in range(520):
            s = socket.create_connection((host, int(port)))
            if i % 2:
                s.sendall(b"GET /v1/version HTTP/1.1\r\nHost: x\r\n")  # half a head
            stuck.append(s)
        time.sleep(0.3)
        if time.monotonic() - started < timeout - 1:  # (on a very slow machine the first ones are gone)
            with n.client() as c:
                assert c.get("/v1/version").status_code == 503  # every connection is taken
        time.sleep(max(0.0, started + timeout + 2 - time.monotonic()))
        with n.client() as c:
            assert c.get("/v1/version").status_code == 200
        for s in stuck:
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the node
    finally:
        for s in stuck:
            s.close()
        stop_node(n)


@pytest.mark.parametrize("rest", ["a-pause", "all-of-it"])
def test_the_body_of_a_refused_request_cannot_hold_its_connection_open(tmp_path: Path, rest: str) -> None:
    """A PUT without the token and with a 10 MB Content-Length gets its 401 at once. Its body's bytes
    used to cancel the keep-alive timer for good: one more piece of body and then silence held the
    connection forever. Now it closes after the keep-alive time (30 s; 2 s here), whether the body
    stops halfway or is sent whole."""
    n = _start_node_with(tmp_path / "node", KEEP_ALIVE_SECONDS=2)
    host, port = n.url.removeprefix("http://").split(":")
    length = 10_000_000 if rest == "a-pause" else 3000
    try:
        with socket.create_connection((host, int(port))) as s:
            s.settimeout(10)
            s.sendall(
                f"PUT /v1/immutable/{SI}/0 HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
                + b"z" * 1000
            )
            answer = b""
            while not answer.endswith(b"}"):
                answer += s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 401")
            s.sendall(b"z" * 2000)  # more body after the answer (all of it for "all-of-it")
            started = time.monotonic()
            assert s.recv(100) == b""  # closed by the node...
            assert 1 < time.monotonic() - started < 8  # ...after the keep-alive time
        with n.client() as c:  # keep-alive reuse of answered requests is unaffected
            for _ in range(3):
                assert c.get("/v1/version").status_code == 200
            assert put(c, a_share(0)).status_code == 201
            assert put(c, a_share(0)).status_code == 409
            assert c.get(f"/v1/immutable/{SI}").json() == {"shares": [0]}
    finally:
        stop_node(n)


def test_one_query_says_which_shares_of_many_files_the_node_holds(node: Node) -> None:
    other = "b" * 26
    with node.client() as c:
        assert put(c, a_share(3, os.urandom(100)), num=3).status_code == 201
        assert put(c, a_share(7, os.urandom(100)), num=7).status_code == 201
        r = c.post("/v1/immutable", json={"storage_indexes": [SI, other]})
        assert r.status_code == 200 and r.json() == {"shares": {SI: [3, 7]}}
        assert c.post("/v1/immutable", json={"storage_indexes": []}).json() == {"shares": {}}
        assert c.get("/v1/immutable").status_code == 405
        for bad in ({"storage_indexes": ["../../etc"]}, {"storage_indexes": SI}, {"nope": []}, [SI]):
            r = c.post("/v1/immutable", json=bad)
            assert r.status_code == 400 and "error" in r.json(), bad
        assert c.post("/v1/immutable", content=b"{not json").status_code == 400
        too_many = {"storage_indexes": [SI] * 1001}
        assert c.post("/v1/immutable", json=too_many).status_code == 400
        assert c.post("/v1/immutable", content=b" " * (65 * 1024)).status_code == 413
    with node.client(token=None) as c:
        assert c.post("/v1/immutable", json={"storage_indexes": [SI]}).status_code == 401


def test_new_tokens_never_look_like_command_line_options() -> None:
    from tahoefs.storage.store import new_token

    tokens = [new_token() for _ in range(5000)]  # with the old generator about 78 of them started with "-"
    assert not any(t.startswith("-") for t in tokens)
    assert len(set(tokens)) == len(tokens) and all(len(t) == 43 for t in tokens)
