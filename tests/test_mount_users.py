"""Mounts by and for users other than root, with real FUSE and real nodes: a user mounts a tree on a
folder of its own and is the only one who can enter it; with --allow-other (by that user or by root)
others come in, and the kernel checks modes and owners (default_permissions).

Needs root (to create a test user and act as users). Prepares the machine the way ./scripts/setup does:
/dev/fuse 0666 and `user_allow_other` in /etc/fuse.conf, only when they are not so already."""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pickle
import pwd
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tahoefs.fs.mount import FUSE_CONF, FUSE_DEVICE, is_mounted, state_paths, user_allow_other
from tests.localgrid import LocalGrid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other users needs root")

TEST_USER = "tahoefs-test"
OTHER_USER = "nobody"
TIMEOUT = 120  # every subprocess and every action as a user is bounded by this (seconds)
USER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def prepare_fuse_for_users() -> None:
    """What ./scripts/setup does as root: /dev/fuse usable by everyone, user_allow_other on."""
    if not FUSE_DEVICE.exists():
        pytest.fail(f"{FUSE_DEVICE} is missing: this machine has no FUSE")
    if FUSE_DEVICE.stat().st_mode & 0o777 != 0o666:
        FUSE_DEVICE.chmod(0o666)
    if not user_allow_other(FUSE_CONF):
        with open(FUSE_CONF, "a") as f:
            f.write("\n# added by tahoefs scripts/setup: lets non-root users mount with --allow-other\n")
            f.write("user_allow_other\n")
    assert FUSE_DEVICE.stat().st_mode & 0o777 == 0o666
    assert user_allow_other(FUSE_CONF)
    fusermount = shutil.which("fusermount3")
    if fusermount is None or not os.stat(fusermount).st_mode & 0o4000 or os.stat(fusermount).st_uid != 0:
        pytest.fail(f"fusermount3 ({fusermount}) must be installed setuid root for user mounts")


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        return pwd.getpwnam(name)


def as_user(user: pwd.struct_passwd, fn: Callable[..., object], *args: object) -> object:
    """Run fn(*args) in a child process with the user's uid and gid (no supplementary groups); return
    its result, or the errno name of the OSError it raised (e.g. "EACCES")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            try:
                result: object = fn(*args)
            except OSError as exc:
                result = errno.errorcode.get(exc.errno or 0, str(exc))
            data = pickle.dumps(("ok", result))
        except BaseException as exc:  # reported to the parent
            data = pickle.dumps(("crash", repr(exc)))
        with contextlib.suppress(OSError), os.fdopen(w, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    try:
        with os.fdopen(r, "rb") as pipe:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([pipe], [], [], left)[0]:
                    raise AssertionError(f"{fn.__name__} as {user.pw_name} took over {TIMEOUT} s")
                chunk = os.read(pipe.fileno(), 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        with contextlib.suppress(ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    kind, result = pickle.loads(b"".join(chunks))
    assert kind == "ok", f"{fn.__name__} as {user.pw_name} crashed: {result}"
    return result


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)  # the flush: the content is on the grid when this returns
    os.chmod(path, mode)  # exactly this mode, whatever the umask


def list_dir(path: str) -> list[str]:
    return sorted(os.listdir(path))


def stat_owner(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def mount_fields(mnt: Path) -> tuple[str, str, set[str]]:
    """(source, type, options) of the mount at mnt in /proc/mounts."""
    for line in Path("/proc/mounts").read_text().splitlines():
        source, target, fstype, options = line.split()[:4]
        if target == str(mnt):
            return source, fstype, set(options.split(","))
    raise AssertionError(f"{mnt} is not in /proc/mounts")


def python_for_users() -> list[str]:
    """The command that runs a module of this checkout as another user: this venv's interpreter when
    others may run it, else the system's Python of the same version with this venv's site-packages
    (a venv made from an interpreter under root's 0700 home cannot be run by anyone else)."""
    probe = pwd.getpwnam(OTHER_USER)
    as_probe = ["setpriv", f"--reuid={probe.pw_uid}", f"--regid={probe.pw_gid}", "--clear-groups"]
    venv_sites = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
    boot = (
        "import runpy, site, sys\n"
        f"for p in {venv_sites!r}: site.addsitedir(p)\n"
        "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [[sys.executable, "-m"]]
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system and os.path.realpath(system) != os.path.realpath(sys.executable):
        candidates.append([system, "-S", "-c", boot])
    tried = []
    for prefix in candidates:
        real = os.path.realpath(prefix[0])
        runnable = subprocess.run([*as_probe, "test", "-x", real], timeout=TIMEOUT, env={"PATH": USER_PATH})
        if runnable.returncode != 0:
            tried.append(f"{real} is not runnable by {OTHER_USER}")
            continue
        proc = subprocess.run(
            [*as_probe, *prefix, "tahoefs.fs.mount"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd="/",
            env={"PATH": USER_PATH},
        )
        if proc.returncode == 0:
            return prefix
        tried.append(f"{real} cannot import tahoefs: {proc.stderr.strip().splitlines()[-1:]}")
    pytest.fail(
        "users other than root cannot run tahoefs from this checkout (the repo and the venv must be "
        f"readable and an interpreter runnable by them): {'; '.join(tried)}"
    )


@dataclass
class User:
    """A user other than root running `tahoefs` with a TAHOEFS_HOME of its own."""

    pw: pwd.struct_passwd
    home: Path
    python: list[str]

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.command(*self.python, "tahoefs", *args, check=check)

    def command(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}", "--init-groups", *argv],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd="/",
            env={
                "PATH": USER_PATH,
                "HOME": str(self.home),
                "TAHOEFS_HOME": str(self.home),
                "LANG": "C.UTF-8",
            },
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} as {self.pw.pw_name} exited {proc.returncode}: {proc.stderr}"
            )
        return proc


def own_dir(path: Path, user: pwd.struct_passwd, mode: int) -> Path:
    path.mkdir()
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def unmount_for_sure(mnt: Path, home: Path, umount: Callable[[], object]) -> None:
    """`tahoefs umount`, then `fusermount3 -uz`, then stop the daemon by its recorded pid."""
    state_file, _status = state_paths(home, mnt)
    pid = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(json.loads(state_file.read_text())["pid"])
    if is_mounted(mnt):
        with contextlib.suppress(subprocess.TimeoutExpired):
            umount()
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=TIMEOUT)
    if pid is not None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A folder every user can enter (pytest's own tmp folders may be closed to them); removed at the
    end unless something is still mounted below it."""
    if os.geteuid() == 0:
        prepare_fuse_for_users()
    folder = Path(tempfile.mkdtemp(prefix="tahoefs-users-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        left = [line for line in Path("/proc/mounts").read_text().splitlines() if f" {folder}/" in line]
        assert not left, f"mounts left behind: {left}"
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def python() -> list[str]:
    ensure_user(TEST_USER)
    return python_for_users()


@pytest.fixture
def user(grid: LocalGrid, base: Path, python: list[str]) -> User:
    """TEST_USER with a fresh TAHOEFS_HOME of its own (the grid's file copied in) and a new tree made by
    `tahoefs mkfs` as that user."""
    pw = ensure_user(TEST_USER)
    home = own_dir(base / f"home-{uuid.uuid4().hex[:8]}", pw, 0o700)
    shutil.copy(grid.home / "grid.toml", home / "grid.toml")
    os.chown(home / "grid.toml", pw.pw_uid, pw.pw_gid)
    (home / "grid.toml").chmod(0o600)
    u = User(pw, home, python)
    u.run("mkfs", check=True)
    return u


@contextlib.contextmanager
def mounted_by(user: User, mnt: Path, *options: str) -> Iterator[None]:
    try:
        proc = user.run("mount", "root", str(mnt), *options)
        assert proc.returncode == 0, proc.stderr
        yield
    finally:
        unmount_for_sure(mnt, user.home, lambda: user.run("umount", str(mnt)))


def test_a_user_mounts_on_its_own_folder_and_no_one_else_gets_in(user: User, base: Path) -> None:
    pw, other = user.pw, pwd.getpwnam(OTHER_USER)
    mnt = own_dir(base / f"mnt-{uuid.uuid4().hex[:8]}", pw, 0o755)
    src = base / f"src-{uuid.uuid4().hex[:8]}.bin"
    data = os.urandom(300 * 1024 + 7)  # larger than an inline file: a real upload at close
    src.write_bytes(data)
    src.chmod(0o644)
    with mounted_by(user, mnt):
        source, fstype, options = mount_fields(mnt)
        assert (source, fstype) == ("tahoefs", "fuse.tahoefs")
        assert {f"user_id={pw.pw_uid}", f"group_id={pw.pw_gid}", "default_permissions"} <= options
        assert "allow_other" not in options
        # the user writes (cp and its own open/close), reads back, lists
        user.command("cp", str(src), str(mnt / "copied.bin"), check=True)
        user.command("cmp", str(src), str(mnt / "copied.bin"), check=True)
        as_user(pw, write_file, str(mnt / "note.txt"), b"hello\n", 0o644)
        assert as_user(pw, read_file, str(mnt / "note.txt")) == b"hello\n"
        assert as_user(pw, os.mkdir, str(mnt / "sub")) is None
        assert as_user(pw, list_dir, str(mnt)) == ["copied.bin", "note.txt", "sub"]
        listing = user.command("ls", "-l", str(mnt), check=True).stdout.splitlines()[1:]
        assert len(listing) == 3
        for line in listing:
            assert line.split()[2:4] == [TEST_USER, grp.getgrgid(pw.pw_gid).gr_name], line
        assert as_user(pw, stat_owner, str(mnt)) == (pw.pw_uid, pw.pw_gid, 0o755)
        # without --allow-other nobody else enters, not even root
        assert as_user(other, list_dir, str(mnt)) == "EACCES"
        assert as_user(other, read_file, str(mnt / "note.txt")) == "EACCES"
        with pytest.raises(PermissionError):
            os.stat(mnt)
        proc = user.run("umount", str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)
        assert not state_paths(user.home, mnt)[0].exists()  # the daemon exited
    # what the user wrote is on the grid: read back without a mount
    back = user.home / "back.bin"
    user.run("get", "root:copied.bin", "-o", str(back), check=True)
    assert back.read_bytes() == data
    src.unlink()


def test_allow_other_by_a_user_lets_others_in_as_modes_and_owners_allow(user: User, base: Path) -> None:
    pw, other = user.pw, pwd.getpwnam(OTHER_USER)
    mnt = own_dir(base / f"mnt-{uuid.uuid4().hex[:8]}", pw, 0o755)
    with mounted_by(user, mnt, "--allow-other"):
        source, fstype, options = mount_fields(mnt)
        assert (source, fstype) == ("tahoefs", "fuse.tahoefs")
        assert {"allow_other", "default_permissions", f"user_id={pw.pw_uid}"} <= options
        as_user(pw, write_file, str(mnt / "public.txt"), b"for everyone\n", 0o644)
        as_user(pw, write_file, str(mnt / "secret.txt"), b"mine only\n", 0o600)
        as_user(pw, os.mkdir, str(mnt / "private"), 0o700)
        as_user(pw, write_file, str(mnt / "private" / "inside.txt"), b"hidden\n", 0o644)
        assert as_user(pw, stat_owner, str(mnt / "private")) == (pw.pw_uid, pw.pw_gid, 0o700)
        # another user: in, and reads what the modes allow
        assert as_user(other, list_dir, str(mnt)) == ["private", "public.txt", "secret.txt"]
        assert as_user(other, read_file, str(mnt / "public.txt")) == b"for everyone\n"
        assert as_user(other, stat_owner, str(mnt / "secret.txt")) == (pw.pw_uid, pw.pw_gid, 0o600)
        # ... and nothing more: EACCES from the kernel's own checks
        assert as_user(other, read_file, str(mnt / "secret.txt")) == "EACCES"
        assert as_user(other, write_file, str(mnt / "public.txt"), b"defaced", 0o644) == "EACCES"
        assert as_user(other, write_file, str(mnt / "new.txt"), b"x", 0o644) == "EACCES"
        assert as_user(other, list_dir, str(mnt / "private")) == "EACCES"
        assert as_user(other, read_file, str(mnt / "private" / "inside.txt")) == "EACCES"
        assert as_user(other, os.chmod, str(mnt / "secret.txt"), 0o644) == "EPERM"
        # nothing changed
        assert as_user(pw, read_file, str(mnt / "public.txt")) == b"for everyone\n"
        assert as_user(pw, list_dir, str(mnt)) == ["private", "public.txt", "secret.txt"]
        assert as_user(pw, stat_owner, str(mnt / "secret.txt")) == (pw.pw_uid, pw.pw_gid, 0o600)


def test_allow_other_by_root_lets_users_in_as_modes_and_owners_allow(grid: LocalGrid, base: Path) -> None:
    prepare_fuse_for_users()
    pw = ensure_user(TEST_USER)
    alias = "u" + uuid.uuid4().hex[:8]
    grid.run("mkfs", "--alias", alias, check=True)
    mnt = base / f"rootmnt-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    mnt.chmod(0o755)
    try:
        proc = grid.run("mount", alias, str(mnt), "--allow-other", timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr.decode()
        source, fstype, options = mount_fields(mnt)
        assert (source, fstype) == ("tahoefs", "fuse.tahoefs")
        assert {"allow_other", "default_permissions", "user_id=0"} <= options
        (mnt / "public.txt").write_bytes(b"for everyone\n")
        (mnt / "public.txt").chmod(0o644)
        (mnt / "secret.txt").write_bytes(b"root only\n")
        (mnt / "secret.txt").chmod(0o600)
        (mnt / "theirs").mkdir(mode=0o755)
        os.chown(mnt / "theirs", pw.pw_uid, pw.pw_gid)  # a folder root gives to the user
        assert as_user(pw, read_file, str(mnt / "public.txt")) == b"for everyone\n"
        assert as_user(pw, read_file, str(mnt / "secret.txt")) == "EACCES"
        assert as_user(pw, write_file, str(mnt / "new.txt"), b"x", 0o644) == "EACCES"  # root's 0755 folder
        # in its own folder the user writes, and its files are its own
        as_user(pw, write_file, str(mnt / "theirs" / "mine.txt"), b"mine\n", 0o600)
        assert as_user(pw, stat_owner, str(mnt / "theirs" / "mine.txt")) == (pw.pw_uid, pw.pw_gid, 0o600)
        assert (mnt / "theirs" / "mine.txt").read_bytes() == b"mine\n"  # root may read anything
        assert as_user(pwd.getpwnam(OTHER_USER), read_file, str(mnt / "theirs" / "mine.txt")) == "EACCES"
    finally:
        unmount_for_sure(mnt, grid.home, lambda: grid.run("umount", str(mnt), timeout=TIMEOUT))
    assert not is_mounted(mnt)


def test_a_user_cannot_mount_where_it_may_not_write(user: User, base: Path) -> None:
    mnt = base / f"notyours-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    mnt.chmod(0o755)  # root's
    proc = user.run("mount", "root", str(mnt))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "may not write to" in lines[0], proc.stderr
    assert not is_mounted(mnt)


def test_user_allow_other_is_read_as_fusermount3_reads_it(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    assert not user_allow_other(conf)  # missing
    conf.write_text("# user_allow_other\n#user_allow_other\nmount_max = 1000\n")
    assert not user_allow_other(conf)
    conf.write_text("mount_max = 1000\n  user_allow_other   # let users use allow_other\n")
    assert user_allow_other(conf)
