"""Upload: stream a file segment by segment into n shares on n distinct nodes.

    source --read 1 segment--> [worker thread: AES-CTR, zfec, SHA-256] --block j--> channel j --> PUT share j

Each share has a memory channel of UPLOAD_WINDOW_SEGMENTS blocks, drained by one streaming HTTP PUT, so
at most that many segments are in flight whatever the file size. A share whose node fails or stalls is
dropped; the upload goes on while `happy` distinct nodes can still be reached, and fails with the reason
of every node that did not take a share otherwise. Block hashes wait in a spooled temp file per share
until the trailer is written, so memory stays flat even for huge files.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from tahoefs.errors import GridFullError, NodeError, NodeFullError, UploadUnhappyError, UsageError, ungrouped
from tahoefs.formats.caps import FileCap, LiteralCap
from tahoefs.formats.codec import encode_segment
from tahoefs.formats.hashing import storage_index_for_key
from tahoefs.formats.share import UEB, ChunkedLeafHasher, ShareLayout, build_trailer_tail, share_roots_hash
from tahoefs.grid.client import GridClient
from tahoefs.limits import (
    HASH_CHUNK_LEAVES,
    LITERAL_MAX,
    SEGMENT_SIZE,
    UPLOAD_WINDOW_SEGMENTS,
)
from tahoefs.storage.client import NodeClient

LEAF_SPOOL_MEMORY = 64 * 1024  # per share; beyond this block hashes spill to a temp file


class ByteSource:
    """Anything with `async read(n) -> bytes` (b"" at EOF); e.g. trio.wrap_file(open(...,'rb'))."""

    async def read(self, n: int) -> bytes:  # pragma: no cover - protocol
        raise NotImplementedError


class BytesSource(ByteSource):
    """A ByteSource over bytes already in memory (small things: directory buckets)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    async def read(self, n: int) -> bytes:
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(out)
        return out


async def read_exactly(source: ByteSource, n: int) -> bytes:
    """Read n bytes, fewer only at EOF (pipes and stdin return short reads)."""
    first = await source.read(n)
    if len(first) == n or not first:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        more = await source.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


@dataclass
class _Trailer:
    tail: bytes


@dataclass
class ShareUpload:
    """The fate of share `num` in one upload."""

    num: int
    node: NodeClient | None = None
    committed: bool = False
    error: NodeError | None = None
    started_body: bool = False
    tried: list[str] = field(default_factory=list)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class _Upload:
    def __init__(
        self, grid: GridClient, progress: Callable[[int], None] | None, size: int | None = None
    ) -> None:
        self.grid = grid
        self.size = size
        self.share_length = None if size is None else share_length(size, grid.needed, grid.total)
        self.k, self.n, self.happy = grid.needed, grid.total, grid.happy
        self.key = os.urandom(32)
        self.si = storage_index_for_key(self.key)
        self.ring = grid.permuted_nodes(self.si)
        self.progress = progress
        self.shares = [ShareUpload(j) for j in range(self.n)]
        self.failures: list[NodeError] = []
        self.leaf_files = [tempfile.SpooledTemporaryFile(LEAF_SPOOL_MEMORY) for _ in range(self.n)]  # noqa: SIM115
        self.hashers = [ChunkedLeafHasher(HASH_CHUNK_LEAVES) for _ in range(self.n)]
        channels = [trio.open_memory_channel[object](UPLOAD_WINDOW_SEGMENTS) for _ in range(self.n)]
        self.senders = [s for s, _ in channels]
        self.receivers = [r for _, r in channels]

    # -- placement -------------------------------------------------------------------------------
    def _used_nodes(self) -> set[str]:
        return {s.node.node_id for s in self.shares if s.node is not None}

    def _next_node(self, share: ShareUpload) -> NodeClient | None:
        """The first node in ring order that holds no share of this upload and was not tried for it."""
        used = self._used_nodes()
        for node in self.ring:
            if node.node_id not in used and node.node_id not in share.tried:
                return node
        return None

    def _assign_initial(self) -> None:
        for share in self.shares:
            share.node = self._next_node(share)
            if share.node is not None:
                share.tried.append(share.node.node_id)

    def _live(self) -> list[ShareUpload]:
        return [s for s in self.shares if s.node is not None and s.error is None]

    def _check_still_happy(self) -> None:
        if len({s.node.node_id for s in self._live()}) < self.happy:  # type: ignore[union-attr]
            raise self._unhappy()

    def _unhappy(self) -> UploadUnhappyError:
        holders = {s.node.node_id for s in self.shares if s.committed and s.node is not None}
        reasons = "; ".join(f"{e.node}: {e.reason}" for e in self.failures) or "not enough nodes in the grid"
        message = (
            f"upload failed: {len(holders)} of the {self.happy} nodes needed hold a share "
            f"(grid has {len(self.grid.nodes)} nodes; {reasons})"
        )
        if self.failures and all(isinstance(e, NodeFullError) for e in self.failures):
            return GridFullError(message)
        return UploadUnhappyError(message)

    def _fail_share(self, share: ShareUpload, error: NodeError) -> None:
        if share.error is None:
            share.error = error
            self.failures.append(error)
            share.cancel_scope.cancel()
            self.receivers[share.num].close()

    # -- share writers ---------------------------------------------------------------------------
    async def _body(self, share: ShareUpload) -> AsyncIterator[bytes]:
        share.started_body = True
        async for item in self.receivers[share.num]:
            if isinstance(item, _Trailer):
                leaf_file = self.leaf_files[share.num]
                leaf_file.seek(0)
                while piece := leaf_file.read(256 * 1024):
                    yield piece
                yield item.tail
                return
            yield item  # type: ignore[misc]

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
                        self._fail_share(share, exc)
                        return
                    # Failed before sending a byte (e.g. unreachable): try a spare node.
                    self.failures.append(exc)
                    share.node = self._next_node(share)
                    if share.node is not None:
                        share.tried.append(share.node.node_id)
            self._fail_share(share, NodeError("placement", f"no spare node for share {share.num}"))

    # -- producer --------------------------------------------------------------------------------
    async def _dispatch(self, blocks: list[bytes]) -> None:
        for share in self.shares:
            if share.error is not None:
                continue
            with trio.move_on_after(self.grid.stall_timeout) as scope:
                # A closed channel means the writer failed meanwhile; _fail_share recorded why.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.senders[share.num].send(blocks[share.num])
            if scope.cancelled_caught:
                name = share.node.name if share.node else "?"
                self._fail_share(
                    share, NodeError(name, f"stalled: took no data for {self.grid.stall_timeout:g} s")
                )

    async def _produce(self, source: ByteSource, first: bytes) -> int:
        offset = 0
        plaintext = first
        while plaintext:
            blocks, hashes = await trio.to_thread.run_sync(
                encode_segment, self.key, offset, plaintext, self.k, self.n
            )
            for j in range(self.n):
                self.leaf_files[j].write(hashes[j])
                self.hashers[j].add(hashes[j])
            self._check_still_happy()
            await self._dispatch(blocks)
            offset += len(plaintext)
            if self.progress:
                self.progress(offset)
            if len(plaintext) < SEGMENT_SIZE:
                break
            want = SEGMENT_SIZE if self.size is None else min(SEGMENT_SIZE, self.size - offset)
            plaintext = await read_exactly(source, want) if want else b""
            if self.size is not None and len(plaintext) < want:
                raise SourceChangedError("the file shrank while it was being uploaded; try again")
        if self.size is not None and (offset != self.size or await source.read(1)):
            raise SourceChangedError("the file grew while it was being uploaded; try again")
        roots = [h.finish() for h in self.hashers]
        ueb = UEB(self.k, self.n, SEGMENT_SIZE, offset, HASH_CHUNK_LEAVES, share_roots_hash(roots))
        for share in self.shares:
            if share.error is None:
                tail = build_trailer_tail(bytes(self.hashers[share.num].chunk_roots), roots, ueb, share.num)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.senders[share.num].send(_Trailer(tail))
            await self.senders[share.num].aclose()
        self._ueb = ueb
        return offset

    async def run(self, source: ByteSource, first: bytes) -> FileCap:
        self._assign_initial()
        self._check_still_happy()
        try:
            with ungrouped():
                await self._stream_all(source, first)
            holders = {s.node.node_id for s in self.shares if s.committed and s.node is not None}
            if len(holders) < self.happy:
                raise self._unhappy()
        except UploadUnhappyError:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._delete_committed()
            raise
        finally:
            for f in self.leaf_files:
                f.close()
        return FileCap(self.key, self._ueb.hash(), self.k, self.n, self._size)

    async def _stream_all(self, source: ByteSource, first: bytes) -> None:
        """Run the producer and the n share writers until every share committed or failed."""
        async with trio.open_nursery() as nursery:
            for share in self.shares:
                if share.node is not None:
                    nursery.start_soon(self._write_share, share)
                else:
                    self.senders[share.num].close()
            try:
                self._size = await self._produce(source, first)
            except BaseException:
                nursery.cancel_scope.cancel()
                raise

    async def _delete_committed(self) -> None:
        """Best effort: an upload that failed leaves no shares behind."""
        async with trio.open_nursery() as nursery:
            for share in self.shares:
                if share.committed and share.node is not None:
                    node, num = share.node, share.num

                    async def delete(node: NodeClient = node, num: int = num) -> None:
                        with contextlib.suppress(NodeError):
                            await node.delete_share(self.si, num, self.grid.delete_secret(self.si, node))

                    nursery.start_soon(delete)


def share_length(size: int, k: int, n: int) -> int:
    """Bytes in each share of a `size`-byte file uploaded with k-of-n (all shares are the same size)."""
    return ShareLayout(UEB(k, n, SEGMENT_SIZE, size, HASH_CHUNK_LEAVES, bytes(32))).total_length


class SourceChangedError(UsageError):
    """The file's size changed between the start of its upload and its end."""


async def upload(
    grid: GridClient,
    source: ByteSource,
    progress: Callable[[int], None] | None = None,
    size: int | None = None,
) -> FileCap | LiteralCap:
    """Upload everything `source` yields and return its read cap. Pass `size` when it is known (a
    regular file): shares then go with a Content-Length, and a file that changes size meanwhile raises
    SourceChangedError instead of uploading something else.

    Returns only when at least `happy` distinct nodes committed a share (or the data fit in a literal
    cap). Raises UploadUnhappyError (GridFullError when nodes are full) otherwise, after deleting any
    shares it did place. Memory: UPLOAD_WINDOW_SEGMENTS segments of blocks plus one segment being
    encoded, whatever the size of the source."""
    first = await read_exactly(source, SEGMENT_SIZE if size is None else min(size, SEGMENT_SIZE))
    if size is not None and len(first) < min(size, SEGMENT_SIZE):
        raise SourceChangedError("the file shrank while it was being uploaded; try again")
    if len(first) <= LITERAL_MAX and (size is None or size == len(first)):
        if progress:
            progress(len(first))
        return LiteralCap(first)
    return await _Upload(grid, progress, size).run(source, first)
