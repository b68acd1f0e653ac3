"""Entry point of the `tahoefs` command: argument parsing and the one place where errors become exit
codes (0 success, 1 operation failed, 2 bad usage or input) and one line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import trio

from tahoefs import __version__
from tahoefs.cli import home, localgrid, tree
from tahoefs.errors import TahoefsError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"tahoefs: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--grid", metavar="FILE", help="grid file (default: $TAHOEFS_HOME/grid.toml)")
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser = _Parser(
        prog="tahoefs", description="Files on a grid of half-trusted storage nodes.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"tahoefs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("node", parents=[common], help="run one storage node in the foreground")
    p.add_argument("--dir", required=True, type=Path, help="folder for the node's shares and identity")
    p.add_argument(
        "--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="address (default 127.0.0.1:0)"
    )
    p.add_argument(
        "--reserve-mib", type=int, default=None, help="refuse shares when free space falls below this"
    )
    p.add_argument("--max-share-mib", type=int, default=None, help="largest share accepted (default 1 TiB)")
    p.add_argument(
        "--tls", action="store_true", help="serve HTTPS with a self-signed certificate kept in DIR"
    )

    g = sub.add_parser("grid", parents=[common], help="manage the local grid and the grid file")
    gsub = g.add_subparsers(dest="grid_command", metavar="ACTION", parser_class=_Parser)
    gsub.required = True
    up = gsub.add_parser("up", parents=[common], help="start local nodes and write the grid file")
    up.add_argument("--nodes", type=int, default=None, help="how many nodes (default 10)")
    up.add_argument(
        "--tls", action="store_true", help="nodes serve HTTPS; the grid file pins their certificates"
    )
    gsub.add_parser("down", parents=[common], help="stop every local node")
    for name, text in (("stop", "stop local nodes by index"), ("start", "start local nodes by index")):
        q = gsub.add_parser(name, parents=[common], help=text)
        q.add_argument("indexes", type=int, nargs="+", metavar="I")
    st = gsub.add_parser("status", parents=[common], help="show the local nodes")
    st.add_argument("--json", action="store_true")
    add = gsub.add_parser("add", parents=[common], help="add a remote node to the grid file")
    add.add_argument("url")
    add.add_argument("token")
    add.add_argument(
        "--fingerprint", metavar="sha256:HEX", help="trust exactly this certificate (printed by 'node --tls')"
    )

    p = sub.add_parser("put", parents=[common], help="upload a file; print its read cap")
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("dest", nargs="?", metavar="DEST")
    p = sub.add_parser("get", parents=[common], help="download a file (verified bytes only)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("-o", "--output", metavar="FILE")
    p = sub.add_parser("mkfs", parents=[common], help="create an empty filesystem; save its root as an alias")
    p.add_argument("--alias", default="root", help="alias to save the root write cap as (default: root)")
    p = sub.add_parser("ls", parents=[common], help="list a directory on the grid")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("--json", action="store_true", help="a JSON array of entries")
    p = sub.add_parser(
        "alias", parents=[common], help="name a cap (e.g. a root cap brought from another machine)"
    )
    asub = p.add_subparsers(dest="alias_command", metavar="ACTION", parser_class=_Parser)
    asub.required = True
    q = asub.add_parser("add", parents=[common], help="save CAP as alias NAME")
    q.add_argument("name")
    q.add_argument("cap")
    asub.add_parser("list", parents=[common], help="show the aliases")
    p = sub.add_parser("mount", parents=[common], help="mount a filesystem (returns once it answers)")
    p.add_argument("args", nargs="+", metavar="[ALIAS|CAP] MOUNTPOINT")
    p.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--allow-other", action="store_true", help="let other users in (checked by permissions)")
    p = sub.add_parser("umount", parents=[common], help="unmount; waits for pending work and the daemon")
    p.add_argument("mountpoint", type=Path)
    p = sub.add_parser("status", parents=[common], help="mounts: uploads in flight, pending saves, errors")
    p.add_argument("mountpoint", nargs="?", type=Path)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("cap", parents=[common], help="print the read cap of a path inside a mount")
    p.add_argument("path", type=Path)
    p = sub.add_parser(
        "check", parents=[common], help="health of a file or tree: shares found, nodes, recoverable"
    )
    p.add_argument("target", metavar="TARGET", help="a cap, ALIAS:PATH, or a path inside a mount")
    p.add_argument("--verify", action="store_true", help="download and check every block of every share")
    p.add_argument("--repair", action="store_true", help="rebuild missing or corrupt shares")
    p.add_argument("--deep", action="store_true", help="walk the whole tree below a directory")
    p.add_argument("--json", action="store_true", help="JSON Lines: one object per line")
    p = sub.add_parser("mkdir", parents=[common], help="create a directory on the grid")
    p.add_argument("target", metavar="TARGET")
    return parser


def _cmd_node(args: argparse.Namespace) -> int:
    from tahoefs.storage.node_main import run_node

    mib = 1024 * 1024
    run_node(
        args.dir,
        args.listen,
        min_free_bytes=None if args.reserve_mib is None else args.reserve_mib * mib,
        max_share_bytes=None if args.max_share_mib is None else args.max_share_mib * mib,
        use_tls=args.tls,
    )
    return EXIT_OK


def _cmd_grid(args: argparse.Namespace) -> int:
    tahoefs_home = home.home_dir()
    action = args.grid_command
    if action == "up":
        nodes = localgrid.grid_up(tahoefs_home, home.grid_file(args.grid), args.nodes, tls=args.tls)
        print(f"{len(nodes)} nodes running under {localgrid.nodes_root(tahoefs_home)}")
        print(f"grid file: {home.grid_file(args.grid)}")
    elif action == "down":
        stopped = localgrid.grid_down(tahoefs_home)
        print(f"stopped {stopped} nodes")
    elif action == "stop":
        localgrid.stop_nodes(tahoefs_home, args.indexes)
    elif action == "start":
        localgrid.start_nodes(tahoefs_home, args.indexes)
    elif action == "status":
        rows = localgrid.grid_status(tahoefs_home)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_status(rows)
    elif action == "add":
        _grid_add(args)
    return EXIT_OK


def _print_status(rows: list[dict[str, object]]) -> None:
    if not rows:
        print("no local nodes (run 'tahoefs grid up')")
        return
    print(f"{'#':>3} {'url':<24} {'state':<8} {'pid':>7} {'shares':>7} {'MB':>9} {'free GB':>8}  dir")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if isinstance(r["bytes"], int) else "-"
        free = f"{r['free_bytes'] / 1e9:.1f}" if isinstance(r["free_bytes"], int) else "-"
        state = "running" if r["running"] else "stopped"
        pid = r["pid"] or "-"
        shares = "-" if r["shares"] is None else r["shares"]
        url = str(r["url"])
        print(f"{r['index']:>3} {url:<24} {state:<8} {pid!s:>7} {shares!s:>7} {mb:>9} {free:>8}  {r['dir']}")


def _grid_add(args: argparse.Namespace) -> None:
    import ssl

    import httpx

    from tahoefs import tls
    from tahoefs.grid.config import GridConfig, NodeConfig, load_grid, save_grid

    path = home.grid_file(args.grid)
    config = load_grid(path) if path.exists() else GridConfig()
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"node URL must start with http:// or https://, got {args.url!r}")
    pin = _fingerprint_option(args)
    node_id = ""
    try:
        # An https node without a pin is checked like any web site: against this machine's CAs.
        verify = ssl.create_default_context()
        if pin:
            der = tls.fetch_certificate(args.url, 5)
            if tls.fingerprint(der) != pin:
                raise UsageError(
                    f"node {args.url} presents a certificate that does not match --fingerprint: check the "
                    "fingerprint the node printed at start"
                )
            verify = tls.pinned_context(der)
        r = httpx.get(
            f"{args.url.rstrip('/')}/v1/version",
            headers={"authorization": f"Bearer {args.token}"},
            timeout=5,
            verify=verify,
        )
        if r.status_code == 401:
            raise UsageError(f"node {args.url} refused the token")
        node_id = str(r.json().get("node_id", ""))
    except (httpx.HTTPError, ValueError, OSError) as exc:
        if tls.certificate_failure(exc) is not None:
            raise UsageError(
                f"node {args.url} has a certificate no CA of this machine vouches for: give "
                "--fingerprint sha256:... (a node started with --tls prints it)"
            ) from None
        print(f"warning: node {args.url} did not answer; added anyway", file=sys.stderr)
    config.nodes = [n for n in config.nodes if n.url != args.url.rstrip("/")]
    config.nodes.append(NodeConfig(args.url.rstrip("/"), args.token, node_id, pin))
    save_grid(config, path)
    print(f"grid file {path} now lists {len(config.nodes)} nodes")


def _fingerprint_option(args: argparse.Namespace) -> str:
    from tahoefs import tls

    if args.fingerprint is None:
        return ""
    try:
        pin = tls.check_fingerprint(args.fingerprint)
    except ValueError as exc:
        raise UsageError(f"--fingerprint: {exc}") from None
    if not args.url.lower().startswith("https://"):
        raise UsageError("--fingerprint needs an https:// URL (the node must run with --tls)")
    return pin


def _cmd_put(args: argparse.Namespace) -> int:
    from tahoefs.cli import transfer

    config = home.load_grid_config(args.grid)
    if args.dest is not None:
        cap = trio.run(tree.put_at, config, home.client_secret(), args.file, args.dest)
    else:
        cap = trio.run(transfer.put, config, home.client_secret(), args.file)
    print(cap)
    return EXIT_OK


def _cmd_get(args: argparse.Namespace) -> int:
    from tahoefs.cli import transfer
    from tahoefs.formats.caps import LiteralCap, parse_cap

    src = args.src
    if not src.startswith("tahoefs:") or "/" in src:
        src = trio.run(tree.resolve_file, home.load_grid_config(args.grid), home.client_secret(), src)
    cap = parse_cap(src)  # bad caps fail before the grid file is even needed
    config = home.load_grid_config(args.grid) if not isinstance(cap, LiteralCap) else None
    problems = trio.run(transfer.get, config, home.client_secret(), src, args.output)
    for problem in problems:
        print(f"tahoefs get: warning: {problem}", file=sys.stderr)
    return EXIT_OK


def _cmd_mkfs(args: argparse.Namespace) -> int:
    existing = tree.load_aliases().get(args.alias)
    if existing:
        raise UsageError(f"alias {args.alias!r} already exists; choose another with --alias NAME")
    cap = trio.run(tree.mkfs, home.load_grid_config(args.grid), home.client_secret())
    tree.save_alias(args.alias, cap)
    print(cap)
    return EXIT_OK


def _cmd_ls(args: argparse.Namespace) -> int:
    problems = trio.run(
        tree.ls, home.load_grid_config(args.grid), home.client_secret(), args.target, args.long, args.json
    )
    for problem in problems:
        print(f"tahoefs ls: warning: {problem}", file=sys.stderr)
    return EXIT_OK


def _cmd_alias(args: argparse.Namespace) -> int:
    from tahoefs.formats.caps import DirReadCap, DirWriteCap, parse_cap

    if args.alias_command == "add":
        cap = parse_cap(args.cap)
        if not isinstance(cap, DirWriteCap | DirReadCap):
            raise UsageError("an alias names a directory: give a tahoefs:dir or tahoefs:dir-ro cap")
        tree.save_alias(args.name, str(cap))
    else:
        for name, cap in sorted(tree.load_aliases().items()):
            print(f"{name}: {cap}")
    return EXIT_OK


def _cmd_mkdir(args: argparse.Namespace) -> int:
    trio.run(tree.mkdir, home.load_grid_config(args.grid), home.client_secret(), args.target)
    return EXIT_OK


def _cmd_mount(args: argparse.Namespace) -> int:
    from tahoefs.formats.caps import DirReadCap, DirWriteCap, parse_cap
    from tahoefs.fs.mount import MountRequest, run_mount

    if len(args.args) > 2:
        raise UsageError("mount takes [ALIAS|CAP] MOUNTPOINT")
    source, mountpoint = args.args if len(args.args) == 2 else ["root", args.args[0]]
    if source.startswith("tahoefs:"):
        cap = parse_cap(source)
    else:
        aliases = tree.load_aliases()
        if source not in aliases:
            raise UsageError(f"no alias {source!r}: run 'tahoefs mkfs' or 'tahoefs alias add {source} CAP'")
        cap = parse_cap(aliases[source])
    if not isinstance(cap, DirWriteCap | DirReadCap):
        raise UsageError("mount needs a directory cap (tahoefs:dir or tahoefs:dir-ro)")
    request = MountRequest(
        home.load_grid_config(args.grid),
        home.client_secret(),
        cap,
        Path(mountpoint),
        home.home_dir(),
        args.read_only,
        args.allow_other,
    )
    run_mount(request, args.foreground)
    return EXIT_OK


def _cmd_umount(args: argparse.Namespace) -> int:
    from tahoefs.fs.mount import run_umount

    run_umount(home.home_dir(), args.mountpoint)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from tahoefs.fs.mount import mount_status

    rows = mount_status(home.home_dir())
    if args.mountpoint is not None:
        wanted = str(args.mountpoint.expanduser().absolute())
        rows = [r for r in rows if r["mountpoint"] == wanted]
        if not rows:
            raise UsageError(f"no tahoefs mount at {wanted}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no tahoefs mounts")
    for r in rows:
        st = r.get("status") or {}
        print(f"{r['mountpoint']}: pid {r['pid']} {'running' if r['alive'] else 'not running'}")
        for up in st.get("uploads", []):
            print(f"  uploading {up['target']}: {up['bytes_done'] / 1e6:.1f} MB done")
        if st.get("finishing_uploads"):
            print(f"  saved, last shares still being sent: {st['finishing_uploads']} files")
        for name in st.get("pending", []):
            print(f"  not yet saved: {name}")
        if st.get("pending_directory_changes"):
            print(
                f"  directory changes in the journal, not yet on the grid: {st['pending_directory_changes']}"
            )
        for err in st.get("journal_errors", []):
            print(f"  error: {err}")
        for err in st.get("errors", []):
            print(f"  error: {err}")
        for problem in st.get("problems", []):
            print(f"  node problem: {problem}")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from tahoefs.cli.health import check
    from tahoefs.grid.checker import Options

    options = Options(verify=args.verify, repair=args.repair)
    config = home.load_grid_config(args.grid)
    healthy = trio.run(check, config, home.client_secret(), args.target, options, args.deep, args.json)
    return EXIT_OK if healthy else EXIT_FAILED


def _cmd_cap(args: argparse.Namespace) -> int:
    from tahoefs.fs.mount import read_cap_of

    print(read_cap_of(args.path))
    return EXIT_OK


COMMANDS = {
    "mount": _cmd_mount,
    "umount": _cmd_umount,
    "status": _cmd_status,
    "cap": _cmd_cap,
    "check": _cmd_check,
    "node": _cmd_node,
    "grid": _cmd_grid,
    "put": _cmd_put,
    "get": _cmd_get,
    "mkfs": _cmd_mkfs,
    "ls": _cmd_ls,
    "mkdir": _cmd_mkdir,
    "alias": _cmd_alias,
}


def _tune_malloc(node: bool) -> None:
    """Fix glibc's malloc thresholds (a fixed threshold also stops glibc's dynamic adjustment).

    Client: buffers of 256 KiB and more (segments, blocks) are mmapped and go back to the OS when freed;
    without this they pile up in per-thread arenas and get's RSS crept ~16 MiB per 256 MiB read.
    Node: a 256 KiB threshold would map and fault in every 256 KiB socket read afresh (3.2 CPU-s per GiB
    received instead of 0.8, see docs/server-choice.md), so it keeps them on a heap that is not trimmed
    below 8 MiB."""
    if os.environ.get("TAHOEFS_MALLOC_DEFAULTS"):
        return  # for benchmarks comparing against glibc's defaults
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_trim_threshold, 8 * 1024 * 1024)
        libc.mallopt(m_mmap_threshold, (1024 if node else 256) * 1024)
        if not node:
            libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _tune_malloc(node=args.command == "node")
    try:
        code = COMMANDS[args.command](args)
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"tahoefs {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except TahoefsError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"tahoefs {args.command}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        print(f"tahoefs {args.command}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = EXIT_FAILED
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if args.debug:
            traceback.print_exc()
        print(
            f"tahoefs {args.command}: internal error: {type(exc).__name__}: {exc} (--debug shows details)",
            file=sys.stderr,
        )
        code = EXIT_FAILED
    sys.exit(code)
