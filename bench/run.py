"""Sequential-read benchmark: `dd bs=1M` of a 1 GiB image through a backupfs mount, next to
`curl` of the same image through the same delaying proxy, at several round-trip times.

    python3 bench/run.py [--runs 3] [--links direct,0,20,20@400] [--size-mib 1024]

A link is `direct` (nginx on loopback) or `RTT_MS[@MBIT]`: a delaying proxy with that
round-trip time and, optionally, a bandwidth cap.

Prints one table of medians; every run is cold (a fresh mount). Needs root, nginx, fuse3.
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import LINK_HELP, cpu_seconds, link_url, peak_rss_mib

from backupfs.options import parse_size
from backupfs.store.indexer import index_store
from tests.support.mounting import mounted
from tests.support.nginx import Nginx

IMAGE = "bench/2026-01-01T0000Z/disk0.img"


def make_store(root: Path, size_mib: int, block_size: int) -> None:
    path = root / IMAGE
    if not path.exists() or path.stat().st_size != size_mib << 20:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(size_mib // 16):
                f.write(os.urandom(16 << 20))
    index_store(root, block_size, say=lambda _: None)


def curl_mbps(url: str) -> float:
    out = subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.split()
    return int(out[0]) / float(out[1]) / 1e6


def mount_mbps(url: str, mnt: Path, options: list[str]) -> tuple[float, float, float, float]:
    """MB/s of dd through a fresh mount, the daemon's peak RSS (MiB), its CPU share and
    its CPU seconds per GB read."""
    with mounted(url, mnt, *options) as proc:
        cpu_before = cpu_seconds(proc.pid)
        start = time.perf_counter()
        subprocess.run(
            ["dd", f"if={mnt / IMAGE}", "of=/dev/null", "bs=1M"],
            capture_output=True,
            check=True,
            timeout=900,
        )
        elapsed = time.perf_counter() - start
        cpu_s = cpu_seconds(proc.pid) - cpu_before
        size = (mnt / IMAGE).stat().st_size
        return size / elapsed / 1e6, peak_rss_mib(proc.pid), cpu_s / elapsed, cpu_s / (size / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--links", default="direct,0,20,20@400", help=LINK_HELP)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--work", default=str(Path(__file__).parent / "out"))
    parser.add_argument("-o", action="append", default=[], help="extra mount options")
    parser.add_argument("--block-size", default="64K", help="the store's digest block size")
    args = parser.parse_args()

    work = Path(args.work)
    block_size = parse_size(args.block_size, "--block-size")
    store = work / f"store-{args.block_size}"
    make_store(store, args.size_mib, block_size)
    options = ",".join(args.o).split(",") if args.o else []
    rows = []
    with Nginx(store, work / "nginx") as nginx, tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        for link in args.links.split(","):
            curl, mount, rss, cpu, per_gb = [], [], [], [], []
            for _ in range(args.runs):
                with link_url(nginx, link) as url:
                    curl.append(curl_mbps(url + IMAGE))
                    mbps, peak, busy, secs_gb = mount_mbps(url, mnt, options)
                mount.append(mbps)
                rss.append(peak)
                cpu.append(busy)
                per_gb.append(secs_gb)
            rows.append(
                (
                    link,
                    statistics.median(curl),
                    statistics.median(mount),
                    max(rss),
                    statistics.median(cpu),
                    statistics.median(per_gb),
                )
            )

    print(f"\n1 GiB image, dd bs=1M through the mount vs curl; median of {args.runs} cold runs")
    print(f"store block size {args.block_size}; mount options: {','.join(options) or '(defaults)'}")
    print("link: direct = nginx on loopback; RTT_MS[@MBIT] = delaying proxy (RTT, link cap)")
    print("RSS: the daemon's peak; CPU: daemon CPU time / wall time during dd (2 cores here);")
    print("CPU s/GB: the daemon's CPU seconds per GB (1e9 bytes) read")
    print(
        f"{'link':<10} {'curl MB/s':>10} {'mount MB/s':>11} {'mount/curl':>11} "
        f"{'RSS MiB':>8} {'CPU':>5} {'CPU s/GB':>9}"
    )
    for name, c, m, r, u, g in rows:
        print(f"{name:<10} {c:>10.0f} {m:>11.0f} {m / c:>10.0%} {r:>8.0f} {u:>5.0%} {g:>9.2f}")


if __name__ == "__main__":
    main()
