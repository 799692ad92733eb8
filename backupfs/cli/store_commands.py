"""Commands on a store and its mounts: index, ls, mount, umount, stats."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from backupfs.cli.format import human, stats_lines
from backupfs.errors import EXIT_STORE, UsageError, UserError
from backupfs.linux.tools import failure_reason
from backupfs.options import MountOptions, parse_options, parse_size
from backupfs.store.chains import ParentMap
from backupfs.store.indexer import index_store
from backupfs.units import plural, utc

if TYPE_CHECKING:
    from backupfs.remote.discovery import Discovered
    from backupfs.remote.target import StoreTarget
    from backupfs.store.manifest import Catalogue


def cmd_index(args: argparse.Namespace) -> int:
    block_size = parse_size(args.block_size, "--block-size")
    skipped = 0

    def say(line: str) -> None:
        nonlocal skipped
        if line.startswith("skipped "):  # not an error: the rest is indexed, exit 0
            skipped += 1
            print(f"backupfs: {line}", file=sys.stderr, flush=True)
        else:
            print(line, flush=True)

    maps = [ParentMap.parse(m) for m in args.map_parent]
    if args.store.lower().startswith("s3://"):
        catalogue = _index_bucket(args, block_size, say, maps)
    else:
        if args.o:
            raise UsageError("-o applies to s3:// stores only")
        catalogue = index_store(Path(args.store), block_size, say=say, parent_maps=maps)
    disks = sum(len(s.disks) for s in catalogue.snapshots)
    tail = f"; {plural(skipped, 'file')} skipped (listed above)" if skipped else ""
    print(f"indexed {plural(len(catalogue.snapshots), 'snapshot')}, {plural(disks, 'disk')}{tail}")
    return 0


def _index_bucket(
    args: argparse.Namespace, block_size: int, say: Callable[[str], None], maps: list[ParentMap]
) -> "Catalogue":
    from backupfs.remote.bucket import Bucket
    from backupfs.remote.bucket_index import index_bucket
    from backupfs.remote.target import open_target

    opts = parse_options(args.o)
    target = open_target(args.store, opts)
    _warn(target.creds.warnings)
    bucket = Bucket(target, opts.timeout, opts.retries)
    start = time.monotonic()
    catalogue, hashed = index_bucket(bucket, block_size, opts.connections, say, maps)
    seconds = time.monotonic() - start
    if hashed:
        say(f"hashed {human(hashed)} in {seconds:.1f}s ({hashed / seconds / 1e6:.0f} MB/s)")
    return catalogue


def _warn(warnings: "Iterable[str]") -> None:
    for warning in warnings:
        print(f"backupfs: warning: {warning}", file=sys.stderr, flush=True)


def _discover(target: "StoreTarget", opts: MountOptions) -> "Discovered":
    """An unindexed store's catalogue, from its listing (remote/discovery.py)."""
    from backupfs.remote.bucket import Bucket
    from backupfs.remote.discovery import UNVERIFIED, discover

    _warn([UNVERIFIED])
    bucket = Bucket(target, opts.timeout, opts.retries)
    return discover(bucket, opts.connections, lambda line: print(line, file=sys.stderr))


def cmd_ls(args: argparse.Namespace) -> int:
    import trio

    from backupfs.remote.client import (
        ClientConfig,
        StoreClient,
        enlarge_socket_reads,
        make_clients,
    )
    from backupfs.remote.metadata import Listing, load_listing
    from backupfs.remote.target import open_target
    from backupfs.stats import Stats
    from backupfs.store.manifest import Catalogue

    opts = parse_options(args.o)
    if args.no_index:
        opts = dataclasses.replace(opts, no_index=True)
    target = open_target(args.url, opts)
    url, creds = target.url, target.creds
    _warn(creds.warnings)
    host = getattr(args, "host", None)
    if opts.no_index:
        found = _discover(target, opts).catalogue
        listing = Listing(Catalogue(tuple(s for s in found.snapshots if host in (None, s.host))))
    else:
        config = ClientConfig.from_options(opts, s3=creds.aws is not None)
        enlarge_socket_reads()

        async def fetch() -> Listing:
            async with make_clients(config, creds) as clients:
                return await load_listing(StoreClient(clients, url, config, Stats()), host)

        listing = trio.run(fetch)  # checked: names are UTF-8, times and sizes int64
    if host is not None and not listing.catalogue.snapshots and not listing.errors:
        raise UserError(f"no host {_shown(host)} in the store")
    _print_catalogue(listing.catalogue, args.json)
    for error in listing.errors:  # the hosts whose part is refused: the rest is listed
        print(f"backupfs: {error}", file=sys.stderr, flush=True)
    return EXIT_STORE if listing.errors else 0


def _print_catalogue(catalogue: "Catalogue", as_json: bool) -> int:
    rows: list[dict[str, str | int]] = [
        {
            "host": s.host,
            "snapshot": s.name,
            "time": utc(s.time_ns),
            "disk": d.name,
            "size_bytes": d.size_bytes,
        }
        for s in catalogue.snapshots
        for d in s.disks
    ]
    if as_json:  # json escapes control characters itself
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'HOST':<16} {'SNAPSHOT':<22} {'TIME (UTC)':<20} {'DISK':<16} {'SIZE':>10}")
    for r in rows:
        host, snap, disk = (_shown(str(r[k])) for k in ("host", "snapshot", "disk"))
        print(f"{host:<16} {snap:<22} {r['time']:<20} {disk:<16} {human(int(r['size_bytes'])):>10}")
    return 0


def _shown(name: str) -> str:
    """A store's name for a terminal: backslashes and non-printable characters (escape
    sequences, newlines, bidirectional overrides) escaped as Python's repr does."""
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in name)


def cmd_mount(args: argparse.Namespace) -> int:
    from backupfs.mount import daemon  # imports pyfuse3; keep other commands free of it
    from backupfs.remote.target import open_target

    opts = parse_options(args.o)
    if args.no_index:
        opts = dataclasses.replace(opts, no_index=True)
    target = open_target(args.url, opts)  # credentials read before the daemon forks
    url, creds = target.url, target.creds
    discovered = _discover(target, opts) if opts.no_index else None
    mountpoint = daemon.check_mountpoint(args.mountpoint, opts.nonempty)
    _warn(creds.warnings)
    if args.foreground:
        daemon.run_foreground(url, mountpoint, opts, creds, discovered)
    else:
        wait_s = opts.timeout * (opts.retries + 1) * 2 + 30
        daemon.run_background(url, mountpoint, opts, creds, wait_s, discovered)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from backupfs.attach import state as attach_state
    from backupfs.linux.holders import is_dead_mount, processes_using
    from backupfs.linux.mountinfo import top_fstype

    path = os.path.realpath(args.mountpoint)
    if top_fstype(path) != "fuse.backupfs":
        raise UserError(f"{args.mountpoint} is not a backupfs mount")
    lazy = ["-z"] if args.lazy else []
    proc = subprocess.run(
        ["fusermount3", "-u", *lazy, path], capture_output=True, text=True, timeout=60
    )
    if proc.returncode == 0:
        return 0
    if top_fstype(path) != "fuse.backupfs":  # gone meanwhile (another umount)
        return 0
    if is_dead_mount(path):
        holders = ", ".join(f"{pid} ({name})" for pid, name in processes_using(path))
        held = f", held open by {holders}" if holders else ""
        raise UserError(
            f"{args.mountpoint} is a dead backupfs mount (its daemon is gone){held}: "
            f"close those files, or `backupfs umount -l {args.mountpoint}` detaches it now "
            "and frees it when they close"
        )
    users = [a.target for a in attach_state.load_all() if a.image.startswith(path + os.sep)]
    if users:
        first = "; ".join(f"backupfs detach {t}" for t in users)
        raise UserError(f"{args.mountpoint} is busy: images in it are attached ({first} first)")
    if "busy" in proc.stderr.lower():
        raise UserError(
            f"{args.mountpoint} is busy: close what uses it (fuser -vm {args.mountpoint})"
        )
    raise UserError(f"cannot unmount {args.mountpoint}: {failure_reason(proc, 'fusermount3: ')}")


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
        print("\n".join(stats_lines(json.loads(text))))
    return 0
