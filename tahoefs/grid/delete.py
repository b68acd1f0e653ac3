"""Removing an immutable file's shares from the nodes (after nothing refers to it any more)."""

from __future__ import annotations

import contextlib

import trio

from tahoefs.errors import NodeError
from tahoefs.formats.caps import FileCap, LiteralCap
from tahoefs.grid.client import GridClient


async def delete_file(grid: GridClient, cap: FileCap | LiteralCap) -> int:
    """Best effort: delete every share of `cap` this client may delete (those it uploaded: the delete
    secret derives from its client secret). Returns how many shares went. Never raises for node errors."""
    if isinstance(cap, LiteralCap):
        return 0
    si = cap.storage_index
    deleted = 0
    async with trio.open_nursery() as nursery:
        for node in grid.nodes:

            async def one(node=node) -> None:
                nonlocal deleted
                with contextlib.suppress(NodeError), trio.move_on_after(grid.stall_timeout):
                    deleted += await node.delete_shares(si, grid.delete_secret(si, node))

            nursery.start_soon(one)
    return deleted
