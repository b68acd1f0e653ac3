"""Health: how well an object survives on the grid, and (with verify) whether every stored byte is good.

    check   ask every node which shares of the object it holds (one small request per node)
    verify  also fetch every block of every share and check it against the verify cap (no key needed)

An immutable file is *healthy* when all n share numbers sit on n distinct nodes (a perfect matching of
shares to nodes, after Tahoe-LAFS's servers-of-happiness), *recoverable* when at least k distinct good
shares exist, and *lost* otherwise. A mutable object (a directory's root) is judged the same way on the
shares of its current version; a retrieve verifies those always, since they are small. Repair lives in
grid/repair.py; walking a tree in grid/checker.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from tahoefs.errors import IntegrityError, NodeError, NotEnoughSharesError, ungrouped
from tahoefs.formats.caps import DirReadCap, DirVerifyCap, DirWriteCap, VerifyCap
from tahoefs.formats.codec import block_hash
from tahoefs.formats.share import ShareLayout
from tahoefs.grid.client import GridClient
from tahoefs.grid.download import FileReader, ShareSource
from tahoefs.grid.mutable import MutableObject, Version
from tahoefs.limits import QUERY_BATCH, VERIFY_PARALLEL_SHARES, VERIFY_RANGE_BYTES
from tahoefs.storage.client import NodeClient, QueryUnsupportedError


@dataclass
class Corrupt:
    node: NodeClient
    num: int
    reason: str


@dataclass
class Health:
    """What a check found for one object. `holders` maps a share number to the nodes holding a good
    (or, without verify, an unverified) copy; corrupt copies are listed apart."""

    kind: str  # "file", "directory" or "bucket" (a file holding part of a directory's entries)
    verify_cap: str
    needed: int
    total: int
    holders: dict[int, list[NodeClient]] = field(default_factory=dict)
    corrupt: list[Corrupt] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verified: bool = False
    seqnum: int | None = None

    @property
    def shares_found(self) -> int:
        return len(self.holders)

    @property
    def nodes(self) -> int:
        return len({n.node_id for nodes in self.holders.values() for n in nodes})

    @property
    def happiness(self) -> int:
        return len(matching(self.holders))

    @property
    def healthy(self) -> bool:
        return self.happiness >= self.total

    @property
    def recoverable(self) -> bool:
        return self.shares_found >= self.needed

    @property
    def state(self) -> str:
        return "healthy" if self.healthy else "not healthy" if self.recoverable else "lost"

    def describe(self) -> str:
        """One line: state, then shares and nodes (e.g. 'not healthy: 6 of 10 shares on 6 nodes')."""
        what = f"{self.shares_found} of {self.total} shares on {self.nodes} nodes"
        if self.happiness < min(self.shares_found, self.nodes):
            what += f" ({self.happiness} on distinct nodes)"
        what += f", {self.needed} needed"
        if self.corrupt:
            what += f", {len(self.corrupt)} corrupt"
        return f"{self.state}: {what}"

    def as_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "verify_cap": self.verify_cap,
            "state": self.state,
            "healthy": self.healthy,
            "recoverable": self.recoverable,
            "needed": self.needed,
            "total": self.total,
            "shares_found": self.shares_found,
            "distinct_nodes": self.nodes,
            "happiness": self.happiness,
            "verified": self.verified,
            "seqnum": self.seqnum,
            "shares": {str(num): [n.name for n in nodes] for num, nodes in sorted(self.holders.items())},
            "corrupt": [{"node": c.node.name, "share": c.num, "reason": c.reason} for c in self.corrupt],
            "problems": self.problems,
        }


def matching(holders: dict[int, list[NodeClient]]) -> dict[int, str]:
    """A maximum matching of share numbers to distinct node ids (share -> node), by augmenting paths.
    Its size is the number of shares that sit on distinct nodes."""
    owner: dict[str, int] = {}  # node id -> share matched to it

    def augment(num: int, seen: set[str]) -> bool:
        for node in holders.get(num, []):
            nid = node.node_id
            if nid in seen:
                continue
            seen.add(nid)
            if nid not in owner or augment(owner[nid], seen):
                owner[nid] = num
                return True
        return False

    for num in sorted(holders):
        augment(num, set())
    return {num: nid for nid, num in owner.items()}


# -- immutable files ---------------------------------------------------------------------------------
@dataclass
class Located:
    """Where the shares of many files are: what one batch of questions to every node found."""

    held: dict[bytes, list[tuple[NodeClient, int]]]  # storage index -> (node, share number) pairs
    problems: list[str]  # nodes that did not answer: they count against every file asked about


async def locate_many(grid: GridClient, sis: list[bytes]) -> Located:
    """Ask every node which shares of each storage index in `sis` it holds, QUERY_BATCH indexes per
    request (a node without the batch query is asked index by index). Never raises for node trouble."""
    found = Located({si: [] for si in sis}, [])

    async def ask(node: NodeClient) -> None:
        try:
            with trio.fail_after(grid.stall_timeout * max(1, len(sis) // QUERY_BATCH)):
                for start in range(0, len(sis), QUERY_BATCH):
                    chunk = sis[start : start + QUERY_BATCH]
                    try:
                        answer = await node.query_shares(chunk)
                    except QueryUnsupportedError:
                        answer = {si: await node.list_shares(si) for si in chunk}
                    for si, nums in answer.items():
                        found.held[si] += [(node, num) for num in nums]
        except trio.TooSlowError:
            found.problems.append(f"node {node.name}: did not answer in time")
        except NodeError as exc:
            found.problems.append(f"node {node.name}: {exc.reason}")

    async with trio.open_nursery() as nursery:
        for node in grid.nodes:
            nursery.start_soon(ask, node)
    return found


async def check_file(
    grid: GridClient,
    cap: VerifyCap,
    verify: bool = False,
    limiter: trio.CapacityLimiter | None = None,
    kind: str = "file",
    located: Located | None = None,
) -> tuple[Health, FileReader]:
    """The health of an immutable file. With `verify`, every share is read whole and checked block by
    block (shares verified at once are bounded by `limiter`, each holding VERIFY_RANGE_BYTES at most).
    `located` (from locate_many for many files at once) saves asking every node about this one.
    Returns the health and the reader (its sources are every share found; repair reuses it). Never
    raises for node trouble: that is what the health reports."""
    reader = FileReader(grid, cap)
    health = Health(kind, str(cap), cap.needed, cap.total, verified=verify)
    located = located or await locate_many(grid, [cap.storage_index])
    held = located.held.get(cap.storage_index, [])
    reader.sources = [ShareSource(node, num) for node, num in held if num < reader.n]
    health.problems = list(located.problems)
    limiter = limiter or trio.CapacityLimiter(VERIFY_PARALLEL_SHARES)

    async def judge(src: ShareSource) -> None:
        if verify:
            async with limiter:
                try:
                    reason = await verify_share(reader, src)
                except NodeUnavailable as exc:
                    # Not proven bad, not proven good: it does not count, and nobody deletes it.
                    health.problems.append(f"node {src.node.name}: share {src.num} not verified: {exc}")
                    return
            if reason is not None:
                health.corrupt.append(Corrupt(src.node, src.num, reason))
                return
        health.holders.setdefault(src.num, []).append(src.node)

    async with trio.open_nursery() as nursery:
        for src in reader.sources:
            nursery.start_soon(judge, src)
    if verify:
        # Corrupt copies must never be read again by this reader (e.g. by the repairer).
        bad = {(id(c.node), c.num) for c in health.corrupt}
        reader.sources = [s for s in reader.sources if (id(s.node), s.num) not in bad]
    return health, reader


class NodeUnavailable(Exception):
    """A share could not be read to the end (the node failed or stalled): neither good nor corrupt."""


async def verify_share(reader: FileReader, src: ShareSource) -> str | None:
    """Read share `src` whole, VERIFY_RANGE_BYTES at a time, and check its trailer and every block
    against the cap. Returns None when every byte is good, else why not (the share is corrupt).
    Raises NodeUnavailable when the node failed or stalled before the share could be judged."""
    node = src.node
    try:
        with ungrouped(), trio.fail_after(reader.grid.stall_timeout):
            trailer = await reader._trailer(src)
        layout = trailer.layout
        per_request = max(1, VERIFY_RANGE_BYTES // max(1, layout.full_block_size))
        segment = 0
        while segment < layout.num_segments:
            last = min(layout.num_segments, segment + per_request)
            start = layout.block_offset(segment)
            end = layout.block_offset(last - 1) + layout.block_size(last - 1)
            with trio.fail_after(reader.grid.stall_timeout):
                if src.whole is not None:
                    data = src.whole[start:end]
                else:
                    data = await node.read_range(reader.si, src.num, start, end - start)
                leaves = [await reader._leaf(src, s) for s in range(segment, last)]
            bad = await trio.to_thread.run_sync(_first_bad_block, layout, segment, data, leaves)
            if bad is not None:
                return f"block {bad} does not match its hash"
            segment = last
    except trio.TooSlowError:
        raise NodeUnavailable(f"stalled for more than {reader.grid.stall_timeout:g} s") from None
    except IntegrityError as exc:
        return exc.reason
    except NodeError as exc:
        raise NodeUnavailable(exc.reason) from None
    return None


def _first_bad_block(layout: ShareLayout, first: int, data: bytes, leaves: list[bytes]) -> int | None:
    view = memoryview(data)
    base = layout.block_offset(first)
    for i, leaf in enumerate(leaves):
        segment = first + i
        start = layout.block_offset(segment) - base
        if block_hash(view[start : start + layout.block_size(segment)]) != leaf:
            return segment
    return None


# -- mutable objects ---------------------------------------------------------------------------------
async def check_mutable(
    grid: GridClient, cap: DirWriteCap | DirReadCap | DirVerifyCap
) -> tuple[Health, Version | None]:
    """The health of a mutable object's current version (its shares are fetched and verified: they are
    small). Returns the version too (None when no version has k valid shares: lost)."""
    obj = MutableObject(grid, cap)
    try:
        version = await obj.retrieve()
    except NotEnoughSharesError:
        version = None
    return version_health(grid, cap, version, obj.problems), version


def version_health(
    grid: GridClient,
    cap: DirWriteCap | DirReadCap | DirVerifyCap,
    version: Version | None,
    problems: list[str],
) -> Health:
    """The health of a mutable object given what a retrieve found (`version` None: nothing readable)."""
    verify = cap if isinstance(cap, DirVerifyCap) else cap.verify_cap()
    health = Health("directory", str(verify), grid.needed, grid.total, verified=True)
    health.problems = list(problems)
    if version is not None:
        nodes = {n.node_id: n for n in grid.nodes}
        for nid, nums in version.placement.items():
            for num in nums:
                health.holders.setdefault(num, []).append(nodes[nid])
        health.seqnum = version.seqnum
    return health
