"""Where the grid layer's CPU work runs: in a worker thread, or on the event loop when it is small."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from tahoefs.limits import THREAD_MIN_BYTES

T = TypeVar("T")


async def crunch(size: int, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, CPU work (AES, zfec, SHA-256, Ed25519) over about `size` bytes. From THREAD_MIN_BYTES
    up it runs in a worker thread, so the other core works while the event loop goes on; below, it runs
    right here, because handing it to a thread and back (about 160 µs) costs more than the work (a
    6 KB segment encodes in about 45 µs) and would sit on the path of every small file's close()."""
    if size < THREAD_MIN_BYTES:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)
