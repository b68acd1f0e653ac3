"""The client's HTTP transport (storage/transport.py) against real node processes: connections are
reused (over TLS too) until they expire, a node restart or an early answer is handled, failures and
timeouts come out as httpx's exceptions, and a cancelled request gives its connection slot back."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tahoefs.formats.share import pack_footer
from tahoefs.storage.transport import NodeTransport
from tahoefs.tls import fetch_certificate, pinned_context
from tests.test_node import Node, start_node, stop_node

SI = "c" * 26
SECRET = "cd" * 32
TIMEOUT = httpx.Timeout(10.0)


def client(transport: NodeTransport, node: Node) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=node.url,
        transport=transport,
        headers={"authorization": f"Bearer {node.token}"},
        timeout=TIMEOUT,
        trust_env=False,
    )


def share(num: int, size: int) -> bytes:
    return b"s" * size + pack_footer(num)


def put(
    http: httpx.AsyncClient, num: int, content: bytes | AsyncIterator[bytes], length: int | None = None
) -> httpx.Request:
    headers = {"x-tahoefs-delete-secret": SECRET}
    if length is not None:
        headers["content-length"] = str(length)
    return http.build_request("PUT", f"/v1/immutable/{SI}/{num}", content=content, headers=headers)


def test_sequential_requests_share_one_connection_and_bodies_round_trip(node: Node) -> None:
    async def main() -> None:
        transport = NodeTransport()
        async with client(transport, node) as http:
            for num in range(20):
                r = await http.send(put(http, num, share(num, 100 + num * 1000)))
                assert r.status_code == 201, r.text
            r = await http.get(f"/v1/immutable/{SI}/19")
            assert r.content == share(19, 19_100)
            assert len((await http.get(f"/v1/immutable/{SI}")).json()["shares"]) == 20
        assert transport.opened == 1

    trio.run(main)


def test_a_body_without_a_length_goes_chunked_and_a_large_one_streams_both_ways(node: Node) -> None:
    big = share(7, 3 * 1024 * 1024)  # a file share on the node, several socket reads per answer

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 100_000):
            yield big[start : start + 100_000]

    async def main() -> None:
        async with client(NodeTransport(), node) as http:
            r = await http.send(put(http, 7, pieces()))
            assert r.status_code == 201, r.text
            async with http.stream("GET", f"/v1/immutable/{SI}/7") as r:
                received = [piece async for piece in r.aiter_raw()]
            assert b"".join(received) == big
            assert len(received) > 1

    trio.run(main)


def test_a_connection_to_a_node_that_restarted_is_replaced_not_reported(tmp_path: Path) -> None:
    first = start_node(tmp_path / "node")
    port = int(first.url.rsplit(":", 1)[1])

    async def main() -> None:
        nonlocal first
        transport = NodeTransport()
        async with client(transport, first) as http:
            assert (await http.get("/v1/version")).status_code == 200
            stop_node(first)
            first = start_node(tmp_path / "node", "--listen", f"127.0.0.1:{port}")
            await trio.sleep(0.2)  # the old connection's FIN has arrived
            assert (await http.get("/v1/version")).status_code == 200
        assert transport.opened == 2

    try:
        trio.run(main)
    finally:
        stop_node(first)


def test_an_answer_given_before_the_whole_body_was_taken_is_returned(node: Node) -> None:
    # A head over the node's 64 KiB limit: the node answers 431 and hangs up while the client is still
    # sending, so the client's next write fails; the answer, not the broken pipe, is what it reports.
    async def main() -> None:
        async with client(NodeTransport(), node) as http:
            request = put(http, 0, share(0, 32 * 1024 * 1024))
            request.headers["x-padding"] = "p" * 200_000
            r = await http.send(request)
            assert r.status_code == 431
            assert (await http.get("/v1/version")).status_code == 200  # the pool still works

    trio.run(main)


def test_failures_come_out_as_httpx_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def main() -> None:
        async with httpx.AsyncClient(transport=NodeTransport(), timeout=TIMEOUT) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{closed_port}/v1/version")

    trio.run(main)


@pytest.fixture
def stalled(node: Node) -> Iterator[str]:
    """The URL of a proxy in front of `node` that takes requests and never answers."""
    target = node.url.removeprefix("http://")
    proxy = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "slowproxy.py"), "0", target, "--stall"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proxy.stdout is not None
        yield "http://" + proxy.stdout.readline().decode().split()[-1]
    finally:
        proxy.terminate()
        proxy.wait()


def test_a_node_that_never_answers_times_out_and_a_cancelled_request_frees_its_slot(
    node: Node, stalled: str
) -> None:
    async def main() -> None:
        transport = NodeTransport(max_connections=1)
        headers = {"authorization": f"Bearer {node.token}"}
        async with httpx.AsyncClient(transport=transport, headers=headers, trust_env=False) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get(f"{stalled}/v1/version", timeout=httpx.Timeout(10.0, read=0.3))
            with trio.move_on_after(0.3) as scope:
                await http.get(f"{stalled}/v1/version", timeout=TIMEOUT)
            assert scope.cancelled_caught
            # Both slots were given back: the one connection allowed serves the real node.
            r = await http.get(f"{node.url}/v1/version", timeout=httpx.Timeout(10.0, pool=1.0))
            assert r.status_code == 200

    trio.run(main)


def test_a_full_pool_makes_the_next_request_wait_then_time_out(node: Node) -> None:
    async def main() -> None:
        async with client(NodeTransport(max_connections=1), node) as http:
            async with http.stream("GET", "/v1/version"):  # holds the only connection
                with pytest.raises(httpx.PoolTimeout):
                    await http.get("/v1/version", timeout=httpx.Timeout(10.0, pool=0.2))
            assert (await http.get("/v1/version")).status_code == 200

    trio.run(main)


def test_an_idle_connection_past_its_expiry_is_closed_not_reused(node: Node) -> None:
    async def main() -> None:
        transport = NodeTransport(keepalive_expiry=0.2)
        async with client(transport, node) as http:
            await http.get("/v1/version")
            await http.get("/v1/version")
            assert transport.opened == 1
            await trio.sleep(0.3)
            await http.get("/v1/version")
            assert transport.opened == 2

    trio.run(main)


def test_a_tls_connection_is_reused_too(tmp_path: Path) -> None:
    n = start_node(tmp_path / "tls", "--tls")
    try:
        context = pinned_context(fetch_certificate(n.url, 10))

        async def main() -> None:
            transport = NodeTransport(ssl_context=context)
            async with client(transport, n) as http:
                for num in range(5):
                    assert (await http.send(put(http, num, share(num, 5000)))).status_code == 201
                assert (await http.get(f"/v1/immutable/{SI}/4")).content == share(4, 5000)
            assert transport.opened == 1

        trio.run(main)
    finally:
        stop_node(n)


def test_a_body_shorter_than_its_declared_length_is_an_httpx_error_and_sends_nothing_more(
    node: Node,
) -> None:
    async def short() -> AsyncIterator[bytes]:
        yield b"only this"

    async def main() -> None:
        async with client(NodeTransport(), node) as http:
            request = put(http, 1, short(), length=100_000)
            with pytest.raises(httpx.LocalProtocolError):
                await http.send(request)
            assert (await http.get(f"/v1/immutable/{SI}")).json() == {"shares": []}

    trio.run(main)


def test_a_request_cancelled_in_the_middle_of_its_body_leaves_nothing_and_frees_its_slot(
    node: Node,
) -> None:
    async def stuck() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await trio.sleep_forever()

    async def main() -> None:
        transport = NodeTransport(max_connections=1)
        async with client(transport, node) as http:
            request = put(http, 2, stuck(), length=5000)
            with trio.move_on_after(0.3) as scope:
                await http.send(request)
            assert scope.cancelled_caught
            r = await http.get(f"/v1/immutable/{SI}", timeout=httpx.Timeout(10.0, pool=1.0))
            assert r.json() == {"shares": []}

    trio.run(main)


def small_put(transport: NodeTransport, node: Node, num: int, body: bytes, limit: int = 4096) -> object:
    url = httpx.URL(node.url)
    headers = [
        (b"host", url.netloc),
        (b"authorization", f"Bearer {node.token}".encode()),
        (b"x-tahoefs-delete-secret", SECRET.encode()),
    ]
    target = f"/v1/immutable/{SI}/{num}".encode()
    return transport.small_request(
        (url.scheme, url.host, url.port), b"PUT", target, headers, body, TIMEOUT, limit
    )


def test_a_small_request_without_httpx_objects_shares_the_pool_and_reads_its_answer_whole(
    node: Node,
) -> None:
    async def main() -> None:
        transport = NodeTransport(max_connections=1)
        for num in range(5):
            answer = await small_put(transport, node, num, share(num, 3000))
            assert answer.status == 201 and b"stored" in answer.body
        again = await small_put(transport, node, 0, share(0, 3000))  # exists already
        assert again.status == 409 and b"already exists" in again.body
        assert transport.opened == 1
        with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
            await small_put(transport, node, 9, share(9, 3000), limit=5)
        with trio.move_on_after(0.2):  # cancelled mid-request, sooner or later: its slot comes back
            for num in range(10, 1000):
                await small_put(transport, node, num, share(num, 10))
        with trio.fail_after(5):
            assert (await small_put(transport, node, 8, share(8, 10))).status == 201
        async with client(transport, node) as http:  # the same pool serves httpx's requests
            assert (await http.get(f"/v1/immutable/{SI}/4")).content == share(4, 3000)

    trio.run(main)
