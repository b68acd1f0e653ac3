"""Client state under $TAHOEFS_HOME: grid file, client secret, local grid nodes."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import platformdirs

from tahoefs.errors import UsageError
from tahoefs.grid.config import GridConfig, load_grid


def home_dir() -> Path:
    """$TAHOEFS_HOME, or the per-user data folder."""
    env = os.environ.get("TAHOEFS_HOME")
    return Path(env).expanduser().absolute() if env else Path(platformdirs.user_data_dir("tahoefs"))


def grid_file(override: str | None) -> Path:
    return Path(override).expanduser().absolute() if override else home_dir() / "grid.toml"


def load_grid_config(override: str | None) -> GridConfig:
    """The grid file named by --grid or in $TAHOEFS_HOME. Raises UsageError if missing or malformed."""
    return load_grid(grid_file(override))


def client_secret() -> bytes:
    """The 32-byte secret from which this client's share delete secrets derive; made on first use."""
    path = home_dir() / "private" / "client-secret"
    if path.exists():
        try:
            data = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError):
            data = b""
        if len(data) != 32:
            raise UsageError(
                f"{path} is damaged (it should hold 64 hex digits); without it this client cannot delete "
                "the shares it uploaded. Restore it from a backup, or move it away to start a new one."
            )
        return data
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return data
