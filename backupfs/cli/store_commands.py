"""Commands on a store and its mounts: index, ls, mount, umount, stats."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from backupfs.cli.format import human, stats_lines
from backupfs.errors import UserError
from backupfs.linux.tools import failure_reason
from backupfs.options import parse_options, parse_size
from backupfs.remote.credentials import load_credentials
from backupfs.store.indexer import index_store


def cmd_index(args: argparse.Namespace) -> int:
    block_size = parse_size(args.block_size, "--block-size")
    catalogue = index_store(Path(args.store), block_size, say=lambda m: print(m, flush=True))
    disks = sum(len(s.disks) for s in catalogue.snapshots)
    print(f"indexed {len(catalogue.snapshots)} snapshots, {disks} disks")
    return 0


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
            f"{human(int(r['size_bytes'])):>10}"
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
        raise UserError(f"cannot unmount {args.mountpoint}: {failure_reason(proc)}")
    return 0


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
