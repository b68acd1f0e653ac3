"""The connection pool of a node whose certificate is pinned in the grid file (docs/protocol.md §2.1).

`PinnedTransport` is the httpx transport of that node's pool. Its first request fetches the node's
certificate (one TLS handshake, in a thread, within the connect timeout) and compares its SHA-256 with
the pin; on a match it builds the real transport, whose SSLContext trusts that certificate alone, and
every later request goes straight to it (one attribute test on the hot path). A certificate that does
not match makes the node fail with NodeError "certificate does not match the pinned fingerprint", like any
failing node; the check is retried after PIN_RETRY_SECONDS, so a long-running mount notices a node that
was fixed. A node that cannot be reached is tried again on the next request.

An https node without a pin is checked against the system's CAs, and says so when its certificate is what
failed (not "unreachable"). Every node's connections are a storage/transport.py NodeTransport.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import trio

from tahoefs.errors import NodeError
from tahoefs.storage.transport import NodeTransport
from tahoefs.tls import MISMATCH, certificate_failure, fetch_certificate, fingerprint, pinned_context

PIN_RETRY_SECONDS = 60.0


def node_transport(
    url: str, pin: str, name: str, verify: ssl.SSLContext, limits: httpx.Limits, connect_timeout: float
) -> httpx.AsyncBaseTransport:
    """The transport of one node's pool."""
    if pin:
        return PinnedTransport(url, pin, name, limits, connect_timeout)
    if url.lower().startswith("https://"):
        return CATransport(name, verify=verify, limits=limits)
    return _transport(None, limits)


def _transport(context: ssl.SSLContext | None, limits: httpx.Limits) -> NodeTransport:
    return NodeTransport(ssl_context=context, **_pool_size(limits))


def _pool_size(limits: httpx.Limits) -> dict[str, Any]:
    return {
        "max_connections": limits.max_connections or 32,
        "max_idle": limits.max_keepalive_connections or 0,
        "keepalive_expiry": float("inf") if limits.keepalive_expiry is None else limits.keepalive_expiry,
    }


class CATransport(NodeTransport):
    """The transport of an https node without a pin, naming a certificate failure as such."""

    def __init__(self, name: str, verify: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(ssl_context=verify, **_pool_size(limits))  # the shared context: one CA store load
        self.name = name

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectError as exc:
            failure = certificate_failure(exc)
            if failure is not None:
                raise NodeError(
                    self.name,
                    f"certificate not trusted ({failure.verify_message}); to trust this node's own "
                    'certificate, pin it: fingerprint = "sha256:..." in the grid file',
                ) from exc
            raise


class PinnedTransport(httpx.AsyncBaseTransport):
    """The transport of a node with a pinned certificate: checks the pin once, then trusts only it."""

    def __init__(self, url: str, pin: str, name: str, limits: httpx.Limits, connect_timeout: float) -> None:
        self.url = url
        self.pin = pin
        self.name = name
        self._limits = limits
        self._connect_timeout = connect_timeout
        self._inner: NodeTransport | None = None
        self._lock = trio.Lock()
        self._failure: NodeError | None = None
        self._failed_at = -1.0  # trio clock time of the last failed check
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inner = self._inner or await self._verified()
        try:
            return await inner.handle_async_request(request)
        except httpx.ConnectError as exc:
            # A node that changed its certificate since the check: its handshake fails verification.
            if certificate_failure(exc) is not None:
                raise NodeError(self.name, MISMATCH) from exc
            raise

    async def _verified(self) -> NodeTransport:
        asked = trio.current_time()
        async with self._lock:
            if self._inner is not None:
                return self._inner
            if self._closed:
                raise NodeError(self.name, "connection pool is closed")
            failure = self._failure
            # Requests that queued behind a failed check share its outcome instead of each paying for
            # one more; a mismatch stands for PIN_RETRY_SECONDS.
            if failure is not None and (
                self._failed_at >= asked
                or (failure.reason == MISMATCH and asked - self._failed_at < PIN_RETRY_SECONDS)
            ):
                raise NodeError(self.name, failure.reason)
            try:
                der = await self._fetch()
            except NodeError as exc:
                self._failure, self._failed_at = exc, trio.current_time()
                raise
            self._failure = None
            self._inner = _transport(pinned_context(der), self._limits)
            return self._inner

    async def _fetch(self) -> bytes:
        with trio.move_on_after(self._connect_timeout + 1):
            try:
                der = await trio.to_thread.run_sync(
                    fetch_certificate, self.url, self._connect_timeout, abandon_on_cancel=True
                )
            except ssl.SSLError as exc:
                raise NodeError(
                    self.name, f"TLS handshake failed ({exc.reason or exc}); is the node running with --tls?"
                ) from None
            except TimeoutError:
                raise NodeError(self.name, "certificate check: timed out") from None
            except OSError as exc:
                raise NodeError(
                    self.name, f"certificate check: unreachable ({exc.strerror or exc})"
                ) from None
            if fingerprint(der) != self.pin:
                raise NodeError(self.name, MISMATCH)
            return der
        raise NodeError(self.name, "certificate check: timed out")

    async def aclose(self) -> None:
        self._closed = True
        if self._inner is not None:
            await self._inner.aclose()
