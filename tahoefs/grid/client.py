"""GridClient: the connection pool to every node of a grid, and placement on the permuted ring."""

from __future__ import annotations

import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator
from types import TracebackType

import httpx
import trio

from tahoefs.formats.hashing import TAG_DELETE_SECRET, tagged_hash
from tahoefs.grid.config import GridConfig
from tahoefs.grid.pinning import node_transport
from tahoefs.limits import NODE_CONNECT_TIMEOUT
from tahoefs.storage.client import NodeClient, TransferStats

CONNECTIONS_PER_NODE = 32  # concurrent requests to one node (uploads use 1-2, reads up to ~18)


class GridClient:
    """Use as `async with GridClient(config, client_secret) as grid:` inside trio.

    `client_secret` (32 bytes, kept in $TAHOEFS_HOME) derives the per-node secrets that let this client
    delete the shares it uploaded."""

    def __init__(self, config: GridConfig, client_secret: bytes) -> None:
        config.validate()
        self.config = config
        self.client_secret = client_secret
        self._pools: list[httpx.AsyncClient] = []
        self.nodes: list[NodeClient] = []
        self.stats = TransferStats()
        self._writers: dict[bytes, trio.Lock] = {}  # see writing()

    async def __aenter__(self) -> GridClient:
        # One small connection pool per node: httpx's pool does work proportional to its size on every
        # request, and one shared pool of ~25 connections cost ~20% of a download's CPU.
        # One TLS context for all pools: building one loads the CA store (~17 ms each).
        # A node with a pinned certificate gets a transport that trusts that certificate alone (checked
        # at its first request); see grid/pinning.py.
        tls = ssl.create_default_context()
        limits = httpx.Limits(max_connections=CONNECTIONS_PER_NODE, max_keepalive_connections=8)
        transports = [
            node_transport(node.url, node.fingerprint, node.url, tls, limits, NODE_CONNECT_TIMEOUT)
            for node in self.config.nodes
        ]
        self._pools = [
            httpx.AsyncClient(
                verify=tls,
                timeout=httpx.Timeout(self.stall_timeout, connect=NODE_CONNECT_TIMEOUT),
                limits=limits,
                trust_env=False,
                transport=transport,
            )
            for transport in transports
        ]
        self.nodes = [
            NodeClient(
                pool,
                node.url,
                node.token,
                node.placement_id,
                name=node.url,
                stats=self.stats,
                transport=transport,
            )
            for pool, node, transport in zip(self._pools, self.config.nodes, transports, strict=True)
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for pool in self._pools:
            await pool.aclose()

    @property
    def stall_timeout(self) -> float:
        return self.config.stall_timeout

    @property
    def needed(self) -> int:
        return self.config.needed

    @property
    def total(self) -> int:
        return self.config.total

    @property
    def happy(self) -> int:
        return self.config.happy

    def permuted_nodes(self, storage_index: bytes) -> list[NodeClient]:
        """Every node, in this storage index's ring order: sorted by SHA-256(storage index || node id).
        Spreads files evenly over nodes, and any client finds the same order from the cap alone."""
        return sorted(self.nodes, key=lambda n: hashlib.sha256(storage_index + n.node_id.encode()).digest())

    @contextlib.asynccontextmanager
    async def writing(self, storage_index: bytes) -> AsyncIterator[None]:
        """Holds this client's lock on the mutable object `storage_index` for one read-change-publish:
        its writers take turns instead of racing. Racing writers each win some nodes' test-and-set,
        and five or more of them can split the n shares so that no version has k (all of them then
        conflict, and the object cannot be read). Writers in other processes still race; two to four
        of them always leave a version with k shares at 3-of-10."""
        lock = self._writers.setdefault(storage_index, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.statistics().locked and self._writers.get(storage_index) is lock:
                del self._writers[storage_index]  # no one holds it or was handed it: forget it

    def delete_secret(self, storage_index: bytes, node: NodeClient) -> bytes:
        return tagged_hash(TAG_DELETE_SECRET, self.client_secret, storage_index, node.node_id.encode())
