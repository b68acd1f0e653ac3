"""GridClient: the connection pool to every node of a grid, and placement on the permuted ring."""

from __future__ import annotations

import hashlib
from types import TracebackType

import httpx

from tahoefs.formats.hashing import TAG_DELETE_SECRET, tagged_hash
from tahoefs.grid.config import GridConfig
from tahoefs.limits import NODE_CONNECT_TIMEOUT, NODE_STALL_TIMEOUT
from tahoefs.storage.client import NodeClient, TransferStats


class GridClient:
    """Use as `async with GridClient(config, client_secret) as grid:` inside trio.

    `client_secret` (32 bytes, kept in $TAHOEFS_HOME) derives the per-node secrets that let this client
    delete the shares it uploaded."""

    def __init__(self, config: GridConfig, client_secret: bytes) -> None:
        config.validate()
        self.config = config
        self.client_secret = client_secret
        self.http: httpx.AsyncClient | None = None
        self.nodes: list[NodeClient] = []
        self.stats = TransferStats()

    async def __aenter__(self) -> GridClient:
        per_node = 2 * self.config.total + 8
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(NODE_STALL_TIMEOUT, connect=NODE_CONNECT_TIMEOUT),
            limits=httpx.Limits(
                max_connections=per_node * max(1, len(self.config.nodes)), max_keepalive_connections=64
            ),
            trust_env=False,
        )
        self.nodes = [
            NodeClient(self.http, node.url, node.token, node.placement_id, name=node.url, stats=self.stats)
            for node in self.config.nodes
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.http is not None:
            await self.http.aclose()

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

    def delete_secret(self, storage_index: bytes, node: NodeClient) -> bytes:
        return tagged_hash(TAG_DELETE_SECRET, self.client_secret, storage_index, node.node_id.encode())
