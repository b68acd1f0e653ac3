"""Run one storage node in the foreground on uvicorn (chosen by scripts/bench/http_servers, see
docs/server-choice.md)."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import uvicorn

from tahoefs.errors import UsageError
from tahoefs.storage.node_app import NodeApp
from tahoefs.storage.store import ShareStore, load_or_create_identity


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen expects HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def run_node(
    directory: Path, listen: str, min_free_bytes: int | None = None, max_share_bytes: int | None = None
) -> None:
    """Serve the share store in `directory` until SIGINT/SIGTERM. Prints `url:` and `token:` lines on
    stdout and writes DIR/url once the socket is bound. Raises UsageError for a bad address or folder."""
    host, port = parse_listen(listen)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        identity = load_or_create_identity(directory)
        kwargs = {} if min_free_bytes is None else {"min_free_bytes": min_free_bytes}
        store = ShareStore(directory, **kwargs)
    except OSError as exc:
        raise UsageError(f"cannot use node folder {directory}: {exc.strerror}") from None
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
    url = f"http://{shown_host}:{bound_port}"
    (directory / "url").write_text(url + "\n")
    print(f"url: {url}", flush=True)
    print(f"token: {identity.token}", flush=True)
    print(f"node_id: {identity.node_id}", flush=True)
    app = NodeApp(
        store,
        identity.token,
        identity.node_id,
        **({} if max_share_bytes is None else {"max_share_bytes": max_share_bytes}),
    )
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        limit_concurrency=512,
    )
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server.run(sockets=[sock])
    sys.stdout.flush()
