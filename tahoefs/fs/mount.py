"""Mounting: the daemon that serves a TahoeFS over FUSE, and unmounting that waits for it.

`tahoefs mount` forks a daemon (unless --foreground), which connects to the grid, reads the root
directory (failing fast if the grid cannot give it), mounts, and only then tells the waiting parent
"ok". State per mount lives in $TAHOEFS_HOME/mounts/ID.json (pid, mount point, log) and
ID.status.json (uploads in flight, pending saves, recent errors), refreshed every second.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from tahoefs.errors import TahoefsError, UsageError
from tahoefs.formats.caps import DirReadCap, DirWriteCap
from tahoefs.formats.dirformat import KIND_DIR, Entry
from tahoefs.formats.hashing import b32encode
from tahoefs.fs.inodes import ROOT_INODE
from tahoefs.fs.journal import OWN, Journal
from tahoefs.fs.operations import TahoeFS
from tahoefs.grid.client import GridClient
from tahoefs.grid.config import GridConfig
from tahoefs.grid.directory import Directory

UMOUNT_WAIT = 180.0
READ_AHEAD_KB = 1024
FUSE_DEVICE = Path("/dev/fuse")
FUSE_CONF = Path("/etc/fuse.conf")


def mount_id(mountpoint: Path) -> str:
    return hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]


def state_paths(home: Path, mountpoint: Path) -> tuple[Path, Path]:
    folder = home / "mounts"
    ident = mount_id(mountpoint)
    return folder / f"{ident}.json", folder / f"{ident}.status.json"


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    with open("/proc/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == target for line in f)


def check_mountpoint(mountpoint: Path) -> Path:
    mountpoint = mountpoint.expanduser().absolute()
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint} is not an existing directory")
    if is_mounted(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point (tahoefs umount {mountpoint} first)")
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        raise UsageError(
            f"you may not write to {mountpoint}; a user other than root can only mount on a directory it may "
            "write to (make one of your own)"
        )
    return mountpoint


def user_allow_other(conf: Path = FUSE_CONF) -> bool:
    """Whether fuse.conf lets non-root users mount with allow_other (read as fusermount3 reads it:
    comments cut, blanks stripped). Unreadable or missing: False."""
    try:
        lines = conf.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)


def check_fuse_access(allow_other: bool) -> None:
    """For a user other than root, the two machine settings a FUSE mount needs, with one clear line
    each instead of libfuse's bare failure (root needs neither)."""
    if os.geteuid() == 0:
        return
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise TahoefsError(
            f"cannot open {FUSE_DEVICE}: only root may use FUSE on this machine; as root run "
            f"'chmod 0666 {FUSE_DEVICE}' (./scripts/setup does it)"
        )
    if allow_other and not user_allow_other():
        raise UsageError(
            f"--allow-other needs a line 'user_allow_other' in {FUSE_CONF} for users other than root "
            "(./scripts/setup adds it when run as root); or mount without --allow-other"
        )


@dataclass(frozen=True)
class MountRequest:
    """Everything a mount needs, as the CLI resolved it."""

    config: GridConfig
    secret: bytes
    cap: DirWriteCap | DirReadCap
    mountpoint: Path
    home: Path
    read_only: bool = False
    allow_other: bool = False


async def serve(request: MountRequest, ready: Callable[[], None]) -> None:
    """Connect, mount, serve until unmounted or signalled; then push pending work and unmount."""
    config, secret, cap = request.config, request.secret, request.cap
    mountpoint, home, read_only = request.mountpoint, request.home, request.read_only
    log = logging.getLogger("tahoefs.mount")
    async with GridClient(config, secret) as grid:
        root = Directory(grid, cap)
        await root.count()  # fails fast (NotEnoughSharesError) when the grid cannot give the root
        read_only = read_only or not root.writable
        now = time.time_ns()
        # A root whose own attributes were never set shows as the mounting user's, 0755 (see below).
        root_entry = Entry(b"", KIND_DIR, 0o755, os.getuid(), os.getgid(), 0, now, now)
        fs = TahoeFS(grid, root, root_entry, home / "spool", read_only)
        # default_permissions: the kernel checks modes and owners (what makes allow_other safe on a
        # shared machine); pyfuse3's defaults hold it too, but it must not depend on them
        options = set(pyfuse3.default_options) | {"fsname=tahoefs", "subtype=tahoefs", "default_permissions"}
        if read_only:
            options.add("ro")
        if request.allow_other:
            options.add("allow_other")
        _state_file, status_file = state_paths(home, mountpoint)
        journal = None
        if not read_only:  # before mounting: a refused journal lock must not leave a dead mount
            assert isinstance(cap, DirWriteCap)
            journal_path = home / "journal" / f"{b32encode(cap.storage_index)}.log"
            journal = Journal(journal_path, fs.apply_changes, fs.drop_caps)
            replayed = journal.load()  # left by a mount that died: pushed now, visible meanwhile
            if replayed:
                log.info("replaying %d journal records left by an earlier mount", replayed)
                await journal.drain(grid.stall_timeout * 3)
            saved = await fs.save_leftovers()  # content whose save a dead mount had not finished
            if saved:
                log.info("saved %d files an earlier mount had not finished saving", saved)
        # The root's own mode, owner, times and xattrs, as the replay left them (or still pending in
        # the journal if it could not push them).
        pending = journal.pending.get(str(cap), {}) if journal is not None else {}
        own = copy.deepcopy(pending.get(OWN)) or await root.own()
        if own is not None:
            fs.table[ROOT_INODE].entry = own
        pyfuse3.init(fs, str(mountpoint), options)
        try:
            ready()
            async with trio.open_nursery() as nursery:
                fs.start(nursery, journal)
                if journal is not None:
                    nursery.start_soon(journal.run)
                nursery.start_soon(_write_status, fs, status_file)
                nursery.start_soon(_on_signals)
                nursery.start_soon(_raise_read_ahead, mountpoint)
                await pyfuse3.main()
                await fs.stop_lingering()
                nursery.cancel_scope.cancel()
        finally:
            fs.lingering = None  # its nursery is closed: uploads from here on wait for all their PUTs
            with trio.CancelScope(shield=True):
                await fs.commit_all()
                if journal is not None:
                    # What is left of `tahoefs umount`'s patience, less the lingering PUTs' stall
                    # timeout (stop_lingering) and a minute for the rest.
                    await journal.drain(max(30.0, UMOUNT_WAIT - 60 - grid.stall_timeout))
                    if journal.count():
                        log.error(
                            "%d directory changes could not reach the grid; the next mount pushes them",
                            journal.count(),
                        )
                    journal.close()
                fs.spools.close()
                unsaved = await fs.pending()
                left = journal.count() if journal is not None else 0
                if unsaved or left:
                    _final_path(home, mountpoint).write_text(
                        json.dumps({"journal": left, "unsaved": unsaved})
                    )
            pyfuse3.close(unmount=True)
            status_file.unlink(missing_ok=True)
            log.info("unmounted %s", mountpoint)


async def _raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel read ahead a whole segment (1 MiB) instead of 128 KiB: fewer, larger FUSE reads.
    Needs root (sysfs); silently skipped otherwise."""
    try:
        dev = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev  # served by our own loop
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        path.write_text(f"{READ_AHEAD_KB}\n")
    except OSError:
        pass


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _sig in signals:
            pyfuse3.terminate()
            return


async def _write_status(fs: TahoeFS, path: Path) -> None:
    while True:
        status = {
            "uploads": [{"target": t, "bytes_done": d} for t, d in fs.uploads_in_flight.items()],
            # Files whose close() returned (on `happy` nodes) while their last shares are still sent.
            "finishing_uploads": fs.lingering.uploads if fs.lingering is not None else 0,
            "pending": await fs.pending(),
            "pending_directory_changes": fs.pending_changes(),
            "journal_errors": fs.journal.errors if fs.journal else [],
            "errors": fs.errors,
            "problems": fs.cache.problems[-20:] if fs.cache else [],
            "updated": time.time(),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)
        await trio.sleep(1)


def run_mount(request: MountRequest, foreground: bool) -> None:
    """Mount and return once the mount answers (or serve in the foreground until unmounted).
    Raises UsageError for a bad mount point, TahoefsError when the grid or the mount fails."""
    mountpoint = check_mountpoint(request.mountpoint)
    check_fuse_access(request.allow_other)
    request = dataclasses.replace(request, mountpoint=mountpoint)
    home = request.home
    state_file, _status = state_paths(home, mountpoint)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    log_file = home / "logs" / f"mount-{mount_id(mountpoint)}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if foreground:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        _record(state_file, os.getpid(), request, log_file)
        try:
            trio.run(serve, request, lambda: None)
        finally:
            state_file.unlink(missing_ok=True)
        return
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        _daemon(write_fd, request, state_file, log_file)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        answer = pipe.readline().strip()
    if answer != "ok":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        message = answer.removeprefix("error: ")
        if message.startswith("usage: "):
            raise UsageError(message.removeprefix("usage: "))
        raise TahoefsError(message or f"the mount daemon died; see {log_file}")


def _record(state_file: Path, pid: int, request: MountRequest, log_file: Path) -> None:
    """The mount's state file: private (0600), since it names the root cap the mount serves (so that
    `tahoefs check` of a path inside the mount can walk from it with the caps the mount itself has)."""
    state = {"pid": pid, "mountpoint": str(request.mountpoint), "log": str(log_file), "cap": str(request.cap)}
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when an old state file of this mount point is reused
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))


def _daemon(write_fd: int, request: MountRequest, state_file: Path, log_file: Path) -> None:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would flood the log
    _record(state_file, os.getpid(), request, log_file)
    told = False

    def ready() -> None:
        nonlocal told
        os.write(write_fd, b"ok\n")
        os.close(write_fd)
        told = True

    try:
        trio.run(serve, request, ready)
    except BaseException as exc:
        logging.getLogger("tahoefs.mount").exception("mount failed")
        if not told:
            text = str(exc) if isinstance(exc, TahoefsError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, UsageError):
                text = "usage: " + text
            os.write(write_fd, f"error: {text}\n".encode())
            os.close(write_fd)
    finally:
        state_file.unlink(missing_ok=True)


def _final_path(home: Path, mountpoint: Path) -> Path:
    return home / "mounts" / f"{mount_id(mountpoint)}.left.json"


def run_umount(home: Path, mountpoint: Path) -> None:
    """Unmount and wait until the daemon has pushed its work and exited. Raises UsageError when
    nothing is mounted there, TahoefsError when the unmount fails (e.g. busy) or when work could not
    reach the grid (it stays in the journal and spool for the next mount)."""
    mountpoint = mountpoint.expanduser().absolute()
    _final_path(home, mountpoint).unlink(missing_ok=True)
    state_file, _status = state_paths(home, mountpoint)
    pid = None
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        pid = int(json.loads(state_file.read_text())["pid"])
    if not is_mounted(mountpoint):
        if pid is None:
            raise UsageError(f"nothing is mounted at {mountpoint}")
    else:
        proc = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
        if proc.returncode != 0:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "fusermount3 failed"
            raise TahoefsError(f"cannot unmount {mountpoint}: {reason}")
    if pid is not None:
        deadline = time.monotonic() + UMOUNT_WAIT
        while _alive(pid):
            if time.monotonic() > deadline:
                raise TahoefsError(f"the mount daemon (pid {pid}) did not exit within {UMOUNT_WAIT:.0f} s")
            time.sleep(0.05)
    final = _final_path(home, mountpoint)
    if final.exists():
        left = json.loads(final.read_text())
        final.unlink()
        raise TahoefsError(
            f"unmounted, but {left['journal']} directory changes and {len(left['unsaved'])} files could not "
            "reach the grid; they are kept locally and the next mount of this tree pushes them"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(FileNotFoundError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def read_cap_of(path: Path) -> str:
    """The read cap of a file or directory inside a tahoefs mount. Raises UsageError elsewhere."""
    try:
        return os.getxattr(path, "user.tahoefs.cap").decode()
    except FileNotFoundError:
        raise UsageError(f"no such file or directory: {path}") from None
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise UsageError(f"{path} is not inside a tahoefs mount") from None
        raise UsageError(f"cannot read the cap of {path}: {exc.strerror}") from None


def mount_of(home: Path, path: Path) -> tuple[str, list[bytes]] | None:
    """For a path inside a mount this home serves: (the mount's root cap, the path's components below
    the mount point). None when no mount of this home holds the path."""
    target = Path(os.path.realpath(path.expanduser()))
    for row in mount_status(home):
        mountpoint = Path(os.path.realpath(str(row["mountpoint"])))
        if row["alive"] and "cap" in row and (target == mountpoint or mountpoint in target.parents):
            return str(row["cap"]), [os.fsencode(p) for p in target.relative_to(mountpoint).parts]
    return None


def mount_status(home: Path) -> list[dict[str, object]]:
    rows = []
    folder = home / "mounts"
    for state in sorted(folder.glob("*.json")) if folder.exists() else []:
        if state.name.endswith((".status.json", ".left.json")):
            continue
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(state.read_text())
            status_file = state.with_name(state.stem + ".status.json")
            info["alive"] = _alive(int(info["pid"]))
            info["status"] = json.loads(status_file.read_text()) if status_file.exists() else {}
            rows.append(info)
    return rows
