"""A fleet's catalogue: mount time and the first listing of one host, for a store of
--hosts hosts × --snapshots snapshots in store format 3 (split by host) and, for
comparison, the same store's whole catalogue in format 2.

    python3 bench/catalogue.py [--runs 3] [--links 20] [--hosts 2000] [--snapshots 60]

The stores hold catalogue files only, and the one image a mount probes
(tests/support/fleet.py). "mount": from `backupfs mount -f` started to the mount ready
(READY=1), the daemon's start-up included. "ls host": `os.listdir` of one host's directory
right after, on a fresh mount (format 3: its part fetched then). Prints a table of the
medians of --runs runs. Needs root, nginx and fuse3.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import LINK_HELP, link_url

from tests.support.fleet import fleet_catalogue, host_name, write_fleet
from tests.support.mounting import mounted
from tests.support.nginx import Nginx

FORMATS = {"3 (split)": "v3", "2 (whole)": "v2"}


def one_run(url: str, mnt: Path, host: str) -> tuple[float, float]:
    start = time.monotonic()
    with mounted(url, mnt):
        ready = time.monotonic()
        names = os.listdir(mnt / host)
        listed = time.monotonic()
    if not names:
        raise RuntimeError(f"{host} listed empty")
    return ready - start, listed - ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--links", default="20", help=LINK_HELP)
    parser.add_argument("--hosts", type=int, default=2000)
    parser.add_argument("--snapshots", type=int, default=60)
    args = parser.parse_args()
    catalogue = fleet_catalogue(args.hosts, args.snapshots)
    host = host_name(min(42, args.hosts - 1))
    with tempfile.TemporaryDirectory(prefix="bench-catalogue-") as tmp:
        work = Path(tmp)
        for kind in FORMATS.values():
            write_fleet(work / "store" / kind, catalogue, whole=kind == "v2")
        sizes = {
            kind: (work / "store" / kind / "backupfs-store.json").stat().st_size
            for kind in FORMATS.values()
        }
        mnt = work / "mnt"
        mnt.mkdir()
        rows = []
        with Nginx(work / "store", work / "nginx") as nginx:
            for link in args.links.split(","):
                with link_url(nginx, link) as base:
                    for name, kind in FORMATS.items():
                        runs = [one_run(f"{base}{kind}/", mnt, host) for _ in range(args.runs)]
                        mount_s = statistics.median(r[0] for r in runs)
                        ls_s = statistics.median(r[1] for r in runs)
                        rows.append((link, name, sizes[kind], mount_s, ls_s))
    print(f"store: {args.hosts} hosts x {args.snapshots} snapshots; median of {args.runs} runs")
    print(f"{'LINK':<8} {'FORMAT':<10} {'TOP LEVEL':>10} {'MOUNT':>8} {'LS HOST':>8}")
    for link, name, size, mount_s, ls_s in rows:
        print(f"{link:<8} {name:<10} {size / 1e6:>8.2f}MB {mount_s:>7.2f}s {ls_s:>7.3f}s")


if __name__ == "__main__":
    main()
