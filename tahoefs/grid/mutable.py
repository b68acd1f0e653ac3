"""Mutable objects on the grid: retrieve the current version, publish a new one with test-and-set.

Retrieve asks every node which slots of the storage index it holds and at which seqnum, then fetches and
verifies the shares of the highest claimed seqnum first. It returns the highest version with at least k
valid shares (ties between different versions of one seqnum go to the one on more nodes), and names
nodes that served stale versions or shares that failed verification.

Publish writes seqnum s+1 to every slot with the test "you hold what I read" (the seqnum each node
reported). It succeeds when a quorum of distinct nodes, max(happy, n//2 + 1), accepted: two writers can
never both reach a quorum with the same seqnum. A node whose slot turned out newer than what was read
means another writer got in first: publish raises ConflictError, and the caller re-reads and re-applies
its change (see Directory.modify).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import trio

from tahoefs.errors import (
    GridError,
    IntegrityError,
    NodeError,
    NotEnoughSharesError,
    UploadUnhappyError,
    ungrouped,
)
from tahoefs.formats.caps import DirReadCap, DirVerifyCap, DirWriteCap
from tahoefs.formats.mutable import MutableShare, decode_version, encode_version, parse_share, write_enabler
from tahoefs.grid.client import GridClient
from tahoefs.grid.cpu import crunch
from tahoefs.storage.client import NodeClient, TestFailedError

MAX_SLOT_READ = 2 * 1024 * 1024


class ConflictError(GridError):
    """Another writer published a newer version first; re-read and re-apply."""


@dataclass
class Version:
    """The version a retrieve found: its seqnum and plaintext, plus what each node said it holds."""

    seqnum: int
    plaintext: bytes
    root: bytes = b""
    # node id -> {share number: seqnum the node claims}
    claims: dict[str, dict[int, int]] = field(default_factory=dict)
    # node id -> share numbers of exactly this version that passed verification (from retrieve only)
    placement: dict[str, set[int]] = field(default_factory=dict)


class MutableObject:
    def __init__(self, grid: GridClient, cap: DirWriteCap | DirReadCap | DirVerifyCap) -> None:
        self.grid = grid
        self.cap = cap
        self.write_cap = cap if isinstance(cap, DirWriteCap) else None
        self.read_cap = cap.read_cap() if not isinstance(cap, DirVerifyCap) else None
        verify = cap.verify_cap() if not isinstance(cap, DirVerifyCap) else cap
        self.si = verify.storage_index
        self.vk_hash = verify.vk_hash
        self.problems: list[str] = []

    def _problem(self, node: NodeClient, reason: str) -> None:
        line = f"node {node.name}: {reason}"
        if line not in self.problems:
            self.problems.append(line)

    async def _claims(self) -> tuple[dict[str, dict[int, int]], dict[str, NodeClient]]:
        claims: dict[str, dict[int, int]] = {}
        nodes = {n.node_id: n for n in self.grid.nodes}
        async with trio.open_nursery() as nursery:
            for node in self.grid.nodes:

                async def ask(node: NodeClient = node) -> None:
                    try:
                        with trio.fail_after(self.grid.stall_timeout):
                            slots = await node.list_slots(self.si)
                        claims[node.node_id] = {num: info.seqnum for num, info in slots.items()}
                    except trio.TooSlowError:
                        self._problem(node, "did not answer in time")
                    except NodeError as exc:
                        self._problem(node, exc.reason)

                nursery.start_soon(ask)
        return claims, nodes

    async def _fetch(self, node: NodeClient, num: int) -> MutableShare | None:
        try:
            with trio.fail_after(self.grid.stall_timeout):
                data, _seq = await node.read_slot(self.si, num, MAX_SLOT_READ)
            return await crunch(len(data), parse_share, data, self.si, self.vk_hash, num)
        except trio.TooSlowError:
            self._problem(node, "stalled")
        except IntegrityError as exc:
            self._problem(node, f"share {num} failed verification: {exc.reason}")
        except NodeError as exc:
            self._problem(node, exc.reason)
        return None

    async def retrieve(self) -> Version:
        """The current version. Raises NotEnoughSharesError when no version has k valid shares."""
        with ungrouped():
            return await self._retrieve()

    async def _retrieve(self) -> Version:
        claims, nodes = await self._claims()
        claimed = sorted({seq for held in claims.values() for seq in held.values()}, reverse=True)
        groups: dict[tuple[int, bytes], dict[int, MutableShare]] = defaultdict(dict)
        holders: dict[tuple[int, bytes], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        for seq in claimed:
            # Every share claiming this seqnum, not just k: two writers that raced may have left two
            # different versions with one seqnum, and the one on more nodes must win (see publish).
            wanted = [(nid, num) for nid, held in claims.items() for num, s in held.items() if s == seq]
            async with trio.open_nursery() as nursery:
                for nid, num in wanted:

                    async def one(nid: str = nid, num: int = num, claimed: int = seq) -> None:
                        share = await self._fetch(nodes[nid], num)
                        if share is not None and share.seqnum != claimed:
                            self._problem(
                                nodes[nid], f"claims seqnum {claimed} for share {num}, serves {share.seqnum}"
                            )
                        if share is not None:
                            groups[share.version_id][share.num] = share
                            holders[share.version_id][nid].add(num)

                    nursery.start_soon(one)
            best = self._best(groups, holders)
            if best is not None and best[0] >= seq:
                return await self._decode(best, groups, holders, claims, nodes)
        best = self._best(groups, holders)
        if best is not None:
            return await self._decode(best, groups, holders, claims, nodes)
        detail = "; ".join(self.problems[-5:])
        raise NotEnoughSharesError(
            f"cannot read directory: no version has {self.grid.needed} valid shares"
            + (f" ({detail})" if detail else "")
        )

    def _best(self, groups: dict, holders: dict) -> tuple[int, bytes] | None:
        ok = [vid for vid, shares in groups.items() if len(shares) >= next(iter(shares.values())).needed]
        if not ok:
            return None
        return max(ok, key=lambda vid: (vid[0], len(holders[vid]), vid[1]))

    async def _decode(
        self, vid: tuple[int, bytes], groups: dict, holders: dict, claims: dict, nodes: dict
    ) -> Version:
        for nid, held in claims.items():
            if nid not in holders[vid] and held and max(held.values()) < vid[0]:
                self._problem(nodes[nid], f"serves an older version (seqnum {max(held.values())} < {vid[0]})")
        shares = list(groups[vid].values())
        placement = {nid: set(nums) for nid, nums in holders[vid].items()}
        if self.read_cap is None:
            return Version(vid[0], b"", vid[1], claims, placement)
        plaintext = await crunch(shares[0].data_length, decode_version, self.read_cap.read_key, shares)
        return Version(vid[0], plaintext, vid[1], claims, placement)

    async def publish(self, plaintext: bytes, based_on: Version | None) -> Version:
        """Write a new version after `based_on` (None: the object is new). Returns the version now on
        the grid (with what each node holds, so the next publish can test against it).
        Raises ConflictError if another writer got in first, UploadUnhappyError if too few nodes took it."""
        if self.write_cap is None:
            raise GridError("this is a read-only capability; it cannot change the directory")
        with ungrouped():
            return await self._publish(plaintext, based_on)

    async def _publish(self, plaintext: bytes, based_on: Version | None) -> Version:
        cap = self.write_cap
        assert cap is not None
        k, n = self.grid.needed, self.grid.total
        quorum = min(n, max(self.grid.happy, n // 2 + 1))
        base_seq = based_on.seqnum if based_on else 0
        claims = based_on.claims if based_on else {}
        new_seq = base_seq + 1
        shares = await crunch(len(plaintext), encode_version, cap, new_seq, plaintext, k, n)
        ring = self.grid.permuted_nodes(self.si)
        accepted: set[str] = set()
        placed: dict[str, dict[int, int]] = {}
        conflict = False
        failures: list[str] = []

        async def write(node: NodeClient, num: int) -> bool:
            nonlocal conflict
            expected = claims.get(node.node_id, {}).get(num, 0)
            enabler = write_enabler(cap, node.node_id)
            for _attempt in range(3):
                try:
                    with trio.fail_after(self.grid.stall_timeout):
                        await node.write_slot(self.si, num, shares[num], enabler, expected, new_seq)
                    return True
                except TestFailedError as exc:
                    if exc.current_seqnum > base_seq:
                        conflict = True
                        return False
                    expected = exc.current_seqnum  # a stale or empty slot: overwrite it
                except trio.TooSlowError:
                    failures.append(f"{node.name}: stalled")
                    return False
                except NodeError as exc:
                    failures.append(f"{node.name}: {exc.reason}")
                    return False
            return False

        async def place(num: int, candidates: list[NodeClient]) -> None:
            for node in candidates:
                if node.node_id in accepted:
                    continue
                if await write(node, num):
                    accepted.add(node.node_id)
                    placed.setdefault(node.node_id, {})[num] = new_seq
                    return
                if conflict:
                    return

        # Share j goes to the j-th node of the ring; a node that fails hands its share to the spares.
        spares = ring[n:]
        async with trio.open_nursery() as nursery:
            for num in range(n):
                first = ring[num : num + 1] if num < len(ring) else []
                nursery.start_soon(place, num, first + spares)
        if conflict and len(accepted) < quorum:
            raise ConflictError("another writer changed the directory at the same time")
        if len(accepted) < quorum:
            raise UploadUnhappyError(
                f"directory update failed: {len(accepted)} of the {quorum} nodes needed took it"
                + (f" ({'; '.join(failures[:5])})" if failures else "")
            )
        claims_after = {nid: dict(held) for nid, held in claims.items()}
        for nid, held in placed.items():
            claims_after.setdefault(nid, {}).update(held)
        return Version(new_seq, plaintext, b"", claims_after)


async def delete_versions(grid: GridClient, cap: DirWriteCap) -> None:
    """Best effort: remove every slot of this object (used when a new directory could not be linked)."""
    obj = MutableObject(grid, cap)
    claims, nodes = await obj._claims()
    for nid, held in claims.items():
        for num in held:
            with contextlib.suppress(NodeError):
                await nodes[nid].delete_slot(obj.si, num, write_enabler(cap, nid))
