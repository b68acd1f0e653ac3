"""Verified plaintext segments of immutable files, shared by every open handle of the mount.

A bounded LRU (READ_CACHE_BYTES) of decrypted segments, at most SEGMENT_FETCHES fetches at once, one
FileReader per file (its verified trailers stay cached), de-duplicated in-flight fetches, and read-ahead:
a sequential read that reaches into segment i also starts fetching segments i+1..i+READ_AHEAD_SEGMENTS
in the background.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import trio

from tahoefs.formats.caps import FileCap
from tahoefs.grid.client import GridClient
from tahoefs.grid.download import FileReader

READ_CACHE_BYTES = 6 * 1024 * 1024  # 6 segments: room for the ones being read plus read-ahead
READ_AHEAD_SEGMENTS = 2
SEGMENT_FETCHES = 3  # segments being fetched at once (each holds ~2 MiB: k blocks and the plaintext)
READERS_KEPT = 64


class ReadCache:
    def __init__(self, grid: GridClient, nursery: trio.Nursery) -> None:
        self.grid = grid
        self.nursery = nursery
        self.segments: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.bytes = 0
        self.inflight: dict[tuple[str, int], trio.Event] = {}
        self.fetch_slots = trio.Semaphore(SEGMENT_FETCHES)
        self.readers: OrderedDict[str, tuple[FileReader, int]] = OrderedDict()
        self.problems: list[str] = []
        self.last_end: dict[str, int] = {}  # where the last read of each file ended (sequential?)

    async def _reader(self, cap: FileCap) -> tuple[FileReader, int]:
        key = str(cap)
        found = self.readers.get(key)
        if found is None:
            reader = FileReader(self.grid, cap)
            found = (reader, await reader.segment_size())
            self.readers[key] = found
            while len(self.readers) > READERS_KEPT:
                self.readers.popitem(last=False)
        self.readers.move_to_end(key)
        return found

    async def _segment(self, cap: FileCap, index: int) -> bytes:
        key = (str(cap), index)
        while True:
            data = self.segments.get(key)
            if data is not None:
                self.segments.move_to_end(key)
                return data
            event = self.inflight.get(key)
            if event is None:
                break
            await event.wait()
            if key not in self.segments:  # the fetch that we waited for failed: try ourselves
                break
        event = self.inflight[key] = trio.Event()
        try:
            reader, seg_size = await self._reader(cap)
            async with self.fetch_slots:
                data = await reader.read_segment(index, seg_size)
            for problem in reader.problems:
                if problem not in self.problems:
                    self.problems.append(problem)
            self._store(key, data)
            return data
        finally:
            del self.inflight[key]
            event.set()

    def _store(self, key: tuple[str, int], data: bytes) -> None:
        self.segments[key] = data
        self.bytes += len(data)
        while self.bytes > READ_CACHE_BYTES and len(self.segments) > 1:
            _k, old = self.segments.popitem(last=False)
            self.bytes -= len(old)

    async def _prefetch(self, cap: FileCap, index: int) -> None:
        # A failed read-ahead costs nothing: the real read fetches (and reports) again.
        with contextlib.suppress(Exception):
            await self._segment(cap, index)

    async def read(self, cap: FileCap, offset: int, size: int) -> bytes:
        """Verified bytes [offset, offset+size) of the file (fewer at its end)."""
        end = min(cap.size, offset + size)
        if offset >= end:
            return b""
        _reader, seg_size = await self._reader(cap)
        first, last = offset // seg_size, (end - 1) // seg_size
        segments_total = -(-cap.size // seg_size)
        sequential = self.last_end.get(str(cap)) == offset
        self.last_end[str(cap)] = end
        while len(self.last_end) > READERS_KEPT:
            self.last_end.pop(next(iter(self.last_end)))
        for ahead in range(
            last + 1, min(segments_total, last + 1 + READ_AHEAD_SEGMENTS) if sequential else 0
        ):
            key = (str(cap), ahead)
            if key not in self.segments and key not in self.inflight:
                self.nursery.start_soon(self._prefetch, cap, ahead)
        parts = []
        for index in range(first, last + 1):
            data = await self._segment(cap, index)
            start = index * seg_size
            parts.append(data[max(offset, start) - start : end - start])
        return b"".join(parts)

    def drop(self, cap: str) -> None:
        for key in [k for k in self.segments if k[0] == cap]:
            self.bytes -= len(self.segments.pop(key))
        self.readers.pop(cap, None)
