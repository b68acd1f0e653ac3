"""Nodes that lie, with real node processes: the lie is made on the node's disk, and the node serves it
as if it were true (a lying node needs no other powers than these).

Each test checks the same promise (design brief, "Promises"): the bytes a user gets are exact, or the
command fails with exit 1 and one line on stderr, never a traceback and never someone else's bytes; and
the nodes that lied are named in the warnings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tahoefs.formats.caps import DirWriteCap, FileCap, parse_cap
from tahoefs.formats.hashing import b32encode
from tahoefs.formats.share import FOOTER_SIZE, pack_footer
from tahoefs.limits import SEGMENT_SIZE
from tests.localgrid import LocalGrid, StoredShare

SIZE = SEGMENT_SIZE + 5000  # two segments: block reads are ranged requests, not the whole share


def storage_index(cap: str) -> str:
    parsed = parse_cap(cap)
    assert isinstance(parsed, FileCap | DirWriteCap)
    return b32encode(parsed.storage_index)


def shares_by_num(grid: LocalGrid, cap: str) -> dict[int, tuple[int, StoredShare]]:
    """share number -> (node index, stored share) of an immutable file."""
    found = {}
    for node, shares in grid.share_files(storage_index(cap)).items():
        for share in shares:
            found[share.num] = (node, share)
    return found


def named_nodes(grid: LocalGrid, stderr: str) -> set[int]:
    """Indexes of the nodes the warnings name ("node URL: reason") for anything but being slow (a
    reader also names an honest node that answered late, and a busy test machine makes some late)."""
    urls = {node.url: i for i, node in enumerate(grid.config().nodes)}
    lines = [line for line in stderr.splitlines() if "slow or stalled" not in line]
    return {urls[url] for url in re.findall(r"node (http://[^ ]+?): ", "\n".join(lines)) if url in urls}


def assert_clean(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text and "internal error" not in text, text
    return text


def assert_fails_cleanly(proc) -> str:
    text = assert_clean(proc.stderr)
    assert proc.returncode == 1, text
    assert len(text.strip().splitlines()) == 1, text
    return text


def get_exact(grid: LocalGrid, cap: str, data: bytes) -> str:
    proc = grid.run("get", cap)
    text = assert_clean(proc.stderr)
    assert proc.returncode == 0, text
    assert proc.stdout == data
    return text


# --- immutable shares ----------------------------------------------------------------------------------


def test_a_node_serving_another_files_valid_shares_is_caught_and_named(grid: LocalGrid) -> None:
    """Nodes replace shares of file A with the shares of the same number of file B. Both files have the
    same size, so every share has the right length and a well-formed trailer: only the UEB hash in A's
    cap tells them apart."""
    a, b = os.urandom(SIZE), os.urandom(SIZE)
    cap_a, cap_b = grid.put_bytes(a), grid.put_bytes(b)
    a_shares, b_shares = shares_by_num(grid, cap_a), shares_by_num(grid, cap_b)
    assert len(a_shares) == len(b_shares) == 10

    def swap(nums: list[int]) -> set[int]:
        for num in nums:
            a_shares[num][1].write(b_shares[num][1].read())
        return {a_shares[num][0] for num in nums}

    liars = swap([0, 1, 2, 5])  # the primaries, which a reader tries first, and one more
    stderr = get_exact(grid, cap_a, a)
    named = named_nodes(grid, stderr)
    assert {a_shares[n][0] for n in (0, 1, 2)} <= named <= liars, stderr
    assert "UEB does not match the capability" in stderr
    assert grid.get_bytes(cap_b) == b  # B itself is untouched

    # Eight of ten: two good shares are not enough. One line, exit 1, and not a byte of B.
    swap([3, 4, 6, 7])
    proc = grid.run("get", cap_a)
    line = assert_fails_cleanly(proc)
    assert "need 3 good shares" in line
    assert proc.stdout == b"" and b[:4096] not in proc.stdout


def test_truncated_shares_are_caught_wherever_they_are_cut(grid: LocalGrid) -> None:
    """Seven of ten shares cut short: to nothing, to one byte, inside the first block, in the middle,
    inside the leaves, inside the UEB and inside the footer. The three intact shares are exactly k: the
    file still reads back exactly. (A share file cut inside the node's own header: test_node.)"""
    for size in (SIZE, 5000):  # a ranged-read file (share files), and one whose shares are database rows
        data = os.urandom(size)
        cap = grid.put_bytes(data)
        shares = shares_by_num(grid, cap)
        length = shares[0][1].size()  # shares of one file have one length
        cuts = {
            0: 0,
            1: 1,
            2: 10,
            3: length // 2,
            4: length - 81 - 32 * 11,  # inside the trailer's hashes
            6: length - FOOTER_SIZE - 20,  # inside the UEB
            8: length - 5,  # inside the footer
        }
        for num, cut in cuts.items():
            shares[num][1].cut(cut)
        stderr = get_exact(grid, cap, data)
        cut_nodes = {shares[num][0] for num in cuts}
        assert named_nodes(grid, stderr) <= cut_nodes, stderr
        assert {shares[num][0] for num in (0, 1, 2)} <= named_nodes(grid, stderr), stderr

        # One more cut leaves two: a clean failure.
        shares[5][1].cut(length - 1)
        proc = grid.run("get", cap)
        assert "need 3 good shares" in assert_fails_cleanly(proc)
        assert proc.stdout == b""


def test_a_share_filed_under_another_number_is_caught(grid: LocalGrid) -> None:
    """Share 1 of a file served as share 2 (as is, footer and all); as share 0 with its footer rewritten
    to say 0 (the footer is the one part of a share no hash covers); and as share 4 spliced: share 1's
    blocks in front of share 4's own, genuine trailer."""
    data = os.urandom(SIZE)
    cap = grid.put_bytes(data)
    shares = shares_by_num(grid, cap)
    one = shares[1][1].read()
    shares[2][1].write(one)
    shares[0][1].write(one[:-FOOTER_SIZE] + pack_footer(0))
    four = shares[4][1].read()
    trailer_length = 32 * (2 + 1 + 10) + 81  # 2 segments, 1 hash chunk, 10 shares, UEB and footer
    assert len(four) == len(one)
    shares[4][1].write(one[: len(one) - trailer_length] + four[len(four) - trailer_length :])
    liars = {shares[n][0] for n in (0, 2, 4)}
    stderr = get_exact(grid, cap, data)
    assert {shares[n][0] for n in (0, 2)} <= named_nodes(grid, stderr) <= liars, stderr

    # The spliced share passes the trailer checks (its trailer is genuine) and is caught at a block
    # (whichever segment is fetched first): with only shares 1, 3 and the spliced 4 left, the reader
    # must try it.
    for num in (0, 2, 5, 6, 7, 8, 9):
        shares[num][1].delete()
    proc = grid.run("get", cap)
    line = assert_fails_cleanly(proc)
    assert "need 3 good shares" in line and re.search(r"block [01] of share 4 is corrupt", line), line
    assert proc.stdout == b""


# --- directories -------------------------------------------------------------------------------------


def slot_files(grid: LocalGrid, si: str) -> dict[int, Path]:
    """node index -> its slot file of the mutable object `si` (one slot per node)."""
    found = {}
    for i in range(10):
        folder = grid.node_dir(i) / "mutable" / si[:2] / si
        files = sorted(folder.iterdir()) if folder.exists() else []
        assert len(files) <= 1
        if files:
            found[i] = files[0]
    return found


def make_tree(grid: LocalGrid, alias: str) -> tuple[str, dict[int, bytes]]:
    """A root with `a`, then `b` added: returns the root's storage index and each node's slot file
    as it was when the root held only `a`."""
    root = grid.run("mkfs", "--alias", alias, check=True).stdout.decode().strip()
    si = storage_index(root)
    grid.run("mkdir", f"{alias}:a", check=True)
    before = {i: path.read_bytes() for i, path in slot_files(grid, si).items()}
    assert len(before) == 10
    grid.run("mkdir", f"{alias}:b", check=True)
    return si, before


def roll_back(
    grid: LocalGrid, si: str, old: dict[int, bytes], nodes: list[int], claim: int | None = None
) -> None:
    """Put the old slot files back on `nodes`, each stopped meanwhile; with `claim`, the node also
    claims that seqnum for the old version (the seqnum in its own slot header, which it reports in
    listings and is not signed)."""
    grid.stop(*nodes)
    try:
        for i in nodes:
            content = bytearray(old[i])
            if claim is not None:
                content[44:52] = claim.to_bytes(8, "big")
            slot_files(grid, si)[i].write_bytes(bytes(content))
    finally:
        grid.start(*nodes)


def ls(grid: LocalGrid, alias: str) -> tuple[list[str], str]:
    proc = grid.run("ls", f"{alias}:")
    stderr = assert_clean(proc.stderr)
    assert proc.returncode == 0, stderr
    return proc.stdout.decode().split(), stderr


def test_two_nodes_serving_an_older_directory_version_cannot_roll_it_back(grid: LocalGrid) -> None:
    si, old = make_tree(grid, "rollback2")
    stale = [3, 8]
    roll_back(grid, si, old, stale)
    names, stderr = ls(grid, "rollback2")
    assert names == ["a/", "b/"]
    assert named_nodes(grid, stderr) == set(stale), stderr
    assert stderr.count("serves an older version") == 2

    # The next change overwrites the stale slots: afterwards nobody is stale.
    grid.run("mkdir", "rollback2:c", check=True)
    names, stderr = ls(grid, "rollback2")
    assert names == ["a/", "b/", "c/"] and stderr == "", stderr


def test_the_newest_version_wins_while_k_nodes_still_hold_it(grid: LocalGrid) -> None:
    """Seven of ten nodes serve the older version: the newest is on exactly k = 3 nodes, and a reader
    takes the highest version it can recover (formats.md §16.2)."""
    si, old = make_tree(grid, "rollback7")
    stale = [0, 1, 2, 4, 5, 7, 9]
    roll_back(grid, si, old, stale)
    names, stderr = ls(grid, "rollback7")
    assert names == ["a/", "b/"]
    assert named_nodes(grid, stderr) == set(stale), stderr


def test_below_k_holders_the_reader_serves_the_newest_version_it_can_verify(grid: LocalGrid) -> None:
    """The documented limit (formats.md §16.2: "rollback needs fewer than k shares of the newest
    version to be reachable"): with the newest version on two nodes only, it cannot be decoded, and the
    reader shows the older, still genuine, version. Whatever it shows is a signed version of this
    directory, never garbage."""
    si, old = make_tree(grid, "rollback8")
    roll_back(grid, si, old, [0, 1, 2, 3, 4, 5, 6, 7])
    names, _stderr = ls(grid, "rollback8")
    assert names == ["a/"]


def test_nodes_claiming_a_higher_seqnum_for_an_older_version_cannot_roll_it_back(grid: LocalGrid) -> None:
    """Two nodes serve the older version but claim seqnum 99 for it in their listings. The reader reads
    them first, finds a version of seqnum 2 on two nodes (fewer than k), and goes on to the real
    newest."""
    si, old = make_tree(grid, "liar99")
    liars = [2, 6]
    roll_back(grid, si, old, liars, claim=99)
    names, _stderr = ls(grid, "liar99")
    assert names == ["a/", "b/"]


def test_nodes_claiming_a_higher_seqnum_than_they_serve_are_named(grid: LocalGrid) -> None:
    """formats.md §16.2: "a node that claims a higher seqnum than it holds costs one extra read and is
    named" (not so before 77c7a4c in grid/mutable.py)."""
    si, old = make_tree(grid, "liar99named")
    liars = [1, 5]
    roll_back(grid, si, old, liars, claim=99)
    names, stderr = ls(grid, "liar99named")
    assert names == ["a/", "b/"]
    assert named_nodes(grid, stderr) == set(liars), stderr
    assert stderr.count("claims seqnum 99") == 2, stderr


def test_slots_of_another_directory_or_another_share_number_are_caught(grid: LocalGrid) -> None:
    """Three nodes serve, in this directory's slots, the current slots of another directory (validly
    signed, by another key), and claim this directory's current seqnum for them so that a reader must
    fetch them; a fourth serves another node's slot (this directory's, another share number). The
    listing is exact and the four are named."""
    si, _old = make_tree(grid, "foreign")
    other_root = grid.run("mkfs", "--alias", "foreign-other", check=True).stdout.decode().strip()
    grid.run("mkdir", "foreign-other:zzz", check=True)
    mine, theirs = slot_files(grid, si), slot_files(grid, storage_index(other_root))
    liars = [0, 1, 2, 3]
    grid.stop(*liars)
    try:
        current = mine[4].read_bytes()[44:52]  # the seqnum in the slot header (see roll_back)
        for i in liars[:3]:
            foreign = bytearray(theirs[i].read_bytes())
            foreign[44:52] = current
            mine[i].write_bytes(bytes(foreign))
        mine[3].write_bytes(mine[4].read_bytes())
    finally:
        grid.start(*liars)
    names, stderr = ls(grid, "foreign")
    assert names == ["a/", "b/"]
    assert named_nodes(grid, stderr) == set(liars), stderr
    assert stderr.count("signed by a key the capability does not name") == 3
    assert "share says it is number" in stderr
