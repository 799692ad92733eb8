"""Restore from virtual disks against the same disk raw: `backupfs restore` of the tree
and of the big file from (a) the raw GPT disk, (b) it converted to qcow2, (c) to
compressed qcow2, (d) the top of a 10-deep qcow2 chain whose increments each rewrite 1%
of the allocated clusters (with the same bytes, so the files stay checkable).

    python3 bench/vdisks.py [--runs 3] [--link 20@400] [--tree-source DIR] [--big-mib 1024]

The data is the contender suite's (bench/dataset.py: a debootstrap tree, or
--tree-source, and a random file, each ext4 in a GPT disk). Every run is cold: a fresh
mount, caches dropped. Prints medians of seconds, bytes fetched (data and digests) and the
daemon's CPU seconds per GB restored. Needs root, nginx, fuse3, qemu-img, qemu-io.
"""

import argparse
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import LINK_HELP, cpu_seconds, drop_caches, link_url, run_logged
from dataset import (
    BIG_IMAGE,
    BIG_NAME,
    TREE_IMAGE,
    Dataset,
    check_files,
    check_tree,
    dataset_arguments,
    prepare,
)

from tests.support.attachment import attach_env, attached
from tests.support.mounting import daemon_pids, mounted, read_stats, run_cli
from tests.support.nginx import Nginx

KINDS = ("raw", "qcow2", "qcow2-zlib", "chain-10")
CLUSTER = 64 << 10


@dataclass
class Row:
    kind: str
    workload: str
    seconds: float
    fetched: int
    cpu_s: float
    restored: int


def _allocated_clusters(raw: Path) -> list[int]:
    """Offsets of the clusters of `raw` that hold data (SEEK_DATA/SEEK_HOLE)."""
    out: list[int] = []
    size = raw.stat().st_size
    with open(raw, "rb") as f:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out += range(start // CLUSTER * CLUSTER, end, CLUSTER)
            pos = end
    return sorted(set(out))


def _chain(raw: Path, snaps: list[Path], name: str) -> None:
    """snaps[0]/name: qcow2 of `raw`; each next snapshot an overlay on the one before that
    rewrites 1% of the allocated clusters with the bytes they already hold."""
    run_logged(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(snaps[0] / name)],
               timeout=3600)  # fmt: skip
    clusters = _allocated_clusters(raw)
    rng = random.Random(14)
    with open(raw, "rb") as f, tempfile.TemporaryDirectory() as tmp:
        for n in range(1, len(snaps)):
            top = snaps[n] / name
            run_logged(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                        "-b", f"../{snaps[n - 1].name}/{name}", str(top)])  # fmt: skip
            commands = []
            for i, offset in enumerate(rng.sample(clusters, max(1, len(clusters) // 100))):
                src = Path(tmp) / f"c{i}"
                data = os.pread(f.fileno(), CLUSTER, offset)
                src.write_bytes(data)
                commands += ["-c", f"write -q -s {src} {offset} {len(data)}"]
            run_logged(["qemu-io", "-f", "qcow2", *commands, str(top)], timeout=3600)


def build(ds_store: Path, store: Path) -> None:
    """The four kinds of each dataset disk, in a store of their own."""
    if (store / "backupfs-store.json").exists():
        return
    shutil.rmtree(store, ignore_errors=True)
    for image in (TREE_IMAGE, BIG_IMAGE):
        raw, host = ds_store / image, image.split("/")[0]
        snaps = [store / f"{host}-chain" / f"2026-01-{d:02d}T0000Z" for d in range(1, 11)]
        for path in [store / f"{host}-{k}" / "2026-01-01T0000Z" for k in KINDS[:3]] + snaps:
            path.mkdir(parents=True, exist_ok=True)
        os.link(raw, store / f"{host}-raw" / "2026-01-01T0000Z" / "disk0.img")
        base = store / f"{host}-qcow2" / "2026-01-01T0000Z" / "disk0.qcow2"
        run_logged(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)],
                   timeout=3600)  # fmt: skip
        zlib = store / f"{host}-qcow2-zlib" / "2026-01-01T0000Z" / "disk0.qcow2"
        run_logged(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(zlib)],
                   timeout=3600)  # fmt: skip
        _chain(raw, snaps, "disk0.qcow2")
    run_logged(["python3", "-m", "backupfs", "index", str(store)], timeout=3600)


def _disk(kind: str, host: str) -> str:
    snap = "2026-01-10T0000Z" if kind == "chain-10" else "2026-01-01T0000Z"
    return f"{host}-{'chain' if kind == 'chain-10' else kind}/{snap}/disk0.img"


def run_one(url: str, work: Path, kind: str, workload: str, ds: Dataset) -> Row:
    mnt, dest = work / "mnt", work / "dest"
    mnt.mkdir()
    env = attach_env(work / "run")
    host = (TREE_IMAGE if workload == "tree" else BIG_IMAGE).split("/")[0]
    with mounted(url, mnt), attached(mnt / _disk(kind, host), work / "target", env) as att:
        pid = daemon_pids(mnt)[0]
        drop_caches()
        before, cpu0 = read_stats(mnt), cpu_seconds(pid)
        start = time.perf_counter()
        result = run_cli("restore", str(att.target / "p1"), str(dest), env=env, timeout=7200)
        seconds = time.perf_counter() - start
        after, cpu = read_stats(mnt), cpu_seconds(pid) - cpu0
        if result.returncode:
            raise RuntimeError(f"restore from {kind} failed: {result.stderr.strip()}")
    if workload == "tree":
        error, restored = check_tree(ds.tree, dest), ds.tree.total_bytes
    else:
        error = check_files({BIG_NAME: ds.big_sha256}, {BIG_NAME: dest / BIG_NAME})
        restored = ds.big_bytes
    if error:
        raise RuntimeError(f"{kind} {workload}: {error}")
    fetched = sum(after[k] - before[k] for k in ("bytes_fetched", "digest_bytes_fetched"))
    return Row(kind, workload, seconds, fetched, cpu, restored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_arguments(parser, LINK_HELP)
    parser.add_argument("--kinds", default=",".join(KINDS), help="a subset of " + ",".join(KINDS))
    parser.add_argument("--workloads", default="tree,big")
    args = parser.parse_args()
    ds = prepare(args.work, args.tree_source, args.big_mib, args.mirror)
    store = args.work / "vdisks-store"
    build(ds.store, store)
    rows: list[Row] = []
    with Nginx(store, args.work / "vdisks-nginx") as nginx:
        for workload in args.workloads.split(","):
            for kind in args.kinds.split(","):
                runs = []
                for _ in range(args.runs):
                    with (
                        link_url(nginx, args.link) as url,
                        tempfile.TemporaryDirectory(dir=args.work) as tmp,
                    ):
                        runs.append(run_one(url, Path(tmp), kind, workload, ds))
                runs.sort(key=lambda r: r.seconds)
                rows.append(runs[len(runs) // 2])
    print(f"\nrestore over {args.link} (RTT ms @ Mbit/s), median of {args.runs} cold runs")
    print(f"{'workload':<9} {'disk':<11} {'seconds':>8} {'vs raw':>7} {'fetched MB':>11} "
          f"{'CPU s/GB':>9}")  # fmt: skip
    raw = {r.workload: r for r in rows if r.kind == "raw"}
    for r in rows:
        ratio = r.seconds / raw[r.workload].seconds if r.workload in raw else float("nan")
        print(f"{r.workload:<9} {r.kind:<11} {r.seconds:>8.1f} {ratio:>7.2f} "
              f"{r.fetched / 1e6:>11.1f} {r.cpu_s / (r.restored / 1e9):>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
