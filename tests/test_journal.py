"""The namespace journal on its own (no grid): what a crashed mount leaves is read back exactly, the
root's own attributes included, and a torn last line is dropped."""

from __future__ import annotations

from pathlib import Path

import trio

from tahoefs.formats.dirformat import KIND_DIR, KIND_FILE, Entry
from tahoefs.fs.journal import OWN, Journal

DIR = "tahoefs:dir:v1:example"


def _journal(path: Path, applied: list[tuple[str, dict]]) -> Journal:
    async def apply(dir_cap: str, changes: dict) -> None:
        applied.append((dir_cap, changes))

    async def drop(caps: list[str]) -> None:
        pass

    return Journal(path, apply, drop)


def test_records_and_own_attributes_survive_a_crash_and_a_torn_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    first = _journal(path, [])
    entry = Entry(b"a.txt", KIND_FILE, 0o640, 1, 2, 5, 10, 11, inline=b"hello")
    own = Entry(b"", KIND_DIR, 0o700, 3, 4, 0, 12, 13, xattrs={b"user.k": b"v"})
    first.record(DIR, b"a.txt", entry)
    first.record_own(DIR, own)
    first.record(DIR, b"gone", None)
    assert first.overlay(DIR) == {b"a.txt": entry, b"gone": None}  # own attributes are no entry
    first.close()  # as if the mount died here: nothing was pushed
    with open(path, "ab") as f:
        f.write(b'{"dir": "tahoefs:dir:v1:example", "na')  # torn by the crash

    applied: list[tuple[str, dict]] = []
    second = _journal(path, applied)
    assert second.load() == 3
    assert second.count() == 3
    trio.run(second.flush_once)
    assert applied == [(DIR, {b"a.txt": entry, OWN: own, b"gone": None})]
    assert second.count() == 0 and path.stat().st_size == 0
    second.close()


def test_waiting_for_idle_cuts_the_batching_delay_short(tmp_path: Path, monkeypatch) -> None:
    """fsync of a directory waits in wait_idle: the flusher must push at once, not finish its batching
    delay first (it used to, so an fsync took up to FLUSH_DELAY for nothing). With the delay made an
    hour, wait_idle still returns (the 60 s deadline only stops a hang), with the change applied; and a
    second change during the wait is pushed too, without a new delay."""
    import tahoefs.fs.journal as journal_module

    monkeypatch.setattr(journal_module, "FLUSH_DELAY", 3600.0)
    applied: list[tuple[str, dict]] = []
    journal = _journal(tmp_path / "j.log", applied)
    entry = Entry(b"a", KIND_FILE, 0o644, inline=b"1")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(journal.run)
            journal.record(DIR, b"a", entry)
            await trio.sleep(0.05)  # the flusher is now in its batching delay
            with trio.fail_after(60):
                await journal.wait_idle()
            assert applied == [(DIR, {b"a": entry})]
            journal.record(DIR, b"b", None)
            with trio.fail_after(60):
                await journal.wait_idle()
            assert applied[-1] == (DIR, {b"b": None}) and journal.count() == 0
            nursery.cancel_scope.cancel()

    trio.run(main)
    journal.close()
