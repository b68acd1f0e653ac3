"""One node's keep-alive HTTP/1.1 connections: an httpx transport spoken with h11 over trio streams.

Why not httpx's own transport (httpcore): a small PUT through httpx and httpcore costs about 330 µs of
client CPU on the reference machine, through httpx and this transport about 220 µs, while the bytes on the
wire take about 20 µs. A small file's upload is ten PUTs, so this took a 6 KB file's upload from 4.5 to
3.3 ms of client CPU (`scripts/bench/small_uploads`). httpcore spends it in layers the node protocol never
needs (HTTP/2 and proxy plumbing, generic stream type checks). This transport keeps httpx's request and
response objects and exceptions and h11's HTTP parsing and framing (the parser httpcore itself uses); it
only pools connections itself, which is a few lines for one origin. One more entry point,
`small_request`, serves NodeClient's small PUTs (shares and slots of at most 64 KiB) from the same pool
without building httpx's request and response objects: 150 µs of client CPU per PUT instead of 240.

Contract (what httpx expects of a transport):
- `handle_async_request` returns once the response headers are in; the body streams through
  `response.stream`, and closing it (always done by NodeClient) hands the connection back for reuse when
  both sides finished the exchange cleanly, and closes it otherwise (error, cancellation, a body left
  unread, `Connection: close`).
- Failures raise httpx's exceptions: ConnectError/ConnectTimeout, WriteError/WriteTimeout,
  ReadError/ReadTimeout, PoolTimeout, RemoteProtocolError. The timeouts come from the request's
  `timeout` extension (httpx.Timeout.as_dict()), each applied to one I/O step, as in httpx.
- At most `max_connections` requests are in flight at once; at most `max_idle` idle connections are
  kept, each for at most `keepalive_expiry` seconds (well under the node's 30 s keep-alive, so the node
  never closes one just as it is reused). An idle connection the node closed anyway (a restart) is
  noticed before reuse. The connection is chosen only once the request's first body piece is ready,
  and the head goes out with that piece: an upload that takes long to encode its first segment holds
  no idle connection meanwhile.
- When a plain-HTTP write fails because the node answered and hung up (a 431 to an oversized head),
  the node's answer is read and returned instead of the broken pipe. (Over TLS the broken stream cannot
  be read any more: the WriteError stands.)
- Memory per connection: one read buffer of READ_BYTES plus h11's buffer of what is not consumed yet.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import h11
import httpx
import trio

KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection may be reused (httpx's default; nodes allow 30)
READ_BYTES = 64 * 1024  # one receive from the socket (under the mmap threshold cli/main.py sets)
COALESCE_HEADERS_BYTES = 64 * 1024  # a first body piece up to this size goes in the headers' write


class NodeTransport(httpx.AsyncBaseTransport):
    """Keep-alive connections to one node (http, or https with `ssl_context`)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 32,
        max_idle: int = 8,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        self._ssl_context = ssl_context
        self._slots = trio.Semaphore(max_connections)
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._idle: list[_Connection] = []
        self._closed = False
        self.opened = 0  # connections opened so far

    @staticmethod
    def origin(url: httpx.URL) -> tuple[str, str, int]:
        """(scheme, host, port) of `url`: what an idle connection must match to be reused."""
        return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        await self._acquire(request, timeouts.get("pool"))
        connection: _Connection | None = None
        try:
            pieces = _pieces(request.stream)
            first = await anext(pieces, b"")
            connection = await self._connection(self.origin(request.url), request, timeouts.get("connect"))
            event = h11.Request(
                method=request.method, target=request.url.raw_path, headers=request.headers.raw
            )
            head = await connection.exchange(
                event, first, pieces, timeouts.get("read"), timeouts.get("write"), request
            )
            return httpx.Response(
                head.status_code,
                headers=list(head.headers),
                stream=_ResponseBody(self, connection, request, timeouts.get("read")),
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
                request=request,
            )
        except BaseException:
            if connection is not None:
                connection.close()
            self._slots.release()
            raise

    async def _acquire(self, request: httpx.Request | None, timeout: float | None) -> None:
        """A connection slot, waiting at most `timeout` (PoolTimeout)."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with _mapped(request, httpx.PoolTimeout, httpx.ConnectError), trio.fail_after(_seconds(timeout)):
                await self._slots.acquire()

    async def small_request(
        self,
        origin: tuple[str, str, int],
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: httpx.Timeout,
        limit: int,
    ) -> Answer:
        """One request whose body is in memory, answered by at most `limit` bytes, read whole: the
        same pool, timeouts and exceptions as handle_async_request, without building httpx's request
        and response objects. For a small share or slot PUT that is about 150 µs of client CPU instead
        of 240, and 10% more files/s in the mount's small-file untar (`scripts/bench/mount`).
        `headers` must hold Host; Content-Length is added. An answer over `limit` bytes raises
        httpx.RemoteProtocolError."""
        timeouts = timeout.as_dict()
        await self._acquire(None, timeouts.get("pool"))
        connection: _Connection | None = None
        try:
            connection = await self._connection(origin, None, timeouts.get("connect"))
            event = h11.Request(
                method=method, target=target, headers=[*headers, (b"content-length", b"%d" % len(body))]
            )
            head = await connection.exchange(event, body, None, timeouts.get("read"), timeouts.get("write"))
            received = bytearray()
            while (piece := await connection.next_piece(None, timeouts.get("read"))) is not None:
                received += piece
                if len(received) > limit:
                    raise httpx.RemoteProtocolError(f"answer larger than the {limit} bytes asked for")
        except BaseException:
            if connection is not None:
                connection.close()
            self._slots.release()
            raise
        self._done(connection)
        return Answer(head.status_code, head.reason, bytes(received))

    async def _connection(
        self, origin: tuple[str, str, int], request: httpx.Request | None, timeout: float | None
    ) -> _Connection:
        """An idle connection to `origin` (see _reusable), or a new one. The caller holds a slot."""
        if self._closed:
            raise httpx.ConnectError("the connection pool is closed", request=request)
        return self._reusable(origin) or await self._connect(origin, request, timeout)

    def _reusable(self, origin: tuple[str, str, int]) -> _Connection | None:
        """The most recently used idle connection to `origin`, if one is young enough and the node has
        not hung up on it; closes the expired ones (and a hung-up one it meets) on the way."""
        oldest = trio.current_time() - self._expiry
        kept: list[_Connection] = []
        found = None
        for connection in reversed(self._idle):
            if connection.idle_since < oldest:
                connection.close()
            elif found is None and connection.origin == origin:
                if connection.is_stale():
                    connection.close()
                else:
                    found = connection
            else:
                kept.append(connection)
        kept.reverse()
        self._idle = kept
        return found

    async def _connect(
        self, origin: tuple[str, str, int], request: httpx.Request | None, timeout: float | None
    ) -> _Connection:
        scheme, host, port = origin
        with _mapped(request, httpx.ConnectTimeout, httpx.ConnectError), trio.fail_after(_seconds(timeout)):
            tcp = await trio.open_tcp_stream(host, port)  # sets TCP_NODELAY
            stream: trio.abc.Stream = tcp
            if scheme == "https":
                tls = trio.SSLStream(
                    tcp, self._ssl_context or ssl.create_default_context(), server_hostname=host
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    tcp.socket.close()
                    raise
                stream = tls
        self.opened += 1
        return _Connection(origin, stream, tcp.socket)

    def _done(self, connection: _Connection) -> None:
        """The exchange on `connection` is over: keep it for the next request if both sides finished
        it cleanly, or close it."""
        finished = connection.h11.our_state is connection.h11.their_state is h11.DONE
        if finished and not self._closed and len(self._idle) < self._max_idle:
            connection.h11.start_next_cycle()
            connection.idle_since = trio.current_time()
            self._idle.append(connection)
        else:
            connection.close()
        self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class Answer(NamedTuple):
    """A small_request's answer."""

    status: int
    reason: bytes
    body: bytes


class _Connection:
    """One socket to the node and its h11 state; used by one request at a time."""

    def __init__(
        self, origin: tuple[str, str, int], stream: trio.abc.Stream, socket: trio.socket.SocketType
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.socket = socket
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def is_stale(self) -> bool:
        """An idle connection with something to read has been closed by the node (or is out of step)."""
        return self.socket.fileno() < 0 or self.socket.is_readable()

    def close(self) -> None:
        """Synchronous, so it is safe under cancellation; skips TLS close_notify."""
        self.socket.close()

    async def exchange(
        self,
        event: h11.Request,
        first: bytes,
        rest: AsyncIterator[bytes] | None,
        read: float | None,
        write: float | None,
        request: httpx.Request | None = None,
    ) -> h11.Response:
        """Send the request (its head `event`, `first` and the rest of its body pieces, if any) and
        return the response's head. `request` only names the request in the exceptions raised."""
        head = self._send(request, event)
        try:
            piece = first
            while piece:
                if head and len(piece) <= COALESCE_HEADERS_BYTES:
                    await self._write(request, [head, *self._framed(request, piece)], write)
                else:
                    if head:
                        await self._write(request, [head], write)
                    await self._write(request, self._framed(request, piece), write)
                head = b""
                piece = await anext(rest, b"") if rest is not None else b""
            end = self._send(request, h11.EndOfMessage())
            await self._write(request, [head, end], write)
        except httpx.WriteError:
            # The node may have answered already and closed (a body it refuses by its declared
            # length): its answer says more than the broken pipe does.
            try:
                return await self._response(request, read)
            except httpx.HTTPError:
                pass
            raise
        return await self._response(request, read)

    def _send(self, request: httpx.Request | None, event: h11.Request | h11.EndOfMessage) -> bytes:
        """The bytes of `event`. A body that does not match its Content-Length is httpx's
        LocalProtocolError, like every other misuse."""
        try:
            return self.h11.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc

    def _framed(self, request: httpx.Request | None, piece: bytes) -> list[bytes]:
        try:
            return self.h11.send_with_data_passthrough(h11.Data(data=piece)) or []
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc

    async def _write(self, request: httpx.Request | None, pieces: list[Any], timeout: float | None) -> None:
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if not data:
            return
        with _mapped(request, httpx.WriteTimeout, httpx.WriteError), trio.fail_after(_seconds(timeout)):
            await self.stream.send_all(data)

    async def _response(self, request: httpx.Request | None, read: float | None) -> h11.Response:
        while True:
            event = await self.next_event(request, read)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__}", request=request)

    async def next_piece(self, request: httpx.Request | None, timeout: float | None) -> bytes | None:
        """The next piece of the response body; None once the body has ended."""
        event = await self.next_event(request, timeout)
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return None
        raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__}", request=request)

    async def next_event(self, request: httpx.Request | None, timeout: float | None) -> Any:
        """The next h11 event of the response, reading from the socket as needed."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if event is not h11.NEED_DATA:
                return event
            with _mapped(request, httpx.ReadTimeout, httpx.ReadError), trio.fail_after(_seconds(timeout)):
                data = await self.stream.receive_some(READ_BYTES)
            if not data and self.h11.their_state is h11.SEND_RESPONSE:
                raise httpx.RemoteProtocolError(
                    "the node closed the connection without an answer", request=request
                )
            self.h11.receive_data(data)


class _ResponseBody(httpx.AsyncByteStream):
    """The response body as it arrives; closing it ends the exchange (see NodeTransport._done)."""

    def __init__(
        self, pool: NodeTransport, connection: _Connection, request: httpx.Request, read: float | None
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._request = request
        self._read = read
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self._closed:
            piece = await self._connection.next_piece(self._request, self._read)
            if piece is None:
                return
            yield piece

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool._done(self._connection)


async def _pieces(stream: Any) -> AsyncIterator[bytes]:
    """A request body's non-empty pieces."""
    async for piece in stream:
        if piece:
            yield piece


def _seconds(timeout: float | None) -> float:
    return float("inf") if timeout is None else timeout


class _mapped:
    """Turns trio's timeout and the socket's errors of one I/O step into the httpx exceptions."""

    def __init__(
        self,
        request: httpx.Request | None,
        timeout: type[httpx.TimeoutException],
        error: type[httpx.TransportError],
    ) -> None:
        self.request = request
        self.timeout = timeout
        self.error = error

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if isinstance(exc, trio.TooSlowError):
            raise self.timeout("timed out", request=self.request) from exc
        if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)):
            raise self.error(str(exc) or type(exc).__name__, request=self.request) from exc
        return False
