from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.localgrid import LocalGrid, new_filesystem_mounted
from tests.test_node import Node, start_node, stop_node


@pytest.fixture(scope="module")
def module_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """A 10-node local grid shared by the tests of one module; stopped at the end, even on failure."""
    grid = LocalGrid(tmp_path_factory.mktemp("home"))
    try:
        grid.up(10)
        yield grid
    finally:
        grid.run("grid", "down")


@pytest.fixture
def grid(module_grid: LocalGrid) -> LocalGrid:
    """The module's grid with every node running at the start of the test."""
    module_grid.up()
    return module_grid


@pytest.fixture
def fresh_home(tmp_path: Path) -> Iterator[LocalGrid]:
    """A TAHOEFS_HOME of its own, for tests that build an odd grid; its nodes are stopped at the end."""
    grid = LocalGrid(tmp_path / "home")
    try:
        yield grid
    finally:
        grid.run("grid", "down")


@pytest.fixture
def mounted(grid: LocalGrid, tmp_path: Path) -> Iterator[tuple[LocalGrid, Path, str]]:
    """A fresh filesystem (its own root) mounted at tmp_path/mnt; unmounted at the end even when the
    test fails. Yields (grid, mountpoint, root write cap)."""
    mnt = tmp_path / "mnt"
    with new_filesystem_mounted(grid, mnt) as root:
        yield grid, mnt, root


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """One storage node process of its own, stopped at the end even on failure."""
    n = start_node(tmp_path / "node")
    try:
        yield n
    finally:
        stop_node(n)
