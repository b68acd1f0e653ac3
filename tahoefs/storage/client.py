"""HTTP client for one storage node: the only code that speaks the node protocol (docs/protocol.md).

Every method raises NodeError (or a subclass) for any failure: unreachable, timed out, refused, or an
answer that does not fit the protocol. Responses are read with a bound: a node cannot make the client
hold more than it asked for.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

from tahoefs.errors import NodeError, NodeFullError
from tahoefs.formats.hashing import b32encode
from tahoefs.storage.transport import Answer, NodeTransport

CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
SHARE_NUM_RE = re.compile(r"0|[1-9][0-9]{0,2}")
SEQNUM_RE = re.compile(r"0|[1-9][0-9]{0,18}")
SEQNUM_LIMIT = 1 << 63
MAX_JSON_BYTES = 1024 * 1024
# PUT bodies up to this size go through NodeTransport.small_request (no httpx request/response objects).
SMALL_REQUEST_BYTES = 64 * 1024
# A share PUT waits for the node to fsync and commit the whole share before it answers.
COMMIT_TIMEOUT = 300.0


@dataclass
class TransferStats:
    """Payload bytes moved to and from nodes (HTTP bodies, not headers), for status and benchmarks."""

    sent: int = 0
    received: int = 0
    requests: int = 0

    async def counting(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for piece in body:
            self.sent += len(piece)
            yield piece


class MutableSlotInfo(NamedTuple):
    """One slot as a node lists it: the seqnum of its last accepted write and its length in bytes."""

    seqnum: int
    length: int


class TestFailedError(NodeError):
    """A slot write was refused because the slot does not hold the test seqnum (HTTP 409).
    `current_seqnum` is what the node says it holds: 0 when it has no such slot."""

    __test__ = False  # not a pytest test class

    def __init__(self, node: str, message: str, current_seqnum: int) -> None:
        super().__init__(node, message)
        self.current_seqnum = current_seqnum


class QueryUnsupportedError(NodeError):
    """The node predates the batch share query."""


class NodeClient:
    """Talks to one node through `http` (its connection pool and timeouts).

    Pass `transport`, the transport `http` was built with, and requests go to it directly: that skips
    the client's cookie, auth, redirect and URL-merging layers, about a fifth of the client CPU of a
    small upload's ten PUTs (measured with 6 KB files: 5.0 -> 4.0 ms). The node protocol needs none of
    them: the token is a header, and a node never redirects."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        token: str,
        node_id: str,
        name: str,
        stats: TransferStats | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = http
        self.transport = transport
        self._timeout = http.timeout
        self._commit_timeout = httpx.Timeout(http.timeout.write, read=COMMIT_TIMEOUT)
        self.stats = stats if stats is not None else TransferStats()
        self.url = url.rstrip("/")
        self.node_id = node_id
        self.name = name
        self._auth = {"authorization": f"Bearer {token}"}
        # small_request, for a plain-HTTP node served by NodeTransport itself (TLS transports add their
        # own certificate checks and error names, so their requests keep the httpx path).
        self._lean = transport if type(transport) is NodeTransport else None
        base = httpx.URL(self.url)
        self._origin = NodeTransport.origin(base)
        self._host = [(b"host", base.netloc)]

    def __repr__(self) -> str:
        return f"NodeClient({self.name})"

    @contextlib.asynccontextmanager
    async def _stream(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send one request; yields the response with its body unread, and closes it on exit. Raises
        what httpx raises."""
        if self.http.is_closed:  # the transport would open a new connection nobody closes
            raise NodeError(self.name, "the grid client is closed")
        timeout = timeout or self._timeout
        request = httpx.Request(
            method, url, headers=headers, content=content, extensions={"timeout": timeout.as_dict()}
        )
        if self.transport is None:
            response = await self.http.send(request, stream=True)
        else:
            response = await self.transport.handle_async_request(request)
        try:
            yield response
        finally:
            await response.aclose()

    async def _put_small(
        self, url: str, headers: dict[str, str], body: bytes, timeout: httpx.Timeout
    ) -> Answer:
        """PUT an in-memory body of at most SMALL_REQUEST_BYTES and read the (JSON) answer whole, at
        most MAX_JSON_BYTES. Raises what httpx raises (NodeError for an answer over the bound)."""
        self.stats.sent += len(body)
        if self._lean is None:
            async with self._stream("PUT", url, headers, body, timeout) as response:
                data = await _read_bounded(self.stats, response, MAX_JSON_BYTES, self.name)
                return Answer(response.status_code, response.reason_phrase.encode(), data)
        if self.http.is_closed:
            raise NodeError(self.name, "the grid client is closed")
        raw = self._host + [(k.encode(), v.encode()) for k, v in headers.items()]
        target = url[len(self.url) :].encode()
        answer = await self._lean.small_request(
            self._origin, b"PUT", target, raw, body, timeout, MAX_JSON_BYTES
        )
        self.stats.requests += 1
        self.stats.received += len(answer.body)
        return answer

    def _answer_error(self, answer: Answer, what: str) -> NodeError:
        _payload, reason = _error_payload(answer.body, answer.reason.decode("latin-1"))
        return self._error(answer.status, what, reason)

    def _share_url(self, si: bytes, num: int | None = None) -> str:
        base = f"{self.url}/v1/immutable/{b32encode(si)}"
        return base if num is None else f"{base}/{num}"

    def _slot_url(self, si: bytes, num: int | None = None) -> str:
        base = f"{self.url}/v1/mutable/{b32encode(si)}"
        return base if num is None else f"{base}/{num}"

    def _fail(self, what: str, exc: Exception) -> NodeError:
        if isinstance(exc, NodeError):
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return NodeError(self.name, f"{what}: timed out")
        if isinstance(exc, httpx.ConnectError):
            return NodeError(self.name, f"{what}: unreachable")
        if isinstance(exc, httpx.RemoteProtocolError) and self.url.startswith("http://"):
            # What a node serving HTTPS (--tls) does to a plain request: it hangs up without a word.
            return NodeError(
                self.name, f"{what}: the node hung up without an answer (if it runs with --tls, use https://)"
            )
        if isinstance(exc, httpx.HTTPError):
            return NodeError(self.name, f"{what}: {type(exc).__name__}: {exc}".rstrip(": "))
        return NodeError(self.name, f"{what}: {exc}")

    async def _error_from(self, response: httpx.Response, what: str) -> NodeError:
        _payload, reason = await _error_body(response)
        return self._error(response.status_code, what, reason)

    def _error(self, status: int, what: str, reason: str) -> NodeError:
        message = f"{what}: HTTP {status} {reason}"
        if status == 507:
            return NodeFullError(self.name, message)
        return NodeError(self.name, message)

    async def _get_json(self, url: str, what: str) -> Any:
        try:
            async with self._stream("GET", url, self._auth) as response:
                if response.status_code != 200:
                    raise await self._error_from(response, what)
                body = await _read_bounded(self.stats, response, MAX_JSON_BYTES, self.name)
            return json.loads(body)
        except (httpx.HTTPError, ValueError) as exc:
            raise self._fail(what, exc) from None

    async def version(self) -> dict[str, Any]:
        data = await self._get_json(f"{self.url}/v1/version", "version")
        if not isinstance(data, dict):
            raise NodeError(self.name, "version: not a JSON object")
        return data

    async def list_shares(self, si: bytes) -> list[int]:
        data = await self._get_json(self._share_url(si), "list shares")
        shares = data.get("shares") if isinstance(data, dict) else None
        if not isinstance(shares, list) or not all(isinstance(n, int) and 0 <= n < 256 for n in shares):
            raise NodeError(self.name, "list shares: malformed answer")
        return shares

    async def query_shares(self, sis: list[bytes]) -> dict[bytes, list[int]]:
        """Which shares of each storage index in `sis` (at most QUERY_MAX_INDEXES) the node holds; an
        index it holds nothing of is absent. Raises QueryUnsupportedError for a node without the batch
        query (404/405: ask with list_shares instead), NodeError otherwise."""
        by_text = {b32encode(si): si for si in sis}
        what = "query shares"
        body = json.dumps({"storage_indexes": list(by_text)}).encode()
        headers = {**self._auth, "content-type": "application/json"}
        url = f"{self.url}/v1/immutable"
        try:
            async with self._stream("POST", url, headers, body) as r:
                if r.status_code in (404, 405):
                    raise QueryUnsupportedError(self.name, f"{what}: not supported by this node")
                if r.status_code != 200:
                    raise await self._error_from(r, what)
                answer = await _read_bounded(self.stats, r, MAX_JSON_BYTES, self.name)
        except httpx.HTTPError as exc:
            raise self._fail(what, exc) from None
        try:
            shares = json.loads(answer).get("shares")
            found = {
                by_text[text]: nums
                for text, nums in shares.items()
                if isinstance(nums, list) and all(isinstance(n, int) and 0 <= n < 256 for n in nums)
            }
        except (ValueError, AttributeError, KeyError):
            raise NodeError(self.name, f"{what}: malformed answer") from None
        return found

    async def put_share(
        self, si: bytes, num: int, body: AsyncIterable[bytes], delete_secret: bytes, length: int | None = None
    ) -> None:
        """Stream a whole share; returns once the node has committed it durably. With `length` the body
        goes with a Content-Length (cheaper than chunked framing, which copies every block); the body
        must then yield exactly that many bytes."""
        headers = {**self._auth, "x-tahoefs-delete-secret": delete_secret.hex()}
        what = f"store share {num}"
        if length is not None and length <= SMALL_REQUEST_BYTES:
            try:
                data = b"".join([piece async for piece in body])
                if len(data) != length:
                    raise NodeError(self.name, f"{what}: the body has {len(data)} bytes, not {length}")
                answer = await self._put_small(self._share_url(si, num), headers, data, self._commit_timeout)
            except (httpx.HTTPError, OSError) as exc:
                raise self._fail(what, exc) from None
            if answer.status != 201:
                raise self._answer_error(answer, what)
            return
        if length is not None:
            headers["content-length"] = str(length)
        try:
            async with self._stream(
                "PUT", self._share_url(si, num), headers, self.stats.counting(body), self._commit_timeout
            ) as response:
                if response.status_code != 201:
                    raise await self._error_from(response, f"store share {num}")
                # Read the (small) answer: a response left unread closes its connection, and the
                # next share would pay for a new one.
                await _read_bounded(self.stats, response, MAX_JSON_BYTES, self.name)
        except (httpx.HTTPError, OSError) as exc:
            raise self._fail(f"store share {num}", exc) from None

    async def read_range(self, si: bytes, num: int, start: int, length: int) -> bytes:
        """Exactly `length` bytes of share `num` from byte `start`, or NodeError."""
        if length == 0:
            return b""
        data, _total = await self._ranged(si, num, f"bytes={start}-{start + length - 1}", length)
        if len(data) != length:
            raise NodeError(self.name, f"read share {num}: short answer ({len(data)} of {length} bytes)")
        return data

    async def read_suffix(self, si: bytes, num: int, length: int) -> tuple[bytes, int]:
        """The last `length` bytes of share `num` (fewer if the share is shorter) and the share's size."""
        return await self._ranged(si, num, f"bytes=-{length}", length)

    async def _ranged(self, si: bytes, num: int, range_header: str, limit: int) -> tuple[bytes, int]:
        what = f"read share {num}"
        try:
            async with self._stream(
                "GET", self._share_url(si, num), {**self._auth, "range": range_header}
            ) as response:
                if response.status_code != 206:
                    raise await self._error_from(response, what)
                m = CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
                if not m:
                    raise NodeError(self.name, f"{what}: missing or malformed Content-Range")
                data = await _read_bounded(self.stats, response, limit, self.name)
                return data, int(m.group(3))
        except (httpx.HTTPError, OSError) as exc:
            raise self._fail(what, exc) from None

    async def list_slots(self, si: bytes) -> dict[int, MutableSlotInfo]:
        """The mutable slots of `si` this node holds: share number -> (seqnum, length); empty if none."""
        data = await self._get_json(self._slot_url(si), "list slots")
        shares = data.get("shares") if isinstance(data, dict) else None
        if not isinstance(shares, dict):
            raise NodeError(self.name, "list slots: malformed answer")
        slots: dict[int, MutableSlotInfo] = {}
        for key, info in shares.items():
            if (
                not (isinstance(key, str) and SHARE_NUM_RE.fullmatch(key) and int(key) < 256)
                or not isinstance(info, dict)
                or not _is_seqnum(info.get("seqnum"))
                or info["seqnum"] == 0
                or not _is_int(info.get("length"))
                or info["length"] < 0
            ):
                raise NodeError(self.name, "list slots: malformed answer")
            slots[int(key)] = MutableSlotInfo(info["seqnum"], info["length"])
        return slots

    async def read_slot(self, si: bytes, num: int, limit: int) -> tuple[bytes, int]:
        """The whole current version of slot `num` and its seqnum. NodeError "no such slot" when the
        node holds none; NodeError when it is larger than `limit` bytes (read no further than that)."""
        what = f"read slot {num}"
        try:
            async with self._stream("GET", self._slot_url(si, num), self._auth) as response:
                if response.status_code != 200:
                    _payload, reason = await _error_body(response)
                    if response.status_code == 404 and reason == "no such slot":
                        raise NodeError(self.name, "no such slot")  # not "unknown path" from an old node
                    raise self._error(response.status_code, what, reason)
                seqnum_text = response.headers.get("x-tahoefs-seqnum", "")
                if not SEQNUM_RE.fullmatch(seqnum_text) or not 0 < int(seqnum_text) < SEQNUM_LIMIT:
                    raise NodeError(self.name, f"{what}: missing or malformed x-tahoefs-seqnum")
                declared = response.headers.get("content-length", "")
                if re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > limit:
                    raise NodeError(self.name, f"{what}: slot is larger than the {limit} bytes allowed")
                data = await _read_bounded(self.stats, response, limit, self.name)
            return data, int(seqnum_text)
        except (httpx.HTTPError, OSError) as exc:
            raise self._fail(what, exc) from None

    async def write_slot(
        self, si: bytes, num: int, data: bytes, write_enabler: bytes, test_seqnum: int, new_seqnum: int
    ) -> None:
        """Test-and-set: make `data` slot `num`'s version `new_seqnum` if the slot now holds
        `test_seqnum` (0: the slot must not exist yet). Returns once the node committed it durably.
        Raises TestFailedError (with the slot's `current_seqnum`) when the test fails, NodeFullError on
        507, NodeError for anything else (wrong write enabler: 403)."""
        what = f"write slot {num}"
        headers = {
            **self._auth,
            "x-tahoefs-write-enabler": write_enabler.hex(),
            "x-tahoefs-test-seqnum": str(test_seqnum),
            "x-tahoefs-new-seqnum": str(new_seqnum),
        }
        try:
            answer = await self._put_small(self._slot_url(si, num), headers, data, self._commit_timeout)
        except (httpx.HTTPError, OSError) as exc:
            raise self._fail(what, exc) from None
        if answer.status == 409:
            payload, reason = _error_payload(answer.body, answer.reason.decode("latin-1"))
            current = payload.get("seqnum") if isinstance(payload, dict) else None
            if not _is_seqnum(current):
                raise NodeError(self.name, f"{what}: HTTP 409 without a valid seqnum")
            raise TestFailedError(self.name, f"{what}: HTTP 409 {reason}", current)
        if answer.status != 201:
            raise self._answer_error(answer, what)
        try:
            result = json.loads(answer.body)
        except ValueError:
            result = None
        if not isinstance(result, dict) or result.get("seqnum") != new_seqnum:
            raise NodeError(self.name, f"{what}: malformed answer")

    async def delete_slot(self, si: bytes, num: int, write_enabler: bytes) -> None:
        """Remove slot `num`. NodeError for any answer but 200, including 404 (no such slot) and 403
        (wrong write enabler)."""
        what = f"delete slot {num}"
        headers = {**self._auth, "x-tahoefs-write-enabler": write_enabler.hex()}
        try:
            async with self._stream("DELETE", self._slot_url(si, num), headers) as response:
                if response.status_code != 200:
                    raise await self._error_from(response, what)
                await _read_bounded(self.stats, response, MAX_JSON_BYTES, self.name)  # keeps the connection
        except (httpx.HTTPError, OSError) as exc:
            raise self._fail(what, exc) from None

    async def delete_shares(self, si: bytes, delete_secret: bytes) -> int:
        """Remove every share of `si` this node holds under `delete_secret`, in one request; returns how
        many went. A node older than the batch delete (405) is asked which shares it holds and has
        them deleted one by one."""
        what = "delete shares"
        headers = {**self._auth, "x-tahoefs-delete-secret": delete_secret.hex()}
        try:
            async with self._stream("DELETE", self._share_url(si), headers) as response:
                if response.status_code == 405:
                    await _read_bounded(self.stats, response, MAX_JSON_BYTES, self.name)
                    older = True
                elif response.status_code != 200:
                    raise await self._error_from(response, what)
                else:
                    older = False
                    answer = await _read_bounded(self.stats, response, MAX_JSON_BYTES, self.name)
        except (httpx.HTTPError, OSError) as exc:
            raise self._fail(what, exc) from None
        if older:
            nums = await self.list_shares(si)
            for num in nums:
                await self.delete_share(si, num, delete_secret)
            return len(nums)
        try:
            deleted = json.loads(answer)["deleted"]
            if not isinstance(deleted, list):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise NodeError(self.name, f"{what}: malformed answer") from None
        return len(deleted)

    async def delete_share(self, si: bytes, num: int, delete_secret: bytes) -> None:
        """Remove share `num` (absent already counts as removed)."""
        what = f"delete share {num}"
        headers = {**self._auth, "x-tahoefs-delete-secret": delete_secret.hex()}
        try:
            async with self._stream("DELETE", self._share_url(si, num), headers) as response:
                if response.status_code not in (200, 404):
                    raise await self._error_from(response, what)
                await _read_bounded(self.stats, response, MAX_JSON_BYTES, self.name)
        except (httpx.HTTPError, OSError) as exc:
            raise self._fail(what, exc) from None


async def _error_body(response: httpx.Response) -> tuple[Any, str]:
    """An error answer's JSON payload (None if it is not JSON) and its reason: the "error" member, else
    the start of the body, else the HTTP reason phrase. Reads at most about 4 KiB."""
    body = b""
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > 4096:
            break
    return _error_payload(body, response.reason_phrase)


def _error_payload(body: bytes, reason_phrase: str) -> tuple[Any, str]:
    """An error answer's JSON payload (None if it is not JSON) and its reason: the "error" member, else
    the start of the body, else the HTTP reason phrase."""
    try:
        payload = json.loads(body)
        return payload, str(payload["error"])
    except (ValueError, KeyError, TypeError):
        return None, body[:200].decode("utf-8", "replace") or reason_phrase


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seqnum(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEQNUM_LIMIT


async def _read_bounded(stats: TransferStats, response: httpx.Response, limit: int, name: str) -> bytes:
    buf = bytearray()
    stats.requests += 1
    async for piece in response.aiter_raw():
        buf += piece
        if len(buf) > limit:
            raise NodeError(name, f"answer larger than the {limit} bytes asked for")
    stats.received += len(buf)
    return bytes(buf)
