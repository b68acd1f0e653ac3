"""The grid file (`$TAHOEFS_HOME/grid.toml`): which nodes make the grid and how files are encoded.

[encoding]
needed = 3      # k: shares needed to read a file
happy = 7       # an upload succeeds only when this many distinct nodes hold a share
total = 10      # n: shares made per file

[[nodes]]
url = "http://127.0.0.1:40001"
token = "..."
id = "..."      # optional: the node's id (placement key); defaults to the URL
fingerprint = "sha256:..."  # optional, https only: trust exactly this certificate (see tahoefs/tls.py)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tahoefs.errors import UsageError
from tahoefs.limits import NODE_STALL_TIMEOUT
from tahoefs.tls import check_fingerprint

DEFAULT_NEEDED, DEFAULT_HAPPY, DEFAULT_TOTAL = 3, 7, 10


@dataclass
class NodeConfig:
    url: str
    token: str
    id: str = ""
    # "sha256:HEX" of the node's DER certificate: the client trusts that certificate and no other (no CA,
    # no hostname check). Empty: an https node is checked against the system's CAs.
    fingerprint: str = ""

    @property
    def placement_id(self) -> str:
        return self.id or self.url


@dataclass
class GridConfig:
    nodes: list[NodeConfig] = field(default_factory=list)
    needed: int = DEFAULT_NEEDED
    happy: int = DEFAULT_HAPPY
    total: int = DEFAULT_TOTAL
    # Seconds a node may take to answer (or take the next part of a body) before it is dropped for
    # that operation: a stalled node costs at most this much time. [timeouts] stall = ... in the file.
    stall_timeout: float = NODE_STALL_TIMEOUT

    def validate(self) -> None:
        for node in self.nodes:
            if not node.fingerprint:
                continue
            try:
                node.fingerprint = check_fingerprint(node.fingerprint)
            except ValueError as exc:
                raise UsageError(f"node {node.url}: {exc}") from None
            if not node.url.lower().startswith("https://"):
                raise UsageError(
                    f"node {node.url} has a fingerprint but a plain http:// URL: make it https:// (the node "
                    "must run with --tls) or drop the fingerprint"
                )
        if not 0.1 <= self.stall_timeout <= 3600:
            raise UsageError(
                f"[timeouts] stall must be between 0.1 and 3600 seconds, got {self.stall_timeout}"
            )
        if not 1 <= self.needed <= self.happy <= self.total <= 256:
            raise UsageError(
                f"grid encoding needs 1 <= needed <= happy <= total <= 256, got "
                f"needed={self.needed} happy={self.happy} total={self.total}"
            )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_grid(config: GridConfig) -> str:
    lines = [
        "# tahoefs grid file: the nodes of the grid and the encoding of new files.",
        "[encoding]",
        f"needed = {config.needed}",
        f"happy = {config.happy}",
        f"total = {config.total}",
    ]
    if config.stall_timeout != NODE_STALL_TIMEOUT:
        lines += ["", "[timeouts]", f"stall = {config.stall_timeout}"]
    for node in config.nodes:
        lines += ["", "[[nodes]]", f"url = {_quote(node.url)}", f"token = {_quote(node.token)}"]
        if node.id:
            lines.append(f"id = {_quote(node.id)}")
        if node.fingerprint:
            lines.append(f"fingerprint = {_quote(node.fingerprint)}")
    return "\n".join(lines) + "\n"


def save_grid(config: GridConfig, path: Path) -> None:
    """Write atomically (temp file + rename), readable by the owner only: it holds the tokens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dump_grid(config))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_grid(path: Path) -> GridConfig:
    """Parse a grid file. Raises UsageError naming the file and the problem."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"no grid file at {path}: run 'tahoefs grid up' for a local grid, or 'tahoefs grid add URL TOKEN'"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read grid file {path}: {exc}") from None
    try:
        enc = data.get("encoding", {})
        config = GridConfig(
            nodes=[
                NodeConfig(str(n["url"]), str(n["token"]), str(n.get("id", "")), _text(n, "fingerprint"))
                for n in data.get("nodes", [])
            ],
            needed=int(enc.get("needed", DEFAULT_NEEDED)),
            happy=int(enc.get("happy", DEFAULT_HAPPY)),
            total=int(enc.get("total", DEFAULT_TOTAL)),
            stall_timeout=float(data.get("timeouts", {}).get("stall", NODE_STALL_TIMEOUT)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"grid file {path} is malformed: {exc}") from None
    try:
        config.validate()
    except UsageError as exc:
        raise UsageError(f"grid file {path}: {exc}") from None
    return config


def _text(table: dict[str, object], key: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value
