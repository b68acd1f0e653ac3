"""Streaming shares to nodes: one bounded channel and one streaming PUT per share.

    producer --send(blocks)--> channel j (UPLOAD_WINDOW_SEGMENTS blocks) --> PUT share j --> its node

`ShareStreams` is the part of an upload that does not care where blocks come from: the uploader feeds it
freshly encoded segments (grid/upload.py), the repairer feeds it blocks rebuilt from k verified shares
(grid/repair.py). It places each share on the first candidate node that holds no other share of this
stream set, moves a share to the next candidate when its node fails before taking any data, drops a share
whose node fails or stalls mid-stream, and keeps every share's block hashes in a spooled temp file until
the trailer is sent, so memory stays flat whatever the share size. A share is committed only when its node
answered 201 for the whole body; a share cancelled before then is discarded by the node.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from tahoefs.errors import NodeError
from tahoefs.formats.share import ChunkedLeafHasher
from tahoefs.grid.client import GridClient
from tahoefs.limits import HASH_CHUNK_LEAVES, UPLOAD_WINDOW_SEGMENTS
from tahoefs.storage.client import NodeClient

log = logging.getLogger(__name__)
LEAF_SPOOL_MEMORY = 64 * 1024  # per share; beyond this block hashes spill to a temp file
COALESCE_BYTES = 64 * 1024  # a share body smaller than this goes out in one piece
T = TypeVar("T")


class Lingering:
    """Where the last PUTs of uploads that already returned may finish: a long-lived nursery (the
    mount's), and a bound on the share bytes those PUTs may still hold (`limit_bytes`: each straggling
    share counts its whole length). An upload whose stragglers do not fit waits for them as before."""

    def __init__(self, nursery: trio.Nursery, limit_bytes: int) -> None:
        self.nursery = nursery
        self.left = limit_bytes
        self.uploads = 0  # uploads with PUTs still running here
        self._active: dict[bytes, ShareStreams] = {}  # those uploads, by storage index
        self._idle = trio.Event()
        self._idle.set()

    def reserve(self, streams: ShareStreams, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        self.uploads += 1
        self._active[streams.si] = streams
        if self._idle.is_set():
            self._idle = trio.Event()
        return True

    def release(self, streams: ShareStreams, size: int) -> None:
        self.left += size
        self.uploads -= 1
        self._active.pop(streams.si, None)
        if not self.uploads:
            self._idle.set()

    async def settle(self, si: bytes) -> None:
        """Before the file with storage index `si` is deleted: cancel its PUTs still running here (a
        node discards a share whose body was cut off) and wait until they are over, so that no share
        commits after the delete and stays on a node for good."""
        streams = self._active.get(si)
        if streams is not None:
            for share in streams.shares.values():
                if not share.committed:
                    share.cancel_scope.cancel()
            await streams.finished.wait()

    async def wait_idle(self) -> None:
        """Until every lingering PUT has finished (at unmount)."""
        await self._idle.wait()

    async def wait_current(self) -> None:
        """Until the PUTs lingering now have finished (later uploads are not waited for, so a steady
        stream of writes cannot hold this up)."""
        for streams in list(self._active.values()):
            await streams.finished.wait()


@dataclass
class _Trailer:
    tail: bytes


@dataclass
class ShareUpload:
    """The fate of share `num` in one stream set."""

    num: int
    node: NodeClient | None = None
    committed: bool = False
    error: NodeError | None = None
    started_body: bool = False
    tried: list[str] = field(default_factory=list)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class ShareStreams:
    """Streams shares `nums` of storage index `si` to nodes chosen from `candidates` (in that order).

    Use `run(produce)`: it starts one writer per placed share and awaits `produce()`, which calls
    `send` once per segment and `finish` once at the end. In flight: at most UPLOAD_WINDOW_SEGMENTS
    blocks per share. `share_length`, when known, goes as each PUT's Content-Length."""

    def __init__(
        self,
        grid: GridClient,
        si: bytes,
        nums: Iterable[int],
        candidates: list[NodeClient],
        share_length: int | None,
    ) -> None:
        self.grid = grid
        self.si = si
        self.candidates = candidates
        self.share_length = share_length
        self.shares = {num: ShareUpload(num) for num in nums}
        self.failures: list[NodeError] = []
        self.hashers = {num: ChunkedLeafHasher(HASH_CHUNK_LEAVES) for num in self.shares}
        self._leaf_files = {num: tempfile.SpooledTemporaryFile(LEAF_SPOOL_MEMORY) for num in self.shares}  # noqa: SIM115
        channels = {num: trio.open_memory_channel[object](UPLOAD_WINDOW_SEGMENTS) for num in self.shares}
        self._senders = {num: s for num, (s, _) in channels.items()}
        self._receivers = {num: r for num, (_, r) in channels.items()}
        self._running = 0  # writers not finished yet
        self._produced = False
        self._changed = trio.Event()  # set (and replaced) whenever a writer finishes
        self.finished = trio.Event()  # set once every writer is over
        self._lingering: tuple[Lingering, int] | None = None

    # -- placement -------------------------------------------------------------------------------
    def _next_node(self, share: ShareUpload) -> NodeClient | None:
        """The first candidate that holds no share of this set and was not tried for this share."""
        used = {s.node.node_id for s in self.shares.values() if s.node is not None}
        for node in self.candidates:
            if node.node_id not in used and node.node_id not in share.tried:
                return node
        return None

    def _place(self, share: ShareUpload) -> None:
        share.node = self._next_node(share)
        if share.node is not None:
            share.tried.append(share.node.node_id)

    def live(self) -> list[ShareUpload]:
        """Shares with a node that has not failed (yet)."""
        return [s for s in self.shares.values() if s.node is not None and s.error is None]

    def holders(self) -> set[str]:
        """Ids of the nodes that committed a share."""
        return {s.node.node_id for s in self.shares.values() if s.committed and s.node is not None}

    def fail_share(self, share: ShareUpload, error: NodeError) -> None:
        """Give up on `share`: its PUT is cancelled (the node discards what it received)."""
        if share.error is None:
            share.error = error
            self.failures.append(error)
            share.cancel_scope.cancel()
            self._receivers[share.num].close()

    # -- share writers ---------------------------------------------------------------------------
    async def _body(self, share: ShareUpload) -> AsyncIterator[bytes]:
        """The share's bytes in order. Pieces under COALESCE_BYTES are joined with what follows (a small
        file's whole share goes in one socket write instead of three)."""
        share.started_body = True
        pending: list[bytes] = []
        size = 0
        async for item in self._receivers[share.num]:
            if isinstance(item, _Trailer):
                leaf_file = self._leaf_files[share.num]
                leaf_file.seek(0)
                if size < COALESCE_BYTES:
                    yield b"".join([*pending, leaf_file.read(), item.tail])
                else:
                    while piece := leaf_file.read(256 * 1024):
                        yield piece
                    yield item.tail
                return
            pending.append(item)  # type: ignore[arg-type]
            size += len(item)  # type: ignore[arg-type]
            if size >= COALESCE_BYTES:
                for piece in pending:
                    yield piece
                pending, size = [], COALESCE_BYTES  # from now on everything streams as it comes

    async def _write_share(self, share: ShareUpload) -> None:
        with share.cancel_scope:
            while share.node is not None:
                node = share.node
                try:
                    await node.put_share(
                        self.si,
                        share.num,
                        self._body(share),
                        self.grid.delete_secret(self.si, node),
                        self.share_length,
                    )
                    share.committed = True
                    return
                except NodeError as exc:
                    if share.started_body:
                        self.fail_share(share, exc)
                        return
                    # Failed before sending a byte (e.g. unreachable): try a spare node.
                    self.failures.append(exc)
                    self._place(share)
            self.fail_share(share, NodeError("placement", f"no spare node for share {share.num}"))

    # -- feeding ---------------------------------------------------------------------------------
    async def send(self, blocks: dict[int, bytes], hashes: dict[int, bytes]) -> None:
        """Queue one segment's block for every share (and record every block hash, sent or not). Waits
        while a share's window is full; a share whose node takes nothing for the stall timeout fails."""
        for num in self.shares:
            self._leaf_files[num].write(hashes[num])
            self.hashers[num].add(hashes[num])
        for share in self.shares.values():
            if share.error is not None:
                continue
            with trio.move_on_after(self.grid.stall_timeout) as scope:
                # A closed channel means the writer failed meanwhile; fail_share recorded why.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._senders[share.num].send(blocks[share.num])
            if scope.cancelled_caught:
                name = share.node.name if share.node else "?"
                self.fail_share(
                    share, NodeError(name, f"stalled: took no data for {self.grid.stall_timeout:g} s")
                )

    async def finish(self, tails: dict[int, bytes]) -> None:
        """Send each live share's trailer tail (everything after its LEAVES) and end every body."""
        for share in self.shares.values():
            if share.error is None and share.num in tails:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._senders[share.num].send(_Trailer(tails[share.num]))
            await self._senders[share.num].aclose()

    async def run(self, produce: Callable[[], Awaitable[T]], lingering: Lingering | None = None) -> T:
        """Place the shares, run the writers and `produce()` until every share committed or failed, and
        return what produce returned. An error in produce, or a cancellation, cancels every PUT
        (nothing is committed).

        With `lingering`, the writers run in its nursery, and run() may return as soon as `happy`
        distinct nodes committed a share, once produce is done: the other shares' PUTs, already sent in
        full or nearly, then finish in the background, within the lingering budget."""
        for share in self.shares.values():
            self._place(share)
        if lingering is None:
            async with trio.open_nursery() as nursery:
                return await self._run_writers(nursery, produce, None)
        return await self._run_writers(lingering.nursery, produce, lingering)

    async def _run_writers(
        self, nursery: trio.Nursery, produce: Callable[[], Awaitable[T]], lingering: Lingering | None
    ) -> T:
        try:
            try:
                for share in self.shares.values():
                    if share.node is not None:
                        nursery.start_soon(self._writer, share)
                        self._running += 1
                    else:
                        self._senders[share.num].close()
                if not self._running:
                    self.finished.set()
                result = await produce()
            finally:
                self._produced = True
                self._close_files_when_done()
            while self._running and not (lingering is not None and self._may_linger(lingering)):
                await self._changed.wait()
            return result
        except BaseException:
            for share in self.shares.values():
                share.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                while self._running:
                    await self._changed.wait()
            raise

    def _may_linger(self, lingering: Lingering) -> bool:
        """Enough shares are committed, and the rest fit in the lingering budget (reserved now)."""
        if self.share_length is None or len(self.holders()) < self.grid.happy:
            return False
        still = sum(
            1 for s in self.shares.values() if s.node is not None and s.error is None and not s.committed
        )
        if not lingering.reserve(self, still * self.share_length):
            return False
        self._lingering = (lingering, still * self.share_length)
        return True

    async def _writer(self, share: ShareUpload) -> None:
        """One share's PUT; never raises (but for cancellation), so a lingering writer cannot take its
        nursery down."""
        try:
            await self._write_share(share)
        except Exception as exc:  # a bug: the share fails like a node would, the upload goes on
            log.exception("share writer failed")
            self.fail_share(
                share, NodeError(share.node.name if share.node else "?", f"internal error: {exc}")
            )
        finally:
            self._running -= 1
            self._changed.set()
            self._changed = trio.Event()
            if not self._running:
                self.finished.set()
                self._close_files_when_done()
                if self._lingering is not None:
                    lingering, reserved = self._lingering
                    lingering.release(self, reserved)
                    self._lingering = None

    def _close_files_when_done(self) -> None:
        """The block-hash files are read by the writers (trailers) and written by produce: closed once
        both are done."""
        if self._produced and not self._running:
            for f in self._leaf_files.values():
                f.close()

    async def delete_committed(self) -> None:
        """Best effort: remove the shares this set committed (an upload that failed leaves nothing)."""
        async with trio.open_nursery() as nursery:
            for share in self.shares.values():
                if share.committed and share.node is not None:
                    node, num = share.node, share.num

                    async def delete(node: NodeClient = node, num: int = num) -> None:
                        with contextlib.suppress(NodeError):
                            await node.delete_share(self.si, num, self.grid.delete_secret(self.si, node))

                    nursery.start_soon(delete)
