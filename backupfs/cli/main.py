"""Command line: parse arguments, run a command, turn failures into one line and an exit code."""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from backupfs import __version__
from backupfs.errors import UserError
from backupfs.options import parse_options, parse_size
from backupfs.remote.credentials import load_credentials
from backupfs.store.indexer import DEFAULT_BLOCK_SIZE, index_store

# trio, httpx and pyfuse3 are imported by the commands that use them: attach, restore
# and the others start in half the time without them.

log = logging.getLogger("backupfs")


def cmd_index(args: argparse.Namespace) -> int:
    block_size = parse_size(args.block_size, "--block-size")
    catalogue = index_store(Path(args.store), block_size, say=lambda m: print(m, flush=True))
    disks = sum(len(s.disks) for s in catalogue.snapshots)
    print(f"indexed {len(catalogue.snapshots)} snapshots, {disks} disks")
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def cmd_ls(args: argparse.Namespace) -> int:
    import trio

    from backupfs.remote.client import (
        ClientConfig,
        StoreClient,
        check_base_url,
        enlarge_socket_reads,
        make_client,
    )
    from backupfs.remote.metadata import load_catalogue
    from backupfs.stats import Stats
    from backupfs.store.manifest import Catalogue

    url = check_base_url(args.url)
    opts = parse_options(args.o)
    creds = load_credentials(opts, url)
    for warning in creds.warnings:
        print(f"backupfs: warning: {warning}", file=sys.stderr)

    config = ClientConfig.from_options(opts)
    enlarge_socket_reads()

    async def fetch() -> Catalogue:
        async with make_client(config, creds) as client:
            return await load_catalogue(StoreClient(client, url, config, Stats()))

    catalogue = trio.run(fetch)
    rows: list[dict[str, str | int]] = [
        {
            "host": s.host,
            "snapshot": s.name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.time_ns // 10**9)),
            "disk": d.name,
            "size_bytes": d.size_bytes,
        }
        for s in catalogue.snapshots
        for d in s.disks
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'HOST':<16} {'SNAPSHOT':<22} {'TIME (UTC)':<20} {'DISK':<16} {'SIZE':>10}")
    for r in rows:
        print(
            f"{r['host']:<16} {r['snapshot']:<22} {r['time']:<20} {r['disk']:<16} "
            f"{_human(int(r['size_bytes'])):>10}"
        )
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from backupfs.mount import daemon  # imports pyfuse3; keep other commands free of it
    from backupfs.remote.client import check_base_url

    url = check_base_url(args.url)
    opts = parse_options(args.o)
    creds = load_credentials(opts, url)  # before the daemon forks and leaves the cwd
    mountpoint = daemon.check_mountpoint(args.mountpoint)
    for warning in creds.warnings:
        print(f"backupfs: warning: {warning}", file=sys.stderr, flush=True)
    if args.foreground:
        daemon.run_foreground(url, mountpoint, opts, creds)
    else:
        wait_s = opts.timeout * (opts.retries + 1) * 2 + 30
        daemon.run_background(url, mountpoint, opts, creds, wait_s)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    proc = subprocess.run(
        ["fusermount3", "-u", args.mountpoint], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise UserError(f"cannot unmount {args.mountpoint}: {reason}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from backupfs.attach import lifecycle as attach

    att = attach.attach(
        attach.AttachRequest(
            image=args.image,
            target=args.target,
            clones=args.clones,
            partition=args.partition,
            follow_symlinks=args.follow_symlinks,
            direct_io=args.direct_io,
        )
    )
    print("\n".join(attach.describe(att)))
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    from backupfs.attach import lifecycle as attach

    for target in args.targets:  # idempotent: nothing attached is not an error
        if not attach.detach(target):
            print(f"backupfs: nothing attached at {target}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from backupfs.attach import lifecycle as attach
    from backupfs.attach import state as attach_state

    attachments = attach_state.load_all()
    if args.json:
        json.dump([asdict(a) for a in attachments], sys.stdout, indent=1)
        print()
    elif not attachments:
        print("nothing attached")
    for att in [] if args.json else attachments:
        print("\n".join(attach.describe(att)))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from backupfs.restore.pipeline import RestoreOptions, restore

    existing = "overwrite" if args.overwrite else "skip" if args.skip_existing else "refuse"
    opts = RestoreOptions(
        jobs=args.jobs,
        flush=not args.no_flush,
        existing=existing,
        progress=sys.stderr.isatty() and not args.json,
        read_plan=not args.no_plan,
    )
    listed = None
    if args.files_from is not None:
        try:
            with sys.stdin if args.files_from == "-" else open(args.files_from) as f:
                listed = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise UserError(f"cannot read --files-from {args.files_from}: {exc.strerror}") from None
    out = restore(args.sources, args.dest, opts, listed)
    if args.json:
        json.dump(out.summary(), sys.stdout, indent=1)
        print()
    else:
        print(
            f"restored {out.files} files ({_human(out.bytes)}) in {out.seconds:.1f}s"
            + (f", {out.skipped} already there" if out.skipped else "")
        )
        for result in out.flush:
            print(f"flushed {result.line()}")
    for path, error in out.failed:
        print(f"backupfs: failed: {path}: {error}", file=sys.stderr)
    if out.failed:
        print(f"backupfs: {len(out.failed)} files failed, the rest was restored", file=sys.stderr)
    return 0 if out.ok else 1


def cmd_warm(args: argparse.Namespace) -> int:
    from backupfs.plan import readplan
    from backupfs.restore.walk import scan_paths

    sources = []
    for path in args.paths:
        if not os.path.exists(path):
            raise UserError(f"{path}: no such file or directory")
        source = readplan.source_of(path)
        if source is None:
            raise UserError(
                f"{path}: not in an attached ext2/3/4, xfs or vfat filesystem (see backupfs attach)"
            )
        sources.append((source, path))
    started = time.monotonic()
    tty = sys.stderr.isatty()

    def progress(fetched: int, total: int) -> None:
        if tty:
            pct = 100 * fetched // total if total else 100
            sys.stderr.write(f"\rwarming {_human(fetched)} of {_human(total)} ({pct}%) ")

    fetched_all = 0
    for source, path in sources:
        is_dir = os.path.isdir(path)
        # ext2/3/4: directories and inodes first, in parallel rounds (metaprefetch.py)
        walked = readplan.prefetch_metadata(path) if is_dir else None
        if walked is not None:
            fetched_all += walked.bytes_read
        if walked is not None and not walked.errors:
            if args.metadata:
                continue
            files = readplan.walked_files(path, walked)  # no second walk, no FIEMAP
        else:
            paths = scan_paths(path, files=not args.metadata) if is_dir else [path]
            files = [(p, readplan.WHOLE_FILE, 0) for p in paths]
        fetched, _, error = readplan.warm(source, files, progress)
        fetched_all += fetched
        if tty:
            sys.stderr.write("\n")
        if error is not None:
            raise UserError(f"warming {path}: {error}")
    print(f"warmed {_human(fetched_all)} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    from backupfs.restore.durability import flush_paths

    for path in args.paths:
        if not os.path.exists(path):
            raise UserError(f"{path}: no such file or directory")
    results = flush_paths(args.paths)
    for result in results:
        print(result.line())
    return 0 if all(r.error is None for r in results) else 1


def _ms(value: object) -> str:
    return "-" if value is None else f"{value} ms"


def _stats_lines(doc: dict[str, Any]) -> list[str]:
    hits, misses = doc["cache_hits"], doc["cache_misses"]
    rate = f" ({100 * hits / (hits + misses):.1f}% hits)" if hits + misses else ""
    windows = ", ".join(_human(w) for w in doc["readahead_windows"]) or "none open"
    return [
        f"store            {doc['store']}",
        f"served           {_human(doc['bytes_served'])}",
        f"fetched          {_human(doc['bytes_fetched'])} in {doc['requests']} requests"
        f" ({doc['requests_in_flight']} in flight, {doc['retries']} retries)",
        f"cache            {hits} hits, {misses} misses{rate}; {doc['blocks_in_cache']} blocks,"
        f" {_human(doc['cache_bytes'])} of {_human(doc['cache_max_bytes'])}",
        f"fetch latency    p50 {_ms(doc['fetch_p50_ms'])}, p99 {_ms(doc['fetch_p99_ms'])}",
        f"readahead        windows {windows} (max {_human(doc['readahead_max_bytes'])})",
        f"errors           {doc['verify_failures']} verification failures,"
        f" {doc['read_errors']} failed fetches",
    ]


def cmd_stats(args: argparse.Namespace) -> int:
    from backupfs.mount.control import CONTROL_DIR

    path = Path(args.mountpoint) / CONTROL_DIR / "stats"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{args.mountpoint} is not a backupfs mount") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if args.json:
        sys.stdout.write(text)
    else:
        print("\n".join(_stats_lines(json.loads(text))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backupfs", description="Browse and restore files from disk-image backups over HTTP."
    )
    parser.add_argument("--version", action="version", version=f"backupfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="write store metadata for STORE/<host>/<snapshot>/*.img")
    p.add_argument("store", metavar="STORE_DIR")
    p.add_argument(
        "--block-size",
        default=str(DEFAULT_BLOCK_SIZE),
        help="digest block size for newly hashed images (default 64K)",
    )
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("ls", help="list hosts, snapshots and disks of a store")
    p.add_argument("url", metavar="URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "-o",
        action="append",
        default=[],
        metavar="OPT,...",
        help="options as for mount (token_file=, timeout=, ...)",
    )
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("mount", help="mount a store as a read-only tree of disk images")
    p.add_argument("url", metavar="URL")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-o", action="append", default=[], metavar="OPT,...", help="mount options")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("attach", help="open a disk image's filesystems read-only at TARGET/p<K>")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("target", metavar="TARGET")
    p.add_argument(
        "--clones",
        type=int,
        default=4,
        help="loop devices per partition, for parallel readers (default 4)",
    )
    p.add_argument("--partition", type=int, metavar="K", help="attach only partition K")
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="let paths follow symlinks inside the backup (default: nosymfollow)",
    )
    p.add_argument("--direct-io", action="store_true", help="loop devices with direct I/O")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("detach", help="undo an attach (also after a crashed attach)")
    p.add_argument("targets", nargs="+", metavar="TARGET")
    p.set_defaults(func=cmd_detach)

    p = sub.add_parser("status", help="list attachments")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("restore", help="copy files out of a backup durably, in parallel")
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("dest", metavar="DEST")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="parallel readers (default: 4, or one per loop clone if more)",
    )
    p.add_argument("--no-flush", action="store_true", help="skip the final syncfs")
    p.add_argument(
        "--files-from",
        metavar="FILE",
        help="restore the paths listed in FILE (relative to the one SRC; - for stdin) "
        "at the same relative paths under DEST",
    )
    p.add_argument(
        "--no-plan",
        action="store_true",
        help="no read plans: neither the metadata walk nor the data plan (plain readahead)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="restore into a non-empty DEST, replacing every file",
    )
    group.add_argument(
        "--skip-existing",
        action="store_true",
        help="restore into a non-empty DEST, leaving existing names alone",
    )
    p.add_argument("--json", action="store_true", help="a JSON summary on stdout")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("warm", help="fetch the data under PATH (in an attachment) into the cache")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--metadata",
        action="store_true",
        help="only directories and inodes (before ls -lR, find, du), not file contents",
    )
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("flush", help="make files under PATH durable (after cp or rsync)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_flush)

    p = sub.add_parser("umount", help="unmount a backupfs mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("stats", help="show a mount's counters (MOUNTPOINT/.backupfs/stats)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="the raw JSON document")
    p.set_defaults(func=cmd_stats)
    return parser


def _as_mount_helper(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`backupfs SOURCE DIR -o OPTS`, as mount.fuse3 runs it, means `backupfs mount ...`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = cast(dict[str, argparse.ArgumentParser], sub.choices)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        return ["mount", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_as_mount_helper(parser, sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="backupfs: %(message)s")
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"backupfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `backupfs ls | head`
        return 0
    except KeyboardInterrupt:
        print("backupfs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback in the log
        log.debug("internal error", exc_info=True)
        print(f"backupfs: internal error: {exc!r}", file=sys.stderr)
        return 70
