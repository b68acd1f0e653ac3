"""Repair: bring an object back to full health (all n shares on n distinct nodes).

Immutable files need only the verify cap: for each segment the repairer fetches k verified blocks, decodes
them to the segment's ciphertext (no key involved), re-encodes it, and streams the blocks of the missing
share numbers through ShareStreams to nodes that hold no matched share of the file. Before a rebuilt
share's trailer is sent, its root is compared with the root the verified trailer pins for that share
number, so a rebuilt share is committed only if it is exactly the share the uploader made. Corrupt copies
found by verify are deleted first when this client may delete them (it uploaded them); otherwise their
node is left out.

Mutable objects (directories) need the write cap: the current version is published again as seqnum+1 to
every node of the ring, which rewrites missing, stale and corrupt slots alike.
"""

from __future__ import annotations

import trio

from tahoefs.errors import IntegrityError, NodeError, NotEnoughSharesError, ungrouped
from tahoefs.formats.caps import DirWriteCap, VerifyCap
from tahoefs.formats.codec import block_hash, erasure_decode, erasure_encode
from tahoefs.formats.share import ShareLayout, VerifiedTrailer, build_trailer_tail
from tahoefs.grid.check import Corrupt, Health, matching
from tahoefs.grid.client import GridClient
from tahoefs.grid.download import FileReader
from tahoefs.grid.mutable import MutableObject, Version
from tahoefs.grid.streams import ShareStreams


async def repair_file(
    grid: GridClient, cap: VerifyCap, health: Health, reader: FileReader
) -> tuple[str, list[Corrupt]]:
    """Rebuild the shares `health` (from check_file, with `reader` from the same call) lacks. Returns a
    short account of what was done and the corrupt copies still on the grid (those this client could not
    delete). Raises NotEnoughSharesError when fewer than k good shares remain."""
    if not health.recoverable:
        raise NotEnoughSharesError(
            f"cannot repair: {health.shares_found} of the {cap.needed} shares needed remain"
        )
    matched = matching(health.holders)
    missing = [num for num in range(cap.total) if num not in matched]
    stuck = await _delete_corrupt(grid, cap, health)
    deleted = len(health.corrupt) - len(stuck)
    taken = set(matched.values()) | {c.node.node_id for c in stuck}
    candidates = [n for n in grid.permuted_nodes(cap.storage_index) if n.node_id not in taken]
    if not missing:
        return (
            f"nothing to rebuild; removed {deleted} corrupt shares" if deleted else "nothing to do"
        ), stuck
    if not candidates:
        return "no node is free to take the missing shares", stuck
    trailer = await _any_trailer(reader)
    layout = trailer.layout
    streams = ShareStreams(grid, cap.storage_index, missing, candidates, layout.total_length)

    async def produce() -> None:
        for segment in range(layout.num_segments):
            blocks = await reader.verified_blocks(segment)
            rebuilt = await trio.to_thread.run_sync(_rebuild, blocks, layout, segment, missing)
            await streams.send(*rebuilt)
        tails = {}
        for num in missing:
            hasher = streams.hashers[num]
            if hasher.finish() != trailer.share_roots[num]:
                share = streams.shares[num]
                streams.fail_share(share, IntegrityError("repair", f"rebuilt share {num} has the wrong root"))
                continue
            tails[num] = build_trailer_tail(bytes(hasher.chunk_roots), trailer.share_roots, layout.ueb, num)
        await streams.finish(tails)

    with ungrouped():
        await streams.run(produce)
    placed = sorted(s.num for s in streams.shares.values() if s.committed)
    account = f"rebuilt {len(placed)} of {len(missing)} missing shares"
    if deleted:
        account += f", removed {deleted} corrupt shares"
    failed = [f"{e.node}: {e.reason}" for e in streams.failures]
    if failed:
        account += f" ({'; '.join(failed[:3])})"
    return account, stuck


async def _any_trailer(reader: FileReader) -> VerifiedTrailer:
    """A verified trailer from any good share (all agree on what repair needs: UEB and share roots)."""
    assert reader.sources is not None
    for src in reader._choose(reader.n, set(), set()):
        try:
            with trio.fail_after(reader.grid.stall_timeout):
                return await reader._trailer(src)
        except (NodeError, trio.TooSlowError):
            continue
    raise NotEnoughSharesError("cannot repair: no share has a readable trailer")


def _rebuild(
    blocks: dict[int, bytes], layout: ShareLayout, segment: int, nums: list[int]
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Blocks `nums` of `segment`, re-encoded from any k verified blocks, and their hashes."""
    k, n = layout.ueb.needed, layout.ueb.total
    ciphertext = erasure_decode(blocks, k, n, layout.segment_length(segment))
    every = erasure_encode(ciphertext, k, n)
    return {j: every[j] for j in nums}, {j: block_hash(every[j]) for j in nums}


async def _delete_corrupt(grid: GridClient, cap: VerifyCap, health: Health) -> list[Corrupt]:
    """Delete the corrupt copies this client may delete (those it uploaded). Returns the others: their
    nodes are left out of placement."""
    stuck: list[Corrupt] = []
    for bad in health.corrupt:
        try:
            secret = grid.delete_secret(cap.storage_index, bad.node)
            with trio.fail_after(grid.stall_timeout):
                await bad.node.delete_share(cap.storage_index, bad.num, secret)
        except (NodeError, trio.TooSlowError):
            stuck.append(bad)
    return stuck


async def repair_mutable(grid: GridClient, cap: DirWriteCap, version: Version) -> str:
    """Publish `version` again (as seqnum + 1) so every node of the ring holds a good current share.
    Raises UploadUnhappyError / ConflictError like any publish."""
    obj = MutableObject(grid, cap)
    after = await obj.publish(version.plaintext, version)
    return f"published again as version {after.seqnum}"
