"""Parallel readers over one loop clone versus spread over several.

    python3 bench/clones.py [--runs 3] [--links direct,20] [--source /usr/share]

A real file tree (default: this machine's /usr/share, 40k+ files) is put in an ext4 image
in a store, served by nginx, mounted with backupfs and attached. N readers each run
`tar cf - PART | cat >/dev/null` over a disjoint part of the tree, either all through
clone 0 or each through its own clone. Every run is cold: fresh mount, fresh attach,
dropped caches. Prints one table of medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LINK_HELP, drop_caches, link_url

from backupfs.store.indexer import index_store
from tests.support.mounting import mounted
from tests.support.nginx import Nginx

IMAGE = "tree/2026-01-01T0000Z/root.img"


def make_store(store: Path, source: Path) -> int:
    """An ext4 image of `source` in the store; returns the tree's size in bytes."""
    image = store / IMAGE
    if not image.exists():
        image.parent.mkdir(parents=True, exist_ok=True)
        size_mib = int(_du_bytes(source) * 1.4) // (1 << 20) + 256
        subprocess.run(
            ["mkfs.ext4", "-q", "-N", "200000", "-d", str(source), str(image), f"{size_mib}M"],
            check=True, timeout=1800,
        )  # fmt: skip
    index_store(store, say=lambda _: None)
    return _du_bytes(source)


def _du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def split_tree(root: Path, parts: int) -> list[list[str]]:
    """Top-level entries of `root` in `parts` groups of similar total size."""
    sizes = sorted(((_du_bytes(p), p.name) for p in root.iterdir()), reverse=True)
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(parts)]
    for size, name in sizes:
        total, names = min(groups, key=lambda g: g[0])
        groups.remove((total, names))
        groups.append((total + size, [*names, name]))
    return [names for _, names in groups if names]


def run_readers(roots: list[Path], groups: list[list[str]]) -> float:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            f"tar cf - -C {root} {' '.join(group)} | cat >/dev/null", shell=True,
            stderr=subprocess.DEVNULL,
        )
        for root, group in zip(roots, groups, strict=True)
    ]  # fmt: skip
    for p in procs:
        p.wait(timeout=3600)
    return time.perf_counter() - start


def one_run(url: str, work: Path, readers: int, clones: int, direct_io: bool) -> float:
    mnt, target = work / "mnt", work / "attached"
    mnt.mkdir(exist_ok=True)
    env = {**os.environ, "BACKUPFS_RUN_DIR": str(work / "run")}
    drop_caches()
    with mounted(url, mnt):
        attach = [sys.executable, "-m", "backupfs", "attach", "--clones", str(clones)]
        attach += ["--direct-io"] if direct_io else []
        subprocess.run([*attach, str(mnt / IMAGE), str(target)], env=env, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        try:
            status = subprocess.run(
                [sys.executable, "-m", "backupfs", "status", "--json"],
                env=env, check=True, capture_output=True, text=True,
            )  # fmt: skip
            mounts = sorted(json.loads(status.stdout)[0]["mounts"], key=lambda m: m["clone"])
            roots = [Path(mounts[i % clones]["path"]) for i in range(readers)]
            groups = split_tree(roots[0], readers)
            return run_readers(roots[: len(groups)], groups)
        finally:
            subprocess.run([sys.executable, "-m", "backupfs", "detach", str(target)], env=env,
                           check=True, capture_output=True, timeout=300)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--links", default="direct,20", help=LINK_HELP)
    parser.add_argument("--source", default="/usr/share")
    parser.add_argument("--work", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()

    store = Path(args.work) / "tree-store"
    tree_bytes = make_store(store, Path(args.source))
    configs = [(1, 1, False), (2, 1, False), (2, 2, False), (4, 1, False), (4, 2, False),
               (4, 4, False), (4, 4, True)]  # fmt: skip
    rows = []
    with Nginx(store, Path(args.work) / "tree-nginx") as nginx:
        for link in args.links.split(","):
            for readers, clones, direct_io in configs:
                times = []
                for _ in range(args.runs):
                    with link_url(nginx, link) as url, tempfile.TemporaryDirectory() as tmp:
                        times.append(one_run(url, Path(tmp), readers, clones, direct_io))
                rows.append((link, readers, clones, direct_io, statistics.median(times)))

    print(f"\ntar of {args.source} ({tree_bytes / 1e6:.0f} MB) in an attached ext4 image; "
          f"median of {args.runs} cold runs")  # fmt: skip
    print(f"{'link':<8} {'readers':>7} {'clones':>6} {'direct-io':>9} {'seconds':>8} {'MB/s':>6}")
    for link, readers, clones, dio, secs in rows:
        print(f"{link:<8} {readers:>7} {clones:>6} {'on' if dio else 'off':>9} "
              f"{secs:>8.1f} {tree_bytes / secs / 1e6:>6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
