"""The mount, with real FUSE and real nodes: what users do with cp, mv, ln, tar, git, sqlite."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.localgrid import LocalGrid, fsync_folder

MiB = 1024 * 1024


def make_tree(base: Path) -> None:
    (base / "docs" / "deep" / "er").mkdir(parents=True)
    (base / "empty-dir").mkdir()
    (base / "docs" / "readme.txt").write_text("hello\n")
    (base / "docs" / "big.bin").write_bytes(os.urandom(3 * MiB + 17))
    (base / "docs" / "deep" / "er" / "4k.bin").write_bytes(os.urandom(4096))
    (base / "docs" / "deep" / "4k+1.bin").write_bytes(os.urandom(4097))
    (base / "empty.txt").write_bytes(b"")
    (base / "ünïcødé ✓ name.txt").write_text("unicode\n")
    (base / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (base / "script.sh").chmod(0o755)
    (base / "secret.txt").write_text("s")
    (base / "secret.txt").chmod(0o600)
    os.symlink("docs/readme.txt", base / "link")
    os.symlink("/nowhere/at/all", base / "dangling")
    os.setxattr(base / "docs" / "readme.txt", "user.color", b"blue")
    os.utime(base / "docs" / "readme.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def assert_same_tree(a: Path, b: Path, times: bool = True) -> None:
    proc = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in a.rglob("*"):
        rel = path.relative_to(a)
        other = b / rel
        sa, sb = os.lstat(path), os.lstat(other)
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), rel
        if not stat.S_ISLNK(sa.st_mode):
            assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), rel
        if stat.S_ISLNK(sa.st_mode):
            assert os.readlink(path) == os.readlink(other), rel
        elif stat.S_ISREG(sa.st_mode):
            assert not times or sa.st_mtime_ns == sb.st_mtime_ns, rel
            assert sorted(os.listxattr(path)) == sorted(os.listxattr(other)), rel


def test_cp_a_of_a_tree_keeps_content_modes_times_links_and_xattrs(mounted, tmp_path: Path) -> None:
    grid, mnt, root = mounted
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    subprocess.run(["cp", "-a", f"{src}/.", str(mnt)], check=True)
    assert_same_tree(src, mnt)
    assert os.getxattr(mnt / "docs" / "readme.txt", "user.color") == b"blue"
    # again after unmount and mount
    grid.run("umount", str(mnt), check=True)
    alias_cap = root
    grid.run("mount", alias_cap, str(mnt), check=True)
    assert_same_tree(src, mnt)


def test_tree_reads_back_from_a_fresh_home_with_only_grid_file_and_root_cap(mounted, tmp_path: Path) -> None:
    grid, mnt, root = mounted
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    subprocess.run(["cp", "-a", f"{src}/.", str(mnt)], check=True)
    fsync_folder(mnt)  # every pending change is on the grid, not just in the journal
    other = LocalGrid(tmp_path / "other-home")
    other.home.mkdir()
    shutil.copy(grid.home / "grid.toml", other.home / "grid.toml")
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    other.run("mount", root, str(mnt2), check=True)
    try:
        assert_same_tree(src, mnt2)
    finally:
        other.run("umount", str(mnt2))


def test_the_roots_own_mode_owner_times_and_xattrs_are_kept(mounted, tmp_path: Path) -> None:
    """The root has no parent entry to hold its metadata: it travels in the root directory itself, so
    `chmod 700` of a mount point shared with --allow-other, or `rsync -a src/ mnt/`, lasts."""
    grid, mnt, root = mounted
    os.chmod(mnt, 0o750)
    os.chown(mnt, 1234, 5678)
    os.utime(mnt, ns=(1_500_000_000_000_000_007, 1_500_000_000_000_000_007))
    os.setxattr(mnt, "user.purpose", b"backups")
    (mnt / "f").write_text("x")  # an entry change in the same directory keeps them

    def check(where: Path) -> None:
        st_ = os.stat(where)
        assert stat.S_IMODE(st_.st_mode) == 0o750
        assert (st_.st_uid, st_.st_gid) == (1234, 5678)
        assert st_.st_mtime_ns == 1_500_000_000_000_000_007
        assert os.getxattr(where, "user.purpose") == b"backups"
        assert os.listdir(where) == ["f"]

    check(mnt)
    grid.run("umount", str(mnt), check=True)
    grid.run("mount", root, str(mnt), check=True)
    check(mnt)
    other = LocalGrid(tmp_path / "other-home")  # a home with only the grid file and the cap
    other.home.mkdir()
    shutil.copy(grid.home / "grid.toml", other.home / "grid.toml")
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    other.run("mount", root, str(mnt2), "--read-only", check=True)
    try:
        check(mnt2)
        with pytest.raises(OSError) as excinfo:
            os.chmod(mnt2, 0o700)
        assert excinfo.value.errno == 30  # EROFS
    finally:
        other.run("umount", str(mnt2))
    # The root keeps its xattrs inside its own version, so they get less room than an entry's.
    with pytest.raises(OSError) as excinfo:
        for i in range(8):
            os.setxattr(mnt, f"user.big{i}", os.urandom(60_000))
    assert excinfo.value.errno == 28  # ENOSPC
    assert os.getxattr(mnt, "user.purpose") == b"backups"


def test_a_root_chmod_journaled_before_a_crash_shows_after_the_next_mount(mounted) -> None:
    import json
    import signal

    grid, mnt, root = mounted
    os.chmod(mnt, 0o711)  # durable in the journal when chmod returns; the daemon dies before a push
    state = next((grid.home / "mounts").glob("*[0-9a-f].json"))
    os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)
    subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    state.unlink(missing_ok=True)
    grid.run("mount", root, str(mnt), check=True)
    assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o711


def test_edits_append_overwrite_truncate_rename_move(mounted) -> None:
    _grid, mnt, _root = mounted
    f = mnt / "f.bin"
    data = bytearray(os.urandom(2 * MiB + 5))
    f.write_bytes(data)
    with open(f, "ab") as h:
        h.write(b"appended")
    data += b"appended"
    with open(f, "r+b") as h:
        h.seek(MiB - 3)
        h.write(b"MIDDLE")
    data[MiB - 3 : MiB + 3] = b"MIDDLE"
    assert f.read_bytes() == bytes(data)
    os.truncate(f, 1000)
    assert f.read_bytes() == bytes(data[:1000])
    (mnt / "a").mkdir()
    (mnt / "b").mkdir()
    (mnt / "a" / "x").write_text("x")
    (mnt / "b" / "y").write_text("y")
    os.rename(mnt / "a" / "x", mnt / "b" / "y")  # rename over an existing file, across folders
    assert (mnt / "b" / "y").read_text() == "x" and not (mnt / "a" / "x").exists()
    (mnt / "a" / "sub").mkdir()
    (mnt / "a" / "sub" / "z").write_text("z")
    os.rename(mnt / "a" / "sub", mnt / "b" / "sub")  # a directory moves and stays writable
    (mnt / "b" / "sub" / "w").write_text("w")
    assert sorted(os.listdir(mnt / "b" / "sub")) == ["w", "z"]
    os.rename(mnt / "b" / "y", mnt / "b" / "y2")
    assert sorted(os.listdir(mnt / "b")) == ["sub", "y2"]
    with pytest.raises(OSError):
        os.rmdir(mnt / "b")  # not empty
    shutil.rmtree(mnt / "b")
    assert sorted(os.listdir(mnt)) == ["a", "f.bin"]


def test_random_operations_match_a_local_folder(mounted, tmp_path: Path) -> None:
    """A seeded random walk applied to the mount and to a plain folder, compared after every step and
    after a remount."""
    grid, mnt, root = mounted
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = random.Random(4)
    names = ["a", "b", "c", "d"]

    def paths(base: Path) -> list[Path]:
        return [p for p in base.rglob("*")]

    for step in range(60):
        op = rng.choice(["write", "append", "mkdir", "rm", "rename", "truncate", "chmod"])
        rel_dir = rng.choice([Path("."), *[p.relative_to(ref) for p in paths(ref) if p.is_dir()]])
        name = rng.choice(names)
        for base in (ref, mnt):
            target = base / rel_dir / name
            try:
                if op == "write":
                    target.write_bytes(bytes([step]) * (step * 331 % 9000))
                elif op == "append":
                    with open(target, "ab") as h:
                        h.write(b"+%d" % step)
                elif op == "mkdir":
                    target.mkdir()
                elif op == "rm":
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                elif op == "rename":
                    target.rename(base / rel_dir / names[step % len(names)])
                elif op == "truncate":
                    os.truncate(target, step * 7)
                elif op == "chmod":
                    target.chmod(0o600 + step % 2 * 0o44)
            except OSError:
                pass
        assert_same_tree(ref, mnt, times=False)
    grid.run("umount", str(mnt), check=True)
    grid.run("mount", root, str(mnt), check=True)
    assert_same_tree(ref, mnt, times=False)


def test_git_init_commit_clone_and_fsck(mounted, tmp_path: Path) -> None:
    _grid, mnt, _root = mounted
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    repo = mnt / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    for i in range(5):
        (repo / f"file{i}.txt").write_text(f"content {i}\n" * (i + 1))
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "first"], check=True, env=env)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "fsck", "--strict"], check=True, env=env, capture_output=True)
    assert (clone / "file4.txt").read_text() == "content 4\n" * 5


def test_sqlite_database_inside_the_mount(mounted) -> None:
    _grid, mnt, _root = mounted
    db = sqlite3.connect(mnt / "test.db")
    db.execute("create table t (k integer primary key, v text)")
    db.executemany("insert into t (v) values (?)", [(f"value {i}",) for i in range(500)])
    db.commit()
    db.close()
    db = sqlite3.connect(mnt / "test.db")
    assert db.execute("select count(*), max(v) from t").fetchone() == (500, "value 99")
    db.close()


def test_read_only_mount_refuses_writes(grid: LocalGrid, tmp_path: Path) -> None:
    grid.run("mkfs", "--alias", "ro1", check=True)
    grid.run("mkdir", "ro1:sub", check=True)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    grid.run("mount", "ro1", str(mnt), "--read-only", check=True)
    try:
        assert os.listdir(mnt) == ["sub"]
        with pytest.raises(OSError) as excinfo:
            (mnt / "new").write_text("x")
        assert excinfo.value.errno == 30  # EROFS
    finally:
        grid.run("umount", str(mnt), check=True)


def test_mount_shows_as_fuse_tahoefs_and_cap_prints_a_read_cap(mounted) -> None:
    grid, mnt, _root = mounted
    (mnt / "f").write_bytes(os.urandom(10000))
    line = next(line for line in Path("/proc/mounts").read_text().splitlines() if f" {mnt} " in line)
    assert line.split()[2] == "fuse.tahoefs"
    cap = grid.run("cap", str(mnt / "f"), check=True).stdout.decode().strip()
    assert cap.startswith("tahoefs:file:v1:")
    assert grid.get_bytes(cap) == (mnt / "f").read_bytes()
    dcap = grid.run("cap", str(mnt), check=True).stdout.decode().strip()
    assert dcap.startswith("tahoefs:dir-ro:v1:")
    fsync_folder(mnt)  # the directory change is durable in the journal; fsync puts it on the grid for others
    assert grid.run("ls", dcap, check=True).stdout.decode().split() == ["f"]


def test_mount_fails_fast_with_a_clear_line(grid: LocalGrid, tmp_path: Path) -> None:
    proc = grid.run("mount", "root-that-does-not-exist", str(tmp_path))
    assert proc.returncode == 2 and len(proc.stderr.decode().strip().splitlines()) == 1
    grid.run("mkfs", "--alias", "ff", check=True)
    proc = grid.run("mount", "ff", str(tmp_path / "missing"))
    assert proc.returncode == 2 and b"not an existing directory" in proc.stderr


def test_untar_of_a_source_tree_of_two_thousand_files_and_diff(mounted, tmp_path: Path) -> None:
    """A source-tree-sized tarball: 2,000 files of 0-12 KB (about a third kept inline, the rest uploaded
    one by one at close) in 40 folders two levels deep, extracted into the mount and compared."""
    _grid, mnt, _root = mounted
    src = tmp_path / "proj"
    rng = random.Random(7)
    for d in range(40):
        folder = src / f"pkg{d // 8}" / f"sub{d}"
        folder.mkdir(parents=True)
        for f in range(50):
            (folder / f"mod{f}.py").write_bytes(os.urandom(rng.randrange(0, 12000)))
    tarball = tmp_path / "proj.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(tmp_path), "proj"], check=True)
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(mnt)], check=True)
    proc = subprocess.run(["diff", "-r", str(src), str(mnt / "proj")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_reads_survive_seven_nodes_down_and_a_failed_cp_succeeds_after_nodes_return(
    mounted, tmp_path: Path
) -> None:
    grid, mnt, _root = mounted
    data = os.urandom(2 * MiB + 3)
    (mnt / "kept.bin").write_bytes(data)
    (mnt / "dir").mkdir()
    # close() promises `happy` (7) nodes; 3 chosen nodes hold shares of it only once its last PUTs,
    # which may linger after close(), are done. An fsync of the folder waits for those.
    fsync_folder(mnt)
    down = [0, 2, 3, 5, 6, 8, 9]
    grid.stop(*down)
    try:
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        assert (mnt / "kept.bin").read_bytes() == data
        assert os.listdir(mnt / "dir") == []
        src = tmp_path / "new.bin"
        src.write_bytes(os.urandom(MiB + 1))
        proc = subprocess.run(["cp", str(src), str(mnt / "dir" / "new.bin")], capture_output=True, text=True)
        assert proc.returncode != 0  # close() reports the failure
    finally:
        grid.start(*down)
    subprocess.run(["cp", str(src), str(mnt / "dir" / "new.bin")], check=True)
    assert (mnt / "dir" / "new.bin").read_bytes() == src.read_bytes()


def test_sigkill_of_the_daemon_mid_copy_loses_no_closed_file(mounted, tmp_path: Path) -> None:
    import json
    import signal
    import sys

    grid, mnt, root = mounted
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "for i in range(200):\n"
            "    data = bytes([i % 256]) * (i * 9973 % 300000)\n"
            "    with open(os.path.join(sys.argv[1], f'f{i}'), 'wb') as f:\n"
            "        f.write(data)\n"
            "    print(i, flush=True)\n",
            str(mnt),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert writer.stdout is not None
    closed = []
    for line in writer.stdout:
        closed.append(int(line))
        if len(closed) == 8:
            break
    state = next((grid.home / "mounts").glob("*[0-9a-f].json"))
    os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)
    closed += [int(line) for line in writer.stdout if line.strip()]
    writer.wait(timeout=60)
    subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    state.unlink(missing_ok=True)
    grid.run("mount", root, str(mnt), check=True)
    for i in closed:
        assert (mnt / f"f{i}").read_bytes() == bytes([i % 256]) * (i * 9973 % 300000), i
    for name in os.listdir(mnt):  # nothing refers to missing data
        (mnt / name).read_bytes()
    # close() promises `happy` nodes, not all n: the kill may cut a closed file's last PUTs. So every
    # object must verify and sit on at least `happy` nodes, and a repair must bring all to full health.
    check = grid.run("check", "--deep", "--verify", "--json", root)
    said = check.stdout.decode() + check.stderr.decode()
    lines = [json.loads(line) for line in check.stdout.decode().splitlines()]
    summary = lines[-1]["summary"]
    assert summary["lost"] == 0 and summary["unreadable"] == 0, said
    for checked in lines[:-1]:
        if checked["kind"] != "literal":
            assert not checked["corrupt"] and checked["happiness"] >= 7, checked
    grid.run("check", "--deep", "--repair", root, check=True)
    check = grid.run("check", "--deep", "--verify", root)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_a_file_unlinked_while_open_does_not_come_back_at_close(mounted) -> None:
    _grid, mnt, _root = mounted
    with open(mnt / "doomed", "wb") as f:
        f.write(os.urandom(10000))
        os.unlink(mnt / "doomed")
    assert not (mnt / "doomed").exists()
    assert os.listdir(mnt) == []
    with open(mnt / "renamed-while-open", "wb") as f:
        f.write(b"data" * 3000)
        os.rename(mnt / "renamed-while-open", mnt / "new-name")
    assert os.listdir(mnt) == ["new-name"]
    assert (mnt / "new-name").read_bytes() == b"data" * 3000


def test_content_whose_save_failed_is_saved_by_the_next_mount_after_a_crash(mounted, tmp_path: Path) -> None:
    import json
    import signal

    grid, mnt, root = mounted
    data = os.urandom(MiB + 7)
    down = [0, 1, 2, 3, 4]
    grid.stop(*down)
    try:
        with pytest.raises(OSError), open(mnt / "late.bin", "wb") as f:
            f.write(data)  # close() fails: too few nodes; the spool stays on disk, described
        state = next((grid.home / "mounts").glob("*[0-9a-f].json"))
        os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        state.unlink(missing_ok=True)
    finally:
        grid.start(*down)
    grid.run("mount", root, str(mnt), check=True)
    assert (mnt / "late.bin").read_bytes() == data
    assert list((grid.home / "spool").glob("*.data")) == []


def test_stale_listing_does_not_roll_back_a_newer_file_and_moved_dirs_stay_writable(mounted) -> None:
    _grid, mnt, _root = mounted
    (mnt / "g").write_bytes(b"v1")
    (mnt / "p1" / "sub").mkdir(parents=True)
    (mnt / "p2").mkdir()
    with os.scandir(mnt) as it:  # the listing snapshot is taken here
        (mnt / "g").write_bytes(b"v2")
        list(it)
    with open(mnt / "g", "ab") as f:
        f.write(b"+")
    assert (mnt / "g").read_bytes() == b"v2+"
    os.rename(mnt / "p1" / "sub", mnt / "p2" / "sub")
    (mnt / "p2" / "sub" / "x").mkdir()
    assert os.listdir(mnt / "p2" / "sub") == ["x"]


def test_a_second_writable_mount_of_the_same_tree_from_one_home_is_refused(mounted, tmp_path: Path) -> None:
    grid, _mnt, root = mounted
    other = tmp_path / "other"
    other.mkdir()
    proc = grid.run("mount", root, str(other))
    assert proc.returncode == 2 and b"already mounted" in proc.stderr, proc.stderr
    assert f" {other} " not in Path("/proc/mounts").read_text()


def test_long_names_get_enametoolong_and_create_nothing(mounted) -> None:
    import errno

    _grid, mnt, _root = mounted
    long_name = "x" * 256
    for action in (lambda p: p.write_bytes(b"x"), lambda p: p.mkdir(), lambda p: p.symlink_to("t")):
        with pytest.raises(OSError) as excinfo:
            action(mnt / long_name)
        assert excinfo.value.errno == errno.ENAMETOOLONG
    (mnt / ("y" * 255)).write_bytes(b"ok")  # the longest name allowed
    assert os.listdir(mnt) == ["y" * 255]


def test_mount_fails_fast_with_one_line_when_the_grid_is_unreachable(grid: LocalGrid, tmp_path: Path) -> None:
    grid.run("mkfs", "--alias", "unreach", check=True)
    mnt = tmp_path / "m"
    mnt.mkdir()
    everyone = list(range(10))
    grid.stop(*everyone)
    try:
        proc = grid.run("mount", "unreach", str(mnt), timeout=120)
    finally:
        grid.start(*everyone)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot read directory" in lines[0], lines
    assert f" {mnt} " not in Path("/proc/mounts").read_text()


def test_edits_of_a_large_file_fetch_lazily_and_stay_exact(mounted, tmp_path: Path) -> None:
    """Writes, reads, truncates and extends inside an open file whose old content is fetched chunk by
    chunk only where touched; compared byte for byte with the same edits on a local file."""
    _grid, mnt, _root = mounted
    base = os.urandom(5 * MiB + 333)
    (mnt / "big").write_bytes(base)
    (tmp_path / "big").write_bytes(base)
    rng = random.Random(11)
    with open(mnt / "big", "r+b") as a, open(tmp_path / "big", "r+b") as b:
        for step in range(40):
            op = rng.choice(["write", "read", "truncate"])
            size = os.fstat(b.fileno()).st_size
            if op == "write":
                off = rng.randrange(0, size + 1000)
                data = os.urandom(rng.choice([1, 100, MiB - 1, MiB + 5, 3000]))
                os.pwrite(a.fileno(), data, off)
                os.pwrite(b.fileno(), data, off)
            elif op == "read":
                off = rng.randrange(0, size + 10)
                n = rng.choice([1, 4096, MiB + 7])
                assert os.pread(a.fileno(), n, off) == os.pread(b.fileno(), n, off), step
            else:
                new = rng.randrange(0, size + 2 * MiB)
                os.ftruncate(a.fileno(), new)
                os.ftruncate(b.fileno(), new)
    assert (mnt / "big").read_bytes() == (tmp_path / "big").read_bytes()


def _size(path: Path) -> int:
    """Size of a file that may be deleted while we look (0 once gone)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_spool_files_are_reused_and_removed_at_unmount(mounted) -> None:
    """Writing many files one after another keeps at most SPOOL_POOL_FILES empty spool files around
    (reused, not made and deleted per file); unmount removes them."""
    import json

    from tahoefs.fs.spool import SPOOL_POOL_FILES

    grid, mnt, root = mounted
    state = next((grid.home / "mounts").glob("*[0-9a-f].json"))
    pid = json.loads(state.read_text())["pid"]
    mine = lambda: list((grid.home / "spool").glob(f"{pid}-*.data"))  # noqa: E731
    for i in range(3 * SPOOL_POOL_FILES):
        (mnt / f"f{i}").write_bytes(os.urandom(5000 + i))
    # close() returns after FLUSH; the kernel sends RELEASE (which gives the spool back) after that,
    # asynchronously, so the last file's spool may still be in use for a moment.
    deadline = time.monotonic() + 10
    while (len(mine()) > SPOOL_POOL_FILES or any(_size(p) for p in mine())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 0 < len(mine()) <= SPOOL_POOL_FILES
    assert all(_size(p) == 0 for p in mine())  # emptied when given back
    for i in range(3 * SPOOL_POOL_FILES):
        with open(mnt / f"f{i}", "r+b") as f:  # an edit: a spool from the pool, filled from the grid
            f.seek(10)
            f.write(b"edited")
    grid.run("umount", str(mnt), check=True)
    assert mine() == []
    grid.run("mount", root, str(mnt), check=True)
    for i in range(3 * SPOOL_POOL_FILES):
        data = (mnt / f"f{i}").read_bytes()
        assert len(data) == 5000 + i and data[10:16] == b"edited"
