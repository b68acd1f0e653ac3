"""Client logic of the batch requests, against scripted node answers (httpx.MockTransport): the
checker's locating (which answers are taken, which are refused, and the fall back to one listing per file
for a node that predates the batch query) and deleting a file's shares. The real node's side is tested in
test_node.py and test_small_shares.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import trio

from tahoefs.formats.hashing import b32encode
from tahoefs.grid.check import locate_many
from tahoefs.storage.client import NodeClient

SI_A, SI_B, SI_C = b"a" * 16, b"b" * 16, b"c" * 16


@dataclass
class ScriptedGrid:
    """What locate_many needs of a GridClient: its nodes and its stall timeout."""

    nodes: list[NodeClient] = field(default_factory=list)
    stall_timeout: float = 5.0


def answer(status: int, payload: object) -> httpx.Response:
    """A streamed JSON answer, as a node sends it (the client reads answers as bounded streams)."""
    return httpx.Response(status, stream=httpx.ByteStream(json.dumps(payload).encode()))


def node(name: str, handler) -> NodeClient:  # type: ignore[no-untyped-def]
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return NodeClient(http, f"http://{name}", "token", node_id=name, name=name)


def test_batch_answers_fallback_and_failures() -> None:
    held = {b32encode(SI_A): [0, 3], b32encode(SI_C): [9]}
    asked: list[str] = []

    def modern(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.method} {request.url.path}")
        wanted = json.loads(request.content)["storage_indexes"]
        return answer(200, {"shares": {si: held[si] for si in wanted if si in held}})

    def old(request: httpx.Request) -> httpx.Response:
        asked.append(f"old {request.method} {request.url.path}")
        if request.method == "POST":
            return answer(405, {"error": "method not allowed"})
        si = request.url.path.rsplit("/", 1)[1]
        return answer(200, {"shares": held.get(si, [])})

    def liar(request: httpx.Request) -> httpx.Response:
        return answer(200, {"shares": {b32encode(b"z" * 16): [1]}})  # an index not asked

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async def main() -> None:
        handlers = {"modern": modern, "old": old, "liar": liar, "down": down}
        grid = ScriptedGrid([node(name, handler) for name, handler in handlers.items()])
        found = await locate_many(grid, [SI_A, SI_B, SI_C])  # type: ignore[arg-type]
        by_node = {si: sorted((n.name, num) for n, num in pairs) for si, pairs in found.held.items()}
        assert by_node[SI_A] == [("modern", 0), ("modern", 3), ("old", 0), ("old", 3)]
        assert by_node[SI_B] == []
        assert by_node[SI_C] == [("modern", 9), ("old", 9)]
        assert sorted(p.split(":")[0] for p in found.problems) == ["node down", "node liar"]
        assert asked.count("POST /v1/immutable") == 1  # one request for all three files
        assert sum(a.startswith("old GET") for a in asked) == 3  # the old node: one listing per file

    trio.run(main)


def test_delete_shares_is_one_request_and_falls_back_on_an_older_node() -> None:
    asked: list[str] = []

    def modern(request: httpx.Request) -> httpx.Response:
        asked.append(f"modern {request.method} {request.url.path}")
        return answer(200, {"deleted": [1, 4]})

    def old(request: httpx.Request) -> httpx.Response:
        asked.append(f"old {request.method} {request.url.path}")
        if request.method == "DELETE" and request.url.path.count("/") == 3:
            return answer(405, {"error": "method not allowed"})
        if request.method == "GET":
            return answer(200, {"shares": [2, 7]})
        return answer(200, {"deleted": True})

    async def main() -> None:
        assert await node("modern", modern).delete_shares(SI_A, b"s" * 32) == 2
        assert await node("old", old).delete_shares(SI_A, b"s" * 32) == 2

    trio.run(main)
    si = b32encode(SI_A)
    assert asked == [
        f"modern DELETE /v1/immutable/{si}",
        f"old DELETE /v1/immutable/{si}",
        f"old GET /v1/immutable/{si}",
        f"old DELETE /v1/immutable/{si}/2",
        f"old DELETE /v1/immutable/{si}/7",
    ]
