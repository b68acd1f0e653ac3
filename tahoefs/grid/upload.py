"""Upload: stream a file segment by segment into n shares on n distinct nodes.

    source --read 1 segment--> [worker thread: AES-CTR, zfec, SHA-256] --block j--> channel j --> PUT share j

The share channels and PUTs live in grid/streams.py (ShareStreams): each share has a memory channel of
UPLOAD_WINDOW_SEGMENTS blocks, drained by one streaming HTTP PUT, so at most that many segments are in
flight whatever the file size, and block hashes wait in a spooled temp file per share until the trailer.
This module encrypts and encodes, and judges happiness: the upload goes on while `happy` distinct nodes
can still be reached, and fails with the reason of every node that did not take a share otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from tahoefs.errors import GridFullError, NodeFullError, UploadUnhappyError, UsageError, ungrouped
from tahoefs.formats.caps import FileCap, LiteralCap
from tahoefs.formats.codec import encode_segment
from tahoefs.formats.hashing import storage_index_for_key
from tahoefs.formats.share import UEB, ShareLayout, build_trailer_tail, share_roots_hash
from tahoefs.grid.client import GridClient
from tahoefs.grid.cpu import crunch
from tahoefs.grid.streams import Lingering, ShareStreams
from tahoefs.limits import ENCODE_AHEAD_SEGMENTS, HASH_CHUNK_LEAVES, LITERAL_MAX, SEGMENT_SIZE


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


class _Encoding:
    """One segment on its way through a worker thread: its blocks and their hashes once `done`."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.done = trio.Event()
        self.result: tuple[list[bytes], list[bytes]] = ([], [])


class _Upload:
    def __init__(
        self,
        grid: GridClient,
        progress: Callable[[int], None] | None,
        size: int | None = None,
        lingering: Lingering | None = None,
    ) -> None:
        self.grid = grid
        self.lingering = lingering
        self.size = size
        self.k, self.n, self.happy = grid.needed, grid.total, grid.happy
        self.key = os.urandom(32)
        self.si = storage_index_for_key(self.key)
        self.progress = progress
        self.streams = ShareStreams(
            grid,
            self.si,
            range(self.n),
            grid.permuted_nodes(self.si),
            None if size is None else share_length(size, self.k, self.n),
        )

    def _check_still_happy(self) -> None:
        if len({s.node.node_id for s in self.streams.live()}) < self.happy:  # type: ignore[union-attr]
            raise self._unhappy()

    def _unhappy(self) -> UploadUnhappyError:
        holders = self.streams.holders()
        failures = self.streams.failures
        reasons = "; ".join(f"{e.node}: {e.reason}" for e in failures) or "not enough nodes in the grid"
        message = (
            f"upload failed: {len(holders)} of the {self.happy} nodes needed hold a share "
            f"(grid has {len(self.grid.nodes)} nodes; {reasons})"
        )
        if failures and all(isinstance(e, NodeFullError) for e in failures):
            return GridFullError(message)
        return UploadUnhappyError(message)

    async def _produce(self, source: ByteSource, first: bytes) -> UEB:
        """Encode segments in worker threads, ENCODE_AHEAD_SEGMENTS of them at once (AES, zfec and
        SHA-256 release the GIL, so both cores work), and hand them to the share streams in order."""
        offset = 0
        send, receive = trio.open_memory_channel[_Encoding](ENCODE_AHEAD_SEGMENTS - 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._encode_ahead, source, first, send, nursery)
            async with receive:
                async for encoding in receive:
                    await encoding.done.wait()
                    self._check_still_happy()
                    blocks, hashes = encoding.result
                    encoding.result = ([], [])
                    await self.streams.send(dict(enumerate(blocks)), dict(enumerate(hashes)))
                    offset += encoding.length
                    if self.progress:
                        self.progress(offset)
        hashers = self.streams.hashers
        roots = [hashers[j].finish() for j in range(self.n)]
        ueb = UEB(self.k, self.n, SEGMENT_SIZE, offset, HASH_CHUNK_LEAVES, share_roots_hash(roots))
        await self.streams.finish(
            {j: build_trailer_tail(bytes(hashers[j].chunk_roots), roots, ueb, j) for j in range(self.n)}
        )
        return ueb

    async def _encode_ahead(
        self,
        source: ByteSource,
        first: bytes,
        send: trio.MemorySendChannel[_Encoding],
        nursery: trio.Nursery,
    ) -> None:
        """Read the source a segment at a time and start encoding each in a thread; queue them in
        order. The channel bounds how many are encoded ahead of the streams."""
        async with send:
            offset = 0
            plaintext = first
            while plaintext:
                encoding = _Encoding(len(plaintext))
                nursery.start_soon(self._encode, encoding, offset, plaintext)
                await send.send(encoding)
                offset += len(plaintext)
                if len(plaintext) < SEGMENT_SIZE:
                    break
                want = SEGMENT_SIZE if self.size is None else min(SEGMENT_SIZE, self.size - offset)
                plaintext = await read_exactly(source, want) if want else b""
                if self.size is not None and len(plaintext) < want:
                    raise SourceChangedError("the file shrank while it was being uploaded; try again")
            if self.size is not None and (offset != self.size or await source.read(1)):
                raise SourceChangedError("the file grew while it was being uploaded; try again")

    async def _encode(self, encoding: _Encoding, offset: int, plaintext: bytes) -> None:
        encoding.result = await crunch(
            len(plaintext), encode_segment, self.key, offset, plaintext, self.k, self.n
        )
        encoding.done.set()

    async def run(self, source: ByteSource, first: bytes) -> FileCap:
        try:
            with ungrouped():
                ueb = await self.streams.run(lambda: self._produce(source, first), self.lingering)
            if len(self.streams.holders()) < self.happy:
                raise self._unhappy()
        except UploadUnhappyError:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.streams.delete_committed()
            raise
        return FileCap(self.key, ueb.hash(), self.k, self.n, ueb.file_size)


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
    lingering: Lingering | None = None,
) -> FileCap | LiteralCap:
    """Upload everything `source` yields and return its read cap. Pass `size` when it is known (a
    regular file): shares then go with a Content-Length, and a file that changes size meanwhile raises
    SourceChangedError instead of uploading something else.

    Returns only when at least `happy` distinct nodes committed a share (or the data fit in a literal
    cap). Without `lingering` it also waits for every other share's PUT to end; with it (and a known
    size), the PUTs still running then finish in its nursery (ShareStreams.run). Raises
    UploadUnhappyError (GridFullError when nodes are full) otherwise, after deleting any shares it did
    place. Memory: UPLOAD_WINDOW_SEGMENTS segments of blocks plus one segment being
    encoded, whatever the size of the source."""
    first = await read_exactly(source, SEGMENT_SIZE if size is None else min(size, SEGMENT_SIZE))
    if size is not None and len(first) < min(size, SEGMENT_SIZE):
        raise SourceChangedError("the file shrank while it was being uploaded; try again")
    if len(first) <= LITERAL_MAX and (size is None or size == len(first)):
        if progress:
            progress(len(first))
        return LiteralCap(first)
    return await _Upload(grid, progress, size, lingering).run(source, first)
