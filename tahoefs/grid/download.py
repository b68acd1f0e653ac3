"""Download: find shares, fetch k verified blocks per segment, decode, decrypt.

A `FileReader` serves any byte range of one immutable file. For each segment it picks k distinct shares
(primary shares 0..k-1 first, because decoding them is free, unless their node is slow; then the fastest
nodes), fetches each share's trailer once (one suffix request, verified against the cap's UEB hash), then
one ranged request per block, and checks every block against its leaf hash before decoding. Fetches that
are late are hedged with other shares from other nodes, and the first k verified blocks win
(`verified_blocks`). A node that errors, stalls past the grid's stall timeout or sends bytes that fail
verification is dropped for the rest of this reader, named in `problems`, and another share takes its
place; a node that loses a hedge race is named too, and avoided from then on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from tahoefs.errors import IntegrityError, NodeError, NotEnoughSharesError, ungrouped
from tahoefs.formats.caps import FileCap, VerifyCap
from tahoefs.formats.codec import block_hash, decode_segment
from tahoefs.formats.hashing import HASH_SIZE
from tahoefs.formats.share import VerifiedTrailer, parse_trailer, verify_leaves
from tahoefs.grid.client import GridClient
from tahoefs.grid.cpu import crunch
from tahoefs.limits import (
    DOWNLOAD_WINDOW_SEGMENTS,
    HEDGE_FACTOR,
    HEDGE_FLOOR,
    LOCATE_GRACE,
    MAX_TRAILER_BYTES,
    TRAILER_PROBE_BYTES,
)
from tahoefs.storage.client import NodeClient

LEAF_CHUNKS_CACHED = 2  # verified leaf chunks kept per share (128 KiB each at most)


@dataclass
class ShareSource:
    """Share `num` as held by `node`, with its verified trailer once fetched."""

    node: NodeClient
    num: int
    trailer: VerifiedTrailer | None = None
    seconds_per_fetch: float = 0.0
    lock: trio.Lock | None = None
    whole: bytes | None = None  # the entire share, when the trailer probe already fetched all of it

    def __post_init__(self) -> None:
        self.lock = trio.Lock()
        self._leaf_chunks: OrderedDict[int, bytes] = OrderedDict()


class FileReader:
    """Random and sequential access to one immutable file, every byte verified.

    Use inside trio. With a VerifyCap it can fetch and verify blocks (`verified_blocks`) but not decrypt.
    Raises NotEnoughSharesError when fewer than k good shares remain for a segment."""

    def __init__(self, grid: GridClient, cap: FileCap | VerifyCap) -> None:
        self.grid = grid
        self.cap = cap
        self.key = cap.key if isinstance(cap, FileCap) else None
        self.si = cap.storage_index
        self.k, self.n = cap.needed, cap.total
        self.size = cap.size
        self.sources: list[ShareSource] | None = None
        self.bad_nodes: dict[str, str] = {}
        self.problems: list[str] = []
        self._locate_lock = trio.Lock()

    # -- locating ------------------------------------------------------------------------------
    def _mark_bad(self, node: NodeClient, reason: str) -> None:
        if node.node_id not in self.bad_nodes:
            self.bad_nodes[node.node_id] = reason
            self.problems.append(f"node {node.name}: {reason}")

    async def locate(self) -> list[ShareSource]:
        """Ask every node (in ring order, concurrently) which shares it holds. Returns once all have
        answered, or LOCATE_GRACE seconds after k distinct shares are known."""
        async with self._locate_lock:
            if self.sources is not None:
                return self.sources
            found: list[ShareSource] = []
            nums: set[int] = set()
            ring = self.grid.permuted_nodes(self.si)
            pending = len(ring)
            async with trio.open_nursery() as nursery:

                async def ask(node: NodeClient) -> None:
                    nonlocal pending
                    try:
                        with trio.fail_after(self.grid.stall_timeout):
                            held = await node.list_shares(self.si)
                    except trio.TooSlowError:
                        self._mark_bad(node, "did not answer in time")
                        held = []
                    except NodeError as exc:
                        self._mark_bad(node, exc.reason)
                        held = []
                    for num in held:
                        if num < self.n:
                            found.append(ShareSource(node, num))
                            nums.add(num)
                    pending -= 1
                    if pending == 0:
                        nursery.cancel_scope.cancel()
                    elif len(nums) >= self.k:
                        nursery.start_soon(grace)

                async def grace() -> None:
                    await trio.sleep(LOCATE_GRACE)
                    nursery.cancel_scope.cancel()

                for node in ring:
                    nursery.start_soon(ask, node)
            self.sources = found
            return found

    # -- verified fetching -----------------------------------------------------------------------
    async def _trailer(self, source: ShareSource) -> VerifiedTrailer:
        assert source.lock is not None
        async with source.lock:
            if source.trailer is None:
                node = source.node
                suffix, length = await node.read_suffix(self.si, source.num, TRAILER_PROBE_BYTES)
                trailer, more = parse_trailer(suffix, length, self.cap.ueb_hash, source.num)
                if more:
                    if more > MAX_TRAILER_BYTES:
                        raise IntegrityError(node.name, "trailer is impossibly large")
                    suffix, length = await node.read_suffix(self.si, source.num, more)
                    trailer, more = parse_trailer(suffix, length, self.cap.ueb_hash, source.num)
                if trailer.ueb.file_size != self.size or (trailer.ueb.needed, trailer.ueb.total) != (
                    self.k,
                    self.n,
                ):
                    raise IntegrityError(node.name, "share parameters disagree with the capability")
                source.trailer = trailer
                source._leaf_chunks.update(trailer.leaves)
                if len(suffix) == length:
                    # The probe fetched the whole (small) share: keep its blocks, saving one request
                    # per block. Bounded by TRAILER_PROBE_BYTES per source.
                    source.whole = suffix
            return source.trailer

    async def _leaf(self, source: ShareSource, segment: int) -> bytes:
        trailer = await self._trailer(source)
        per = trailer.ueb.hash_chunk_leaves
        chunk = segment // per
        leaves = source._leaf_chunks.get(chunk)
        if leaves is None:
            offset, length = trailer.layout.chunk_range(chunk)
            raw = await source.node.read_range(self.si, source.num, offset, length)
            leaves = verify_leaves(trailer, chunk, raw)
            source._leaf_chunks[chunk] = leaves
            while len(source._leaf_chunks) > LEAF_CHUNKS_CACHED:
                source._leaf_chunks.popitem(last=False)
        index = segment - chunk * per
        return leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE]

    async def _fetch_block(self, source: ShareSource, segment: int) -> bytes:
        """One verified block, or NodeError/IntegrityError (IntegrityError names the node). Bounded by
        the grid's stall timeout. Its time, the trailer fetch included on first use, feeds the node's
        moving average."""
        started = trio.current_time()
        try:
            with trio.fail_after(self.grid.stall_timeout):
                leaf = await self._leaf(source, segment)
                layout = source.trailer.layout  # type: ignore[union-attr]
                start, size = layout.block_offset(segment), layout.block_size(segment)
                if source.whole is not None:
                    block = source.whole[start : start + size]
                else:
                    block = await source.node.read_range(self.si, source.num, start, size)
        except trio.TooSlowError:
            raise NodeError(
                source.node.name, f"stalled for more than {self.grid.stall_timeout:g} s"
            ) from None
        except IntegrityError as exc:
            raise IntegrityError(source.node.name, exc.reason) from None
        if await crunch(len(block), block_hash, block) != leaf:
            raise IntegrityError(source.node.name, f"block {segment} of share {source.num} is corrupt")
        self._record_fetch(source.node, trio.current_time() - started)
        return block

    # -- node speed ----------------------------------------------------------------------------
    # Each node has one moving average of its fetch times, kept on all its sources (0.0 = not yet known).
    def _record_fetch(self, node: NodeClient, seconds: float) -> None:
        for src in self.sources or ():
            if src.node is node:
                old = src.seconds_per_fetch
                src.seconds_per_fetch = seconds if not old else 0.7 * old + 0.3 * seconds

    def _record_late(self, node: NodeClient, seconds: float) -> None:
        """`node` lost a hedge race after `seconds` without a block: its fetches take at least that long.
        Raises its average to `seconds` (so `_choose` routes around it) and names it once."""
        for src in self.sources or ():
            if src.node is node:
                src.seconds_per_fetch = max(src.seconds_per_fetch, seconds)
        tag = f"node {node.name}: slow or stalled"
        if node.node_id not in self.bad_nodes and not any(p.startswith(tag) for p in self.problems):
            self.problems.append(f"{tag} (other nodes answered first); reading around it")

    def _late_after(self) -> float:
        """Seconds after which a fetch is late: max(HEDGE_FLOOR, HEDGE_FACTOR x the typical fetch time),
        typical being the lower median of the good nodes' averages (HEDGE_FLOOR before any is known).
        The median, not the best, so that one unusually near node does not make every other one late."""
        known = {
            s.node.node_id: s.seconds_per_fetch
            for s in self.sources or ()
            if s.seconds_per_fetch and s.node.node_id not in self.bad_nodes
        }
        if not known:
            return HEDGE_FLOOR
        times = sorted(known.values())
        return max(HEDGE_FLOOR, HEDGE_FACTOR * times[(len(times) - 1) // 2])

    def _choose(
        self, count: int, skip_nums: set[int], tried: set[int], busy_nodes: frozenset[str] = frozenset()
    ) -> list[ShareSource]:
        """Up to `count` sources with distinct share numbers not in `skip_nums`, best first: sources on
        `busy_nodes` (node ids already late for this segment) last; before the rest, primaries whose node
        is not slow (average under `_late_after()`: decoding primaries is free, but not worth a wait);
        then by moving average, untried nodes (0.0) first. `tried` holds ids of sources already used
        for this segment. Bad nodes are never chosen."""
        assert self.sources is not None
        limit = self._late_after()

        def rank(src: ShareSource) -> tuple[bool, bool, float, int]:
            cheap = src.num < self.k and src.seconds_per_fetch < limit
            return (src.node.node_id in busy_nodes, not cheap, src.seconds_per_fetch, src.num)

        best: dict[int, ShareSource] = {}
        for src in self.sources:
            if src.num in skip_nums or id(src) in tried or src.node.node_id in self.bad_nodes:
                continue
            cur = best.get(src.num)
            if cur is None or rank(src) < rank(cur):
                best[src.num] = src
        return sorted(best.values(), key=rank)[:count]

    async def verified_blocks(self, segment: int) -> dict[int, bytes]:
        """k verified blocks of `segment` keyed by (distinct) share number.

        Starts one fetch per block from the k best sources (`_choose`). If the blocks are not all in
        after `_late_after()` seconds (max(HEDGE_FLOOR, HEDGE_FACTOR x the typical fetch time), fixed
        when the segment starts), it hedges once: one more fetch per missing block, of other shares,
        from nodes not already fetching for this segment where possible. The first k verified blocks
        win and the other fetches are cancelled; a fetch cancelled after running past that delay counts
        against its node (`_record_late`), so later segments route around it. A fetch that fails marks
        its node bad and another share replaces it at once. Each fetch is still bounded by the grid's
        stall timeout. At most 2k blocks are in flight (k, plus one hedge per missing block).
        Raises NotEnoughSharesError when fewer than k good shares remain."""
        sources = await self.locate()
        got: dict[int, bytes] = {}
        running: dict[int, tuple[ShareSource, float]] = {}  # share num -> (source, start time)
        tried: set[int] = set()
        late_after = self._late_after()
        hedge_at = trio.current_time() + late_after
        hedged = False
        failed: NotEnoughSharesError | None = None
        # Each fetch sends one result and is in `running` until it is received: at most 2k queued.
        send, receive = trio.open_memory_channel[tuple[ShareSource, bytes | None]](2 * self.k)

        async def fetch(src: ShareSource) -> None:
            try:
                block: bytes | None = await self._fetch_block(src, segment)
            except NodeError as exc:
                self._mark_bad(src.node, exc.reason)
                block = None
            await send.send((src, block))

        async with trio.open_nursery() as nursery:
            while len(got) < self.k:
                missing = self.k - len(got)
                wanted = 2 * missing if hedged else missing
                if len(running) < wanted:
                    busy = frozenset(src.node.node_id for src, _ in running.values() if hedged)
                    for src in self._choose(wanted - len(running), set(got) | set(running), tried, busy):
                        tried.add(id(src))
                        running[src.num] = (src, trio.current_time())
                        nursery.start_soon(fetch, src)
                if len(got) + len(running) < self.k:
                    failed = self._not_enough(segment, len(got) + len(running), sources)
                    break
                with trio.move_on_at(math.inf if hedged else hedge_at) as timer:
                    src, block = await receive.receive()
                if timer.cancelled_caught:
                    hedged = True  # blocks are late: hedge, once
                    continue
                del running[src.num]
                if block is not None:
                    got[src.num] = block
            if failed is None:
                now = trio.current_time()
                for src, started in running.values():  # the losers, cancelled below
                    if now - started >= late_after:
                        self._record_late(src.node, now - started)
            nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        return got

    def _not_enough(self, segment: int, usable: int, sources: list[ShareSource]) -> NotEnoughSharesError:
        distinct = len({s.num for s in sources})
        detail = "; ".join(self.problems[-5:])
        return NotEnoughSharesError(
            f"cannot read segment {segment}: need {self.k} good shares, found {distinct} on the grid"
            f" and only {usable} usable" + (f" ({detail})" if detail else "")
        )

    # -- plaintext -------------------------------------------------------------------------------
    async def segment_size(self) -> int:
        """The file's segment size, read from the first verified trailer to arrive. Trailers are asked
        for one source at a time, but a source that has not answered within the hedge delay gets
        company (the next source starts too), so a slow or stalled node costs about that delay, not
        the stall deadline."""
        sources = await self.locate()
        found: list[int] = []
        async with trio.open_nursery() as nursery:

            async def one(src: ShareSource, tried: trio.Event) -> None:
                try:
                    with trio.fail_after(self.grid.stall_timeout):
                        found.append((await self._trailer(src)).ueb.segment_size)
                    nursery.cancel_scope.cancel()
                except trio.TooSlowError:
                    self._mark_bad(src.node, "stalled")
                except NodeError as exc:
                    self._mark_bad(src.node, exc.reason)
                tried.set()

            for src in self._choose(self.n, set(), set()):
                tried = trio.Event()
                nursery.start_soon(one, src, tried)
                with trio.move_on_after(self._late_after()):
                    await tried.wait()
        if found:
            return found[0]
        raise self._not_enough(0, 0, sources)

    async def read_segment(self, segment: int, segment_size: int) -> bytes:
        """Plaintext of one segment, verified."""
        if self.key is None:
            raise TypeError("a verify cap cannot decrypt")
        blocks = await self.verified_blocks(segment)
        offset = segment * segment_size
        length = min(segment_size, self.size - offset)
        return await crunch(length, decode_segment, self.key, offset, length, blocks, self.k, self.n)

    async def read(self, offset: int, size: int) -> bytes:
        """Up to `size` verified bytes from `offset` (fewer at end of file)."""
        parts: list[bytes] = []

        async def sink(data: bytes) -> None:
            parts.append(data)

        await self.copy_range(sink, offset, offset + size)
        return b"".join(parts)

    async def copy_range(
        self, sink: Callable[[bytes], Awaitable[None]], start: int = 0, end: int | None = None
    ) -> None:
        """Feed verified bytes [start, end) to `sink` in order, fetching ahead. At most
        DOWNLOAD_WINDOW_SEGMENTS + 2 segments are in flight or waiting for the sink.
        Raises NotEnoughSharesError if a segment cannot be read."""
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return
        seg_size = await self.segment_size()
        first, last = start // seg_size, (end - 1) // seg_size
        send, receive = trio.open_memory_channel[_Slot](DOWNLOAD_WINDOW_SEGMENTS)

        async def fetch(slot: _Slot) -> None:
            slot.data = await self.read_segment(slot.segment, seg_size)
            slot.done.set()

        with ungrouped():
            async with trio.open_nursery() as nursery:

                async def produce() -> None:
                    async with send:
                        for i in range(first, last + 1):
                            slot = _Slot(i)
                            nursery.start_soon(fetch, slot)
                            await send.send(slot)

                nursery.start_soon(produce)
                async with receive:
                    async for slot in receive:
                        await slot.done.wait()
                        data, slot.data = slot.data, b""
                        seg_start = slot.segment * seg_size
                        lo = max(start, seg_start) - seg_start
                        hi = min(end, seg_start + len(data)) - seg_start
                        await sink(data[lo:hi])


class _Slot:
    """One segment of a sequential read: filled by a fetch task, emptied by the consumer."""

    def __init__(self, segment: int) -> None:
        self.segment = segment
        self.data = b""
        self.done = trio.Event()
