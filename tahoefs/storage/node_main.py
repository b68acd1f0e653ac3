"""Run one storage node in the foreground on uvicorn (chosen by scripts/bench/http_servers, see
docs/server-choice.md)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tahoefs.errors import UsageError
from tahoefs.storage.node_app import NodeApp
from tahoefs.storage.store import ShareStore, StoreError, load_or_create_identity
from tahoefs.tls import load_or_create_certificate

# A request's line and headers together: tahoefs clients send under 1 KiB. The node answers 431 and closes
# the connection beyond this.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# Seconds from a connection's start, or from the first byte of a later request on it, to the end of that
# request's headers. The connection is closed after that.
REQUEST_HEAD_TIMEOUT = 60.0
# Seconds an idle keep-alive connection stays open; also how long the rest of a body the node answered
# early (401, 409, 413, ...) may pause before the connection is closed.
KEEP_ALIVE_SECONDS = 30
_HEAD_PIECE = 4096  # bytes fed to the parser at a time while a head is incomplete


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two bounds on request heads it lacks.

    httptools keeps a request's URL and headers in memory until the blank line that ends them, with no
    limit and (for a long URL or header value) by repeated concatenation; uvicorn adds none, and the
    token is checked only after the headers. Measured on one node before this class: 200 MiB of header
    lines from an unauthenticated client grew it to 710 MB RSS; one 200 MiB header value or URL took
    44 s of CPU and 350 MB. And a connection that never finishes its headers is never timed out, so 512
    of them (the concurrency limit) made every other client get 503 until the node restarted.

    Here a head is fed to the parser in pieces of `_HEAD_PIECE` bytes and counted; over
    MAX_REQUEST_HEAD_BYTES the node answers 431 and closes. A head not complete within
    REQUEST_HEAD_TIMEOUT seconds closes the connection. Bodies are fed as before, in one call per read.

    One more hole of the same kind: when the node answers before the body has all arrived (a 401 to a
    PUT without the token), the body's bytes cancel uvicorn's keep-alive timer and nothing re-arms it,
    so a client that sends one more piece and then nothing held the connection forever. Here such a
    body may pause at most KEEP_ALIVE_SECONDS, like an idle connection."""

    _in_head = True
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None
    _idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_idle_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            if self.cycle is not None and self.cycle.response_complete:
                self._restart_idle_timer()  # the body of a request already answered
            super().data_received(data)
            return
        self._stop_idle_timer()
        self._start_head_timer()
        view = memoryview(data)
        pos = 0
        while pos < len(view) and self._in_head:
            piece = view[pos : pos + _HEAD_PIECE]
            pos += len(piece)
            self._head_bytes += len(piece)
            super().data_received(piece)  # type: ignore[arg-type]
            if self.transport.is_closing():
                return
            if self._in_head and self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self._refuse_head()
                return
        if pos < len(view):
            super().data_received(view[pos:])  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._stop_head_timer()
        self._stop_idle_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next on this connection is the next request's head
        if self.cycle is not None and self.cycle.response_complete:
            self._restart_idle_timer()  # answered before its body ended: now an idle connection

    def _restart_idle_timer(self) -> None:
        self._stop_idle_timer()
        self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_timed_out)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _refuse_head(self) -> None:
        self._stop_head_timer()
        msg = f"request line and headers over {MAX_REQUEST_HEAD_BYTES} bytes".encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(msg), msg)
        )
        self.transport.close()


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen expects HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def run_node(
    directory: Path,
    listen: str,
    min_free_bytes: int | None = None,
    max_share_bytes: int | None = None,
    use_tls: bool = False,
) -> None:
    """Serve the share store in `directory` until SIGINT/SIGTERM. Prints `url:`, `token:` and `node_id:`
    lines (and `fingerprint:` with TLS) on stdout and writes DIR/url once the socket is bound. With
    `use_tls` it serves HTTPS with the certificate in DIR, made at the first start with TLS. Raises
    UsageError for a bad address or folder."""
    host, port = parse_listen(listen)
    tls_files: dict[str, str] = {}
    fingerprint = ""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        identity = load_or_create_identity(directory)
        if use_tls:
            cert, key, fingerprint = load_or_create_certificate(directory, f"tahoefs node {identity.node_id}")
            tls_files = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        kwargs = {} if min_free_bytes is None else {"min_free_bytes": min_free_bytes}
        store = ShareStore(directory, **kwargs)
    except OSError as exc:
        raise UsageError(f"cannot use node folder {directory}: {exc.strerror}") from None
    except StoreError as exc:  # the small-share database would not open
        raise UsageError(f"cannot use node folder {directory}: {exc.reason}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every reused connection waits ~40 ms (Nagle against delayed ACK) on responses written in two parts.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror}") from None
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"{'https' if use_tls else 'http'}://{shown_host}:{bound_port}"
    (directory / "url").write_text(url + "\n")
    print(f"url: {url}", flush=True)
    print(f"token: {identity.token}", flush=True)
    print(f"node_id: {identity.node_id}", flush=True)
    if fingerprint:
        print(f"fingerprint: {fingerprint}", flush=True)
    app = NodeApp(
        store,
        identity.token,
        identity.node_id,
        **({} if max_share_bytes is None else {"max_share_bytes": max_share_bytes}),
    )
    config = uvicorn.Config(
        app,
        http=BoundedHttpToolsProtocol,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        limit_concurrency=512,
        **tls_files,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
    sys.stdout.flush()
