"""`tahoefs put` and `tahoefs get`: stream a file to the grid and back."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import trio

from tahoefs.cli.progress import Progress
from tahoefs.errors import UsageError
from tahoefs.formats.caps import FileCap, LiteralCap, VerifyCap, parse_cap
from tahoefs.grid.client import GridClient
from tahoefs.grid.config import GridConfig
from tahoefs.grid.download import FileReader
from tahoefs.grid.upload import upload


def _open_source(path: str) -> tuple[object, int | None]:
    if path == "-":
        return sys.stdin.buffer, None
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{path} is a directory; put takes one file")
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except PermissionError:
        raise UsageError(f"permission denied: {path}") from None
    size = os.fstat(f.fileno()).st_size
    return f, size if p.is_file() else None


async def put(config: GridConfig, secret: bytes, path: str) -> str:
    """Upload `path` (or stdin for '-'); return the read cap as a string."""
    raw, size = _open_source(path)
    progress = Progress("put", size)
    try:
        async with GridClient(config, secret) as grid:
            cap = await upload(grid, trio.wrap_file(raw), progress.update, size)  # type: ignore[arg-type]
    finally:
        progress.finish()
        if raw is not sys.stdin.buffer:
            raw.close()  # type: ignore[attr-defined]
    return str(cap)


def _readable_cap(text: str) -> FileCap | LiteralCap:
    cap = parse_cap(text)
    if isinstance(cap, VerifyCap):
        raise UsageError("a verify cap can check a file but not read it; give the read cap")
    return cap


async def get(config: GridConfig, secret: bytes, src: str, output: str | None) -> list[str]:
    """Download `src` to `output` (stdout when None). Returns the problems seen with nodes.

    With an output file, bytes go to OUTPUT.part, renamed over OUTPUT only when every byte was read and
    verified; on failure the partial file is removed. An OUTPUT that exists and is not a regular file
    (/dev/null, a FIFO, a terminal) is written directly: renaming over it would replace the device."""
    cap = _readable_cap(src)
    part: Path | None = None
    if output is not None:
        target = Path(output)
        if target.is_dir():
            raise UsageError(f"{output} is a directory; -o takes a file name")
        special = target.exists() and not target.is_file()
        part = None if special else target.with_name(target.name + ".part")
        try:
            raw = open(part or target, "wb")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror}") from None
    else:
        raw = sys.stdout.buffer
    out = trio.wrap_file(raw)
    progress = Progress("get", cap.size)
    problems: list[str] = []
    ok = False
    try:
        if isinstance(cap, LiteralCap):
            await out.write(cap.data)
        else:
            async with GridClient(config, secret) as grid:
                reader = FileReader(grid, cap)
                done = 0

                async def sink(data: bytes) -> None:
                    nonlocal done
                    await out.write(data)
                    done += len(data)
                    progress.update(done)

                try:
                    await reader.copy_range(sink)
                finally:
                    problems = reader.problems
        await out.flush()
        ok = True
    finally:
        progress.finish()
        if output is not None:
            raw.close()
            if part is not None and ok:
                os.replace(part, target)
            elif part is not None:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
    return problems
