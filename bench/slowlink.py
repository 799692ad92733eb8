"""Slow links with default options: sequential read and `backupfs restore` through a
bandwidth-capped delaying proxy, as a fraction of the link and in bytes on the wire per
byte delivered.

    python3 bench/slowlink.py [--runs 1] [--links 20@10,20@50,20@400] [--mib 64]

Sequential: `dd bs=1M iflag=direct` of the first --mib MiB of a random image. Restore: a
directory of 8 files of --mib/8 MiB on an ext4 image, attached and restored with
`backupfs restore` (one syncfs at the end). Every run is cold (a fresh mount, caches
dropped). Wire bytes are what the proxy sent to the mount, headers included. Prints one
table of medians. Needs root, nginx, fuse3, mkfs.ext4.
"""

import argparse
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import LINK_HELP, drop_caches

from backupfs.store.indexer import index_store
from tests.support.attachment import attach_env, attached
from tests.support.mounting import mounted, run_cli
from tests.support.nginx import Nginx
from tests.support.proxy import DelayProxy

RAW = "bench/2026-01-01T0000Z/disk0.img"
FS = "bench/2026-01-01T0000Z/disk1.img"


def make_store(root: Path, mib: int) -> dict[str, str]:
    """The raw image (4 x --mib) and an ext4 image with 8 files; {file name: sha256}."""
    raw = root / RAW
    raw.parent.mkdir(parents=True, exist_ok=True)
    if not raw.exists() or raw.stat().st_size != 4 * mib << 20:
        with open(raw, "wb") as f:
            for _ in range(4 * mib):
                f.write(os.urandom(1 << 20))
    tree = root.parent / "tree"
    sums = {}
    tree.mkdir(exist_ok=True)
    for i in range(8):
        path = tree / f"f{i}.bin"
        if not path.exists() or path.stat().st_size != (mib << 20) // 8:
            path.write_bytes(os.urandom((mib << 20) // 8))
        sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    fs = root / FS
    fs.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(fs), f"{2 * mib + 16}M"],
                   check=True, timeout=300)  # fmt: skip
    index_store(root, say=lambda _: None)
    return sums


def sequential(url: str, mnt: Path, mib: int) -> float:
    with mounted(url, mnt):
        drop_caches()
        start = time.perf_counter()
        subprocess.run(["dd", f"if={mnt / RAW}", "of=/dev/null", "bs=1M", f"count={mib}",
                        "iflag=direct"], check=True, capture_output=True, timeout=3600)  # fmt: skip
        return time.perf_counter() - start


def restore(url: str, work: Path, sums: dict[str, str]) -> float:
    mnt, dest = work / "mnt", work / "dest"
    env = attach_env(work / "run")
    with mounted(url, mnt), attached(mnt / FS, work / "target", env) as att:
        drop_caches()
        start = time.perf_counter()
        result = run_cli("restore", str(att.target / "p0"), str(dest), env=env, timeout=3600)
        seconds = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
    for name, digest in sums.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest, name
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--links", default="20@10,20@50,20@400", help=LINK_HELP)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--work", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    work = Path(args.work) / "slowlink"
    store = work / "store"
    sums = make_store(store, args.mib)
    size = args.mib << 20
    rows = []
    with Nginx(store, work / "nginx") as nginx:
        for link in args.links.split(","):
            rtt, _, rate = link.partition("@")
            link_bps = float(rate) * 1e6 / 8
            for name in ("sequential", "restore"):
                times, wire = [], []
                for _ in range(args.runs):
                    with (
                        DelayProxy(nginx.port, rtt_ms=float(rtt), rate_mbit=float(rate)) as proxy,
                        tempfile.TemporaryDirectory(dir=work) as tmp,
                    ):
                        if name == "sequential":
                            (Path(tmp) / "mnt").mkdir()
                            times.append(sequential(proxy.url, Path(tmp) / "mnt", args.mib))
                        else:
                            (Path(tmp) / "mnt").mkdir()
                            times.append(restore(proxy.url, Path(tmp), sums))
                        wire.append(proxy.bytes_down / size)
                seconds = statistics.median(times)
                rows.append((link, name, seconds, size / seconds / link_bps,
                             statistics.median(wire)))  # fmt: skip
    print(f"\n{args.mib} MiB delivered per run, default mount options; median of {args.runs}")
    print("link = RTT_MS@MBIT through a delaying, rate-capped proxy; wire = bytes the proxy")
    print("sent (data, digests, metadata, headers) per byte delivered")
    print(f"{'link':<9} {'workload':<11} {'seconds':>8} {'of link':>8} {'wire/byte':>10}")
    for link, name, seconds, share, wire in rows:
        print(f"{link:<9} {name:<11} {seconds:>8.1f} {share:>8.0%} {wire:>10.3f}")


if __name__ == "__main__":
    main()
