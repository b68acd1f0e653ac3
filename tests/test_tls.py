"""TLS with pinned certificates: real `tahoefs node --tls` processes on 127.0.0.1, the real CLI, and the
grid client's pools trusting exactly the pinned certificate (docs/protocol.md §2.1)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tahoefs.errors import NodeError
from tahoefs.grid.client import GridClient
from tahoefs.grid.config import load_grid, save_grid
from tahoefs.limits import SEGMENT_SIZE
from tahoefs.tls import CERT_FILE, KEY_FILE
from tests.localgrid import LocalGrid

WRONG = "sha256:" + "0" * 64
MISMATCH = "certificate does not match the pinned fingerprint"


@pytest.fixture(scope="module")
def tls_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """A 10-node local grid serving HTTPS, its certificates pinned in the grid file."""
    grid = LocalGrid(tmp_path_factory.mktemp("tlshome"))
    try:
        grid.run("grid", "up", "--tls", "--nodes", "10", check=True)
        yield grid
    finally:
        grid.run("grid", "down")


def _cert_fingerprint(node_dir: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert((node_dir / CERT_FILE).read_text())
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _grid_with(grid: LocalGrid, path: Path, **changes: object) -> list[str]:
    """Write a copy of the grid's file to `path`; `pins={i: fp}` replaces node i's fingerprint, `plain`
    turns every URL into http:// without fingerprints. Returns the node URLs as written."""
    config = grid.config()
    for i, pin in dict(changes.get("pins", {})).items():  # type: ignore[call-overload]
        config.nodes[i].fingerprint = pin
    if changes.get("plain"):
        for node in config.nodes:
            node.url = node.url.replace("https://", "http://")
            node.fingerprint = ""
    save_grid(config, path)
    return [n.url for n in config.nodes]


def _stderr_lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    return proc.stderr.decode().strip().splitlines()


def test_tls_grid_round_trip_with_pinned_fingerprints(tls_grid: LocalGrid) -> None:
    config = tls_grid.config()
    assert len(config.nodes) == 10
    for i, node in enumerate(config.nodes):
        node_dir = tls_grid.node_dir(i)
        assert node.url.startswith("https://127.0.0.1:")
        assert node.fingerprint == _cert_fingerprint(node_dir)
        assert stat.S_IMODE((node_dir / KEY_FILE).stat().st_mode) == 0o600
        assert f"fingerprint: {node.fingerprint}" in (node_dir / "node.log").read_text()
    data = os.urandom(2 * SEGMENT_SIZE + 4321)
    cap = tls_grid.put_bytes(data)
    proc = tls_grid.run("get", cap)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    assert proc.stderr == b""  # every node passed its pin check


def test_a_restarted_tls_node_keeps_its_certificate(tls_grid: LocalGrid) -> None:
    before = _cert_fingerprint(tls_grid.node_dir(4))
    cap = tls_grid.put_bytes(os.urandom(SEGMENT_SIZE + 9))
    tls_grid.stop(4)
    tls_grid.start(4)
    assert _cert_fingerprint(tls_grid.node_dir(4)) == before
    assert tls_grid.config().nodes[4].fingerprint == before
    # `grid up` again (without --tls) keeps the nodes on TLS and the same pins.
    tls_grid.run("grid", "up", check=True)
    assert [n.fingerprint for n in tls_grid.config().nodes][4] == before
    proc = tls_grid.run("get", cap)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr


def test_wrong_pin_on_three_nodes_routes_around_them_and_names_them(tls_grid: LocalGrid, tmp_path) -> None:
    data = os.urandom(3 * SEGMENT_SIZE + 17)
    cap = tls_grid.put_bytes(data)
    path = tmp_path / "grid.toml"
    bad = [1, 5, 8]
    urls = _grid_with(tls_grid, path, pins={i: WRONG for i in bad})
    proc = tls_grid.run("get", "--grid", str(path), cap)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    warnings = _stderr_lines(proc)
    for i in bad:
        assert any(urls[i] in line and MISMATCH in line for line in warnings), warnings
    named = {url for url in urls if any(url in line for line in warnings)}
    assert named == {urls[i] for i in bad}


def test_wrong_pin_on_eight_nodes_fails_with_one_line(tls_grid: LocalGrid, tmp_path) -> None:
    cap = tls_grid.put_bytes(os.urandom(SEGMENT_SIZE + 1))
    path = tmp_path / "grid.toml"
    _grid_with(tls_grid, path, pins={i: WRONG for i in range(8)})
    proc = tls_grid.run("get", "--grid", str(path), cap)
    assert proc.returncode == 1
    lines = _stderr_lines(proc)
    assert len(lines) == 1, lines
    assert lines[0].startswith("tahoefs get: ") and MISMATCH in lines[0]
    assert proc.stdout == b""
    # An upload through the same file cannot reach `happy` = 7 nodes either.
    proc = tls_grid.run("put", "--grid", str(path), "-", input=os.urandom(5000))
    assert proc.returncode == 1 and len(_stderr_lines(proc)) == 1, proc.stderr


def test_plain_http_client_against_tls_nodes_fails_cleanly(tls_grid: LocalGrid, tmp_path) -> None:
    cap = tls_grid.put_bytes(os.urandom(SEGMENT_SIZE + 2))
    path = tmp_path / "grid.toml"
    urls = _grid_with(tls_grid, path, plain=True)
    for args in (["get", "--grid", str(path), cap], ["put", "--grid", str(path), "-"]):
        proc = tls_grid.run(*args, input=os.urandom(5000), timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert len(_stderr_lines(proc)) == 1, proc.stderr
        assert b"use https://" in proc.stderr, proc.stderr
    # A raw plain request is answered by a closed connection at once, not a hang; the node lives on.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{urls[0]}/v1/version", timeout=5, trust_env=False)
    proc = tls_grid.run("get", cap)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr


def test_pinned_https_client_against_a_plain_node_is_routed_around(fresh_home: LocalGrid, tmp_path) -> None:
    fresh_home.up(4)
    config = fresh_home.config()
    config.nodes[0].url = config.nodes[0].url.replace("http://", "https://")
    config.nodes[0].fingerprint = WRONG
    path = tmp_path / "grid.toml"
    save_grid(config, path)
    cap = fresh_home.put_bytes(os.urandom(SEGMENT_SIZE + 3))
    proc = fresh_home.run("get", "--grid", str(path), cap)
    assert proc.returncode == 0, proc.stderr
    (line,) = _stderr_lines(proc)
    assert config.nodes[0].url in line and "TLS handshake failed" in line


@pytest.mark.parametrize(
    ("url_scheme", "pin", "words"),
    [
        ("https", "sha256:abc", "64 hex digits"),
        ("https", "md5:" + "0" * 32, "64 hex digits"),
        ("https", "sha256:" + "g" * 64, "64 hex digits"),
        ("http", WRONG, "plain http:// URL"),
    ],
)
def test_malformed_fingerprint_in_grid_file_is_one_line_exit_2(
    tls_grid: LocalGrid, tmp_path, url_scheme: str, pin: str, words: str
) -> None:
    path = tmp_path / "grid.toml"
    text = (tls_grid.home / "grid.toml").read_text()
    first = re.search(r'fingerprint = "(sha256:[0-9a-f]{64})"', text)
    assert first is not None
    text = text.replace(first.group(1), pin, 1)
    if url_scheme == "http":
        text = text.replace("https://", "http://", 1)
    path.write_text(text)
    cap = tls_grid.put_bytes(os.urandom(1000))
    for args in (["get", "--grid", str(path), cap], ["put", "--grid", str(path), "-"]):
        proc = tls_grid.run(*args, input=b"x" * 1000)
        assert proc.returncode == 2
        lines = _stderr_lines(proc)
        assert len(lines) == 1, lines
        assert "fingerprint" in lines[0] and words in lines[0] and str(path) in lines[0]


def test_fingerprints_are_case_insensitive_and_stored_lowercase(tls_grid: LocalGrid, tmp_path) -> None:
    path = tmp_path / "grid.toml"
    config = tls_grid.config()
    text = (tls_grid.home / "grid.toml").read_text()
    for node in config.nodes:
        text = text.replace(node.fingerprint, "sha256:" + node.fingerprint[7:].upper())
    path.write_text(text)
    assert [n.fingerprint for n in load_grid(path).nodes] == [n.fingerprint for n in config.nodes]


def test_grid_add_with_fingerprint(tls_grid: LocalGrid, tmp_path) -> None:
    node = tls_grid.config().nodes[2]
    path = tmp_path / "grid.toml"
    proc = tls_grid.run("grid", "add", "--grid", str(path), node.url, node.token, "--fingerprint", WRONG)
    assert proc.returncode == 2 and "does not match --fingerprint" in proc.stderr.decode(), proc.stderr
    assert not path.exists()
    proc = tls_grid.run("grid", "add", "--grid", str(path), node.url, node.token, "--fingerprint", "sha256:1")
    assert proc.returncode == 2 and len(_stderr_lines(proc)) == 1 and "64 hex digits" in proc.stderr.decode()
    # An https node without a pin is checked against the system's CAs: a self-signed node is refused.
    proc = tls_grid.run("grid", "add", "--grid", str(path), node.url, node.token)
    assert proc.returncode == 2 and "--fingerprint" in proc.stderr.decode(), proc.stderr
    plain = node.url.replace("https://", "http://")
    proc = tls_grid.run(
        "grid", "add", "--grid", str(path), plain, node.token, "--fingerprint", node.fingerprint
    )
    assert proc.returncode == 2 and "https://" in proc.stderr.decode(), proc.stderr
    proc = tls_grid.run(
        "grid",
        "add",
        "--grid",
        str(path),
        node.url,
        node.token,
        "--fingerprint",
        "sha256:" + node.fingerprint[7:].upper(),
    )
    assert proc.returncode == 0, proc.stderr
    (added,) = load_grid(path).nodes
    assert (added.url, added.token, added.id, added.fingerprint) == (
        node.url,
        node.token,
        node.id,
        node.fingerprint,
    )


def test_node_tls_prints_fingerprint_and_reuses_its_certificate(tmp_path) -> None:
    node_dir = tmp_path / "node"

    def start(*extra: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tahoefs", "node", "--dir", str(node_dir), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        lines: dict[str, str] = {}
        assert proc.stdout is not None
        while "node_id" not in lines:
            line = proc.stdout.readline().decode()
            assert line, proc.stderr.read() if proc.stderr else ""  # type: ignore[union-attr]
            key, _, value = line.strip().partition(": ")
            lines[key] = value
        if "--tls" in extra:
            line = proc.stdout.readline().decode()
            key, _, value = line.strip().partition(": ")
            lines[key] = value
        return proc, lines

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        proc.wait(timeout=10)

    proc, first = start("--tls")
    try:
        assert first["url"].startswith("https://127.0.0.1:")
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", first["fingerprint"])
        assert first["fingerprint"] == _cert_fingerprint(node_dir)
        assert stat.S_IMODE((node_dir / KEY_FILE).stat().st_mode) == 0o600
        assert (node_dir / "url").read_text().strip() == first["url"]
    finally:
        stop(proc)
    proc, second = start("--tls")
    stop(proc)
    assert second["fingerprint"] == first["fingerprint"]
    assert second["token"] == first["token"]
    proc, plain = start()
    try:
        assert plain["url"].startswith("http://") and "fingerprint" not in plain
        r = httpx.get(f"{plain['url']}/v1/version", headers={"authorization": f"Bearer {plain['token']}"})
        assert r.status_code == 200
    finally:
        stop(proc)


def test_the_pool_trusts_only_the_pinned_certificate_after_the_check(fresh_home: LocalGrid) -> None:
    """Once a pool has checked the pin, a node that comes back with another certificate (same address,
    same token) is refused on its next connection: the pool's context trusts the pinned one alone."""
    fresh_home.run("grid", "up", "--tls", "--nodes", "1", check=True)
    config = fresh_home.config()
    node_dir = fresh_home.node_dir(0)

    async def scenario() -> None:
        async with GridClient(config, fresh_home.client_secret()) as grid:
            (node,) = grid.nodes
            assert (await node.version())["api"] == 1
            await trio.to_thread.run_sync(fresh_home.stop, 0)
            (node_dir / CERT_FILE).unlink()
            (node_dir / KEY_FILE).unlink()
            await trio.to_thread.run_sync(fresh_home.start, 0)
            assert _cert_fingerprint(node_dir) != config.nodes[0].fingerprint
            with pytest.raises(NodeError, match=MISMATCH):
                await node.version()
        # A new client checks the pin afresh and refuses the node the same way.
        async with GridClient(config, fresh_home.client_secret()) as grid:
            with pytest.raises(NodeError, match=MISMATCH):
                await grid.nodes[0].version()

    trio.run(scenario)
    status = json.loads(fresh_home.run("grid", "status", "--json", check=True).stdout)
    assert status[0]["running"] is True  # the launcher trusts the node's new certificate from its folder
