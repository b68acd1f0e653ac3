"""The storage node's HTTP API as a raw ASGI application (served by uvicorn; see docs/protocol.md).

Every request must carry `Authorization: Bearer TOKEN`. Every path segment is checked against a strict
pattern before it touches the disk. Errors are `{"error": reason}` with a 4xx/5xx status.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from tahoefs import __version__
from tahoefs.formats.share import FOOTER_SIZE, unpack_footer
from tahoefs.limits import NODE_MAX_SHARE_BYTES, NODE_MAX_SLOT_BYTES
from tahoefs.storage.store import (
    SLOT_HEADER_SIZE,
    ShareStore,
    StoreError,
    check_secret,
    check_seqnum,
    check_share_num,
    check_storage_index,
    check_write_enabler,
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

READ_CHUNK = 256 * 1024
RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")
CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,19}")
API_VERSION = 1
QUERY_MAX_INDEXES = 1000  # storage indexes in one POST /v1/immutable (26 B each, quoted: ~30 KB)
QUERY_MAX_BODY = 64 * 1024


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single-range `Range` header, None for no header.
    Raises StoreError(416) for a malformed or unsatisfiable range."""
    if header is None:
        return None
    m = RANGE_RE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise StoreError(416, "malformed Range (one 'bytes=a-b' range expected)")
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise StoreError(416, "empty suffix range")
        return max(0, length - n), length
    start = int(first)
    end = length if last == "" else min(int(last) + 1, length)
    if start >= length or end <= start:
        raise StoreError(416, f"range not satisfiable (share is {length} bytes)")
    return start, end


class NodeApp:
    """ASGI callable. One instance per node process."""

    def __init__(
        self,
        store: ShareStore,
        token: str,
        node_id: str,
        max_share_bytes: int = NODE_MAX_SHARE_BYTES,
        max_slot_bytes: int = NODE_MAX_SLOT_BYTES,
    ):
        self.store = store
        self._token = token.encode()
        self.node_id = node_id
        self.max_share_bytes = max_share_bytes
        self.max_slot_bytes = max_slot_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._authorize(headers)
            await self._route(scope, headers, receive, send)
        except StoreError as exc:
            await _send_json(send, exc.status, {"error": exc.reason, **exc.fields})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorize(self, headers: dict[str, str]) -> None:
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise StoreError(401, "missing or wrong access token")

    async def _route(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> None:
        method = scope["method"]
        parts = scope["path"].split("/")
        # "/v1/immutable/SI/N" -> ["", "v1", "immutable", "SI", "N"]
        if len(parts) < 3 or parts[0] != "" or parts[1] != f"v{API_VERSION}":
            raise StoreError(404, "unknown path")
        if parts[2:] == ["version"]:
            if method != "GET":
                raise StoreError(405, "method not allowed")
            await self._version(send)
            return
        if parts[2:] == ["immutable"]:
            if method != "POST":
                raise StoreError(405, "method not allowed")
            await self._query_shares(headers, receive, send)
            return
        if parts[2] not in ("immutable", "mutable") or len(parts) not in (4, 5):
            raise StoreError(404, "unknown path")
        mutable = parts[2] == "mutable"
        si = check_storage_index(parts[3])
        if len(parts) == 4:
            if method == "DELETE" and not mutable:
                secret = check_secret(headers.get("x-tahoefs-delete-secret"))
                await _send_json(send, 200, {"deleted": self.store.delete_all(si, secret)})
                return
            if method != "GET":
                raise StoreError(405, "method not allowed")
            if mutable:
                slots = self.store.list_slots(si)
                listing = {str(n): {"seqnum": st.seqnum, "length": st.length} for n, st in slots.items()}
                await _send_json(send, 200, {"shares": listing})
            else:
                await _send_json(send, 200, {"shares": self.store.list_shares(si)})
            return
        num = check_share_num(parts[4])
        if mutable:
            await self._route_slot(method, si, num, headers, receive, send)
        elif method == "GET":
            await self._read_share(si, num, headers, send)
        elif method == "PUT":
            await self._write_share(si, num, headers, receive, send)
        elif method == "DELETE":
            self.store.delete(si, num, check_secret(headers.get("x-tahoefs-delete-secret")))
            await _send_json(send, 200, {"deleted": True})
        else:
            raise StoreError(405, "method not allowed")

    async def _query_shares(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        """Which shares of up to QUERY_MAX_INDEXES storage indexes this node holds: one request instead
        of one per file, for a checker walking a tree. Answers only the indexes it holds shares of."""
        declared_length(headers, QUERY_MAX_BODY, f"query body over {QUERY_MAX_BODY} bytes")
        body = await _read_small_body(receive, QUERY_MAX_BODY)
        try:
            indexes = json.loads(body)["storage_indexes"]
            if not isinstance(indexes, list) or len(indexes) > QUERY_MAX_INDEXES:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise StoreError(
                400, f'body must be {{"storage_indexes": [at most {QUERY_MAX_INDEXES} storage indexes]}}'
            ) from None
        found: dict[str, list[int]] = {}
        for text in indexes:
            si = check_storage_index(text) if isinstance(text, str) else check_storage_index("")
            nums = self.store.list_shares(si)
            if nums:
                found[si] = nums
        await _send_json(send, 200, {"shares": found})

    async def _version(self, send: Send) -> None:
        await _send_json(
            send,
            200,
            {
                "api": API_VERSION,
                "software": f"tahoefs {__version__}",
                "node_id": self.node_id,
                "free_bytes": max(0, self.store.free_bytes() - self.store.min_free_bytes),
                "total_bytes": self.store.total_bytes(),
                "shares": self.store.share_count,
                "share_bytes": self.store.share_bytes,
                "max_share_bytes": self.max_share_bytes,
                "mutable_slots": self.store.slot_count,
                "mutable_slot_bytes": self.store.slot_bytes,
                "max_slot_bytes": self.max_slot_bytes,
            },
        )

    async def _route_slot(
        self, method: str, si: str, num: int, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        if method == "GET":
            await self._read_slot(si, num, headers, send)
        elif method == "PUT":
            await self._write_slot(si, num, headers, receive, send)
        elif method == "DELETE":
            self.store.delete_slot(si, num, check_write_enabler(headers.get("x-tahoefs-write-enabler")))
            await _send_json(send, 200, {"deleted": True})
        else:
            raise StoreError(405, "method not allowed")

    async def _write_slot(
        self, si: str, num: int, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        """Test-and-set: replace slot SI/N by the body if it now holds the test seqnum (0: no slot) and,
        when it exists, was created with this write enabler. The test is checked before the body is
        read (fail fast) and again inside the synchronous commit, right before the replace."""
        write_enabler = check_write_enabler(headers.get("x-tahoefs-write-enabler"))
        test_seqnum = check_seqnum(headers.get("x-tahoefs-test-seqnum"), "x-tahoefs-test-seqnum")
        new_seqnum = check_seqnum(headers.get("x-tahoefs-new-seqnum"), "x-tahoefs-new-seqnum")
        if new_seqnum <= test_seqnum:
            raise StoreError(400, "new seqnum must be greater than test seqnum")
        declared = declared_length(headers, self.max_slot_bytes, "slot is larger than this node accepts")
        more = declared or 0
        with self.store.receive_slot(si, num, write_enabler, test_seqnum, new_seqnum, more) as incoming:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # client went away: the temp file is discarded, the old version stays
                incoming.write(message.get("body", b""), self.max_slot_bytes)
                if not message.get("more_body", False):
                    break
            incoming.commit()
        await _send_json(send, 201, {"seqnum": new_seqnum})

    async def _write_share(
        self, si: str, num: int, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        secret = check_secret(headers.get("x-tahoefs-delete-secret"))
        declared = declared_length(headers, self.max_share_bytes, "share is larger than this node accepts")
        if declared is not None:
            self.store.check_space(declared)
        with self.store.receive(si, num, secret) as incoming:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # client went away: the temp file is discarded, nothing is visible
                incoming.write(message.get("body", b""), self.max_share_bytes)
                if not message.get("more_body", False):
                    break

            def check_tail(tail: bytes) -> None:
                if len(tail) < FOOTER_SIZE:
                    raise StoreError(400, "body too short to be a share")
                try:
                    footer_num, _ = unpack_footer(tail[-FOOTER_SIZE:])
                except ValueError as exc:
                    raise StoreError(400, f"body is not a complete share: {exc}") from None
                if footer_num != num:
                    raise StoreError(400, "share footer names another share number")

            incoming.commit(check_tail)
        await _send_json(send, 201, {"stored": incoming.length})

    async def _read_share(self, si: str, num: int, headers: dict[str, str], send: Send) -> None:
        share = self.store.open_share(si, num)
        try:
            await _send_bytes(send, share.read, share.length, headers.get("range"))
        finally:
            share.close()

    async def _read_slot(self, si: str, num: int, headers: dict[str, str], send: Send) -> None:
        """The slot's current version, like a share read, plus `x-tahoefs-seqnum`. The open fd keeps
        serving this version even if a writer replaces the slot meanwhile."""
        fd, state = self.store.open_slot(si, num)
        try:
            seqnum = [(b"x-tahoefs-seqnum", str(state.seqnum).encode())]
            await _send_bytes(
                send,
                lambda offset, size: os.pread(fd, size, SLOT_HEADER_SIZE + offset),
                state.length,
                headers.get("range"),
                seqnum,
            )
        finally:
            os.close(fd)


async def _send_bytes(
    send: Send,
    read: Callable[[int, int], bytes],
    length: int,
    range_header: str | None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with a stored object of `length` bytes, read in pieces of at most READ_CHUNK by
    `read(offset, size)`: 200 whole, or 206 for one valid `Range` (416 otherwise, before anything is
    sent)."""
    span = parse_range(range_header, length)
    start, end = span if span is not None else (0, length)
    response_headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(end - start).encode()),
        (b"accept-ranges", b"bytes"),
        *(extra_headers or []),
    ]
    if span is not None:
        response_headers.append((b"content-range", f"bytes {start}-{end - 1}/{length}".encode()))
    await send({"type": "http.response.start", "status": 206 if span else 200, "headers": response_headers})
    pos = start
    while pos < end:
        chunk = read(pos, min(READ_CHUNK, end - pos))
        if not chunk:
            break
        pos += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": pos < end})
    if start == end:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def declared_length(headers: dict[str, str], limit: int, too_big: str) -> int | None:
    """The request's Content-Length, None when it has none; 413 `too_big` when it is over `limit` or is
    not a plain decimal number."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not CONTENT_LENGTH_RE.fullmatch(declared) or int(declared) > limit:
        raise StoreError(413, too_big)
    return int(declared)


async def _read_small_body(receive: Receive, limit: int) -> bytes:
    """A whole request body of at most `limit` bytes (413 beyond; 400 if the client goes away)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise StoreError(400, "the request body ended early")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise StoreError(413, f"request body over {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
