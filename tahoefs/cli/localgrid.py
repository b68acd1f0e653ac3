"""A grid of storage nodes on this machine, under $TAHOEFS_HOME/nodes/node-NN (for trying tahoefs out and
for tests): `tahoefs grid up/down/stop/start/status`.

Each node folder holds the node's own state (node.json, shares/, and with TLS its certificate and key)
plus what the launcher records: `port` (kept across restarts so the grid file stays true), `pid`,
`node.log`, and `tls` when the node serves HTTPS (`grid up --tls`; remembered from then on).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tahoefs.errors import GridError, UsageError
from tahoefs.grid.config import GridConfig, NodeConfig, load_grid, save_grid
from tahoefs.tls import CERT_FILE, fingerprint, pinned_context

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@dataclass
class LocalNode:
    index: int
    dir: Path

    @property
    def pid_file(self) -> Path:
        return self.dir / "pid"

    def pid(self) -> int | None:
        """The recorded PID if that process is alive and is this node; else None."""
        try:
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        if b"tahoefs" not in cmdline or str(self.dir).encode() not in cmdline:
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return None
        except (FileNotFoundError, IndexError):
            return None
        return pid

    def port(self) -> int:
        path = self.dir / "port"
        if path.exists():
            return int(path.read_text())
        port = _free_port()
        path.write_text(f"{port}\n")
        return port

    @property
    def tls(self) -> bool:
        return (self.dir / "tls").exists()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port()}"

    def certificate(self) -> bytes:
        """The DER certificate the node made at its first start with TLS (FileNotFoundError before)."""
        return ssl.PEM_cert_to_DER_cert((self.dir / CERT_FILE).read_text())

    def fingerprint(self) -> str:
        return fingerprint(self.certificate()) if self.tls else ""

    def http(self, plain: httpx.Client) -> httpx.Client:
        """A client for this node: `plain` for HTTP; with TLS a new one that trusts exactly the
        node's own certificate (the caller closes it)."""
        if not self.tls:
            return plain
        return httpx.Client(timeout=2.0, trust_env=False, verify=pinned_context(self.certificate()))

    def identity(self) -> tuple[str, str]:
        data = json.loads((self.dir / "node.json").read_text())
        return data["node_id"], data["token"]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so that no outgoing connection (which
    takes its local port from that range) can grab it before the node binds it."""
    low, _high = _ephemeral_range()
    top = max(low - 1, 20000)
    for _ in range(200):
        port = random.randint(max(1024, top - 12000), top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # fall back to any port the kernel offers
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodes_root(home: Path) -> Path:
    return home / "nodes"


def local_nodes(home: Path) -> list[LocalNode]:
    root = nodes_root(home)
    if not root.exists():
        return []
    found = []
    for path in sorted(root.glob("node-*")):
        suffix = path.name.removeprefix("node-")
        if suffix.isdigit():
            found.append(LocalNode(int(suffix), path))
    return found


def _start(node: LocalNode) -> None:
    node.dir.mkdir(parents=True, exist_ok=True)
    port = node.port()
    (node.dir / "url").unlink(missing_ok=True)
    with open(node.dir / "node.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tahoefs",
                "node",
                "--dir",
                str(node.dir),
                "--listen",
                f"127.0.0.1:{port}",
                *(["--tls"] if node.tls else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    node.pid_file.write_text(f"{proc.pid}\n")


def _wait_ready(nodes: list[LocalNode]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(timeout=2.0, trust_env=False) as plain:
        for node in nodes:
            while True:
                try:
                    _node_id, token = node.identity()
                    http = node.http(plain)
                    try:
                        r = http.get(f"{node.url}/v1/version", headers={"authorization": f"Bearer {token}"})
                    finally:
                        if http is not plain:
                            http.close()
                    if r.status_code == 200:
                        break
                except (FileNotFoundError, ValueError, KeyError, ssl.SSLError, httpx.HTTPError):
                    pass
                if node.pid() is None or time.monotonic() > deadline:
                    log = (node.dir / "node.log").read_text(errors="replace").strip().splitlines()[-3:]
                    raise GridError(f"node {node.index} did not start; its log ends: {' | '.join(log)}")
                time.sleep(0.05)


def _stop(node: LocalNode) -> bool:
    pid = node.pid()
    if pid is None:
        node.pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while node.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if node.pid() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while node.pid() is not None:
            time.sleep(0.05)
    node.pid_file.unlink(missing_ok=True)
    return True


def grid_up(home: Path, grid_path: Path, count: int | None, tls: bool = False) -> list[LocalNode]:
    """Start the local nodes that are not running (creating `count` nodes the first time, default 10),
    wait until every one answers, and write the grid file. Idempotent. With `tls` every node serves
    HTTPS from now on (running nodes without it are restarted) and the grid file pins their
    certificates."""
    existing = local_nodes(home)
    if count is None:
        count = len(existing) or 10
    if count < 1 or count > 256:
        raise UsageError("--nodes must be between 1 and 256")
    nodes = [LocalNode(i, nodes_root(home) / f"node-{i:02d}") for i in range(count)]
    for node in nodes:
        if tls and not node.tls:
            _stop(node)
            node.dir.mkdir(parents=True, exist_ok=True)
            (node.dir / "tls").write_text("serve HTTPS (tahoefs grid up --tls)\n")
        if node.pid() is None:
            _start(node)
    try:
        _wait_ready(nodes)
    except GridError as exc:
        if "Address already in use" not in str(exc):
            raise
        # Someone took a recorded port meanwhile: give those nodes new ports (the grid file is
        # rewritten below) and try once more.
        for node in nodes:
            if node.pid() is None:
                (node.dir / "port").unlink(missing_ok=True)
                _start(node)
        _wait_ready(nodes)
    config = GridConfig()
    if grid_path.exists():
        with contextlib.suppress(UsageError):
            old = load_grid(grid_path)
            config.needed, config.happy, config.total = old.needed, old.happy, old.total
    if count < config.happy:
        config.needed, config.happy, config.total = min(config.needed, count), count, max(count, config.total)
        config.needed = min(config.needed, config.happy)
    config.nodes = []
    for node in nodes:
        node_id, token = node.identity()
        config.nodes.append(NodeConfig(node.url, token, node_id, node.fingerprint()))
    save_grid(config, grid_path)
    return nodes


def select(home: Path, indexes: list[int]) -> list[LocalNode]:
    by_index = {n.index: n for n in local_nodes(home)}
    missing = [i for i in indexes if i not in by_index]
    if missing:
        raise UsageError(f"no local node with index {missing[0]} (run 'tahoefs grid status')")
    return [by_index[i] for i in indexes]


def grid_down(home: Path) -> int:
    return sum(_stop(node) for node in local_nodes(home))


def stop_nodes(home: Path, indexes: list[int]) -> None:
    for node in select(home, indexes):
        _stop(node)


def start_nodes(home: Path, indexes: list[int]) -> None:
    nodes = select(home, indexes)
    for node in nodes:
        if node.pid() is None:
            _start(node)
    _wait_ready(nodes)


def grid_status(home: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with httpx.Client(timeout=2.0, trust_env=False) as plain:
        for node in local_nodes(home):
            pid = node.pid()
            row: dict[str, object] = {
                "index": node.index,
                "url": node.url,
                "running": pid is not None,
                "pid": pid,
                "dir": str(node.dir),
                "shares": None,
                "bytes": None,
                "free_bytes": None,
            }
            if pid is not None:
                try:
                    _id, token = node.identity()
                    http = node.http(plain)
                    try:
                        info = http.get(
                            f"{node.url}/v1/version", headers={"authorization": f"Bearer {token}"}
                        ).json()
                    finally:
                        if http is not plain:
                            http.close()
                    row.update(
                        shares=info["shares"], bytes=info["share_bytes"], free_bytes=info["free_bytes"]
                    )
                except (httpx.HTTPError, ValueError, KeyError, FileNotFoundError, ssl.SSLError):
                    row["running"] = False
            rows.append(row)
    return rows
