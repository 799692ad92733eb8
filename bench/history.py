"""`backupfs log` and `diff` over a slow link, next to attaching each snapshot.

    python3 bench/history.py [--runs 3] [--link 20] [--snapshots 30] [--tree DIR] [--keep DIR]

Builds --snapshots ext4 images of the debootstrap tree (bench/dataset.py makes it; or
--tree): the first from the tree, each next one a copy of the one before with a few
files changed through a loop mount (/etc/ssh/sshd_config every fifth snapshot), and the
last one with 1 % of the files rewritten in place. Indexed, served by nginx behind the
delaying proxy. Then, medians of --runs:

- `backupfs log URL bench /etc/ssh/sshd_config --stats` (wall time, bytes fetched), and
  the alternative: mount the store, attach each snapshot in turn, stat the file, detach;
- `backupfs diff --stats` of the last two snapshots (wall time, bytes fetched, as a share
  of the image), and the alternative: attach both and `diff -rq` them; and what a walk of
  one snapshot alone fetches (`find` of a name that matches nothing), diff's floor.

Needs root, nginx, fuse3, e2fsprogs. Takes a while (the images are full copies).
"""

import argparse
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import LINK_HELP, ROOT, link_url, run_logged  # noqa: I001 (sets sys.path first)

from backupfs.store.indexer import index_store  # noqa: E402
from tests.support.fsimages import PartSpec, make_fs_image  # noqa: E402
from tests.support.mounting import mounted  # noqa: E402
from tests.support.nginx import Nginx  # noqa: E402
from tests.support.system import remove_tree  # noqa: E402

BACKUPFS = [sys.executable, "-m", "backupfs"]
LOGGED = "/etc/ssh/sshd_config"


@contextlib.contextmanager
def rw_mounted(image: Path, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    device = run_logged(["losetup", "-f", "--show", str(image)]).strip()
    try:
        run_logged(["mount", "-t", "ext4", device, str(where)])
        try:
            yield where
        finally:
            run_logged(["umount", str(where)])
    finally:
        run_logged(["losetup", "-d", device])


def build(work: Path, tree: Path, count: int, size_mib: int) -> tuple[Path, list[str], int]:
    store = work / "store"
    names = [f"2026-10-{d:02d}T0300Z" for d in range(1, count + 1)]
    first = store / "bench" / names[0] / "disk0.img"
    first.parent.mkdir(parents=True)
    print(f"[history] mke2fs -d of {tree}", file=sys.stderr)
    make_fs_image(first, PartSpec("ext4", size_mib, tree=tree))
    files = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
    rng = random.Random(1)
    for i, name in enumerate(names[1:], start=1):
        image = store / "bench" / name / "disk0.img"
        image.parent.mkdir(parents=True)
        previous = store / "bench" / names[i - 1] / "disk0.img"
        run_logged(["cp", "--sparse=always", str(previous), str(image)], timeout=600)
        with rw_mounted(image, work / "rw") as root:
            if i % 5 == 0:
                with open(root / LOGGED.lstrip("/"), "a") as f:
                    f.write(f"# changed in snapshot {i}\n")
            last = i == count - 1
            picks = rng.sample(files, max(1, len(files) // 100)) if last else rng.sample(files, 3)
            for path in picks:
                target = root / path.relative_to(tree)
                if target.is_file() and target.stat().st_size:
                    data = bytearray(target.read_bytes())
                    data[0] ^= 0xFF
                    with open(target, "r+b") as f:  # in place, as an update would
                        f.write(data)
        print(f"[history] snapshot {i + 1}/{count}", file=sys.stderr)
    index_store(store, say=lambda _: None)
    return store, names, size_mib << 20


def fetched(stderr: str) -> int:
    m = re.search(r"fetched (\d+) bytes", stderr)
    return int(m.group(1)) if m else -1


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{argv[:4]} exited {proc.returncode}: {proc.stderr[-500:]}")
    return time.monotonic() - start, proc.stderr


def attached_each(
    url: str, work: Path, step: Callable[[Path, dict[str, str]], None]
) -> tuple[float, int]:
    mnt, run_dir = work / "mnt", work / "run"
    mnt.mkdir(exist_ok=True)
    env = {**os.environ, "BACKUPFS_RUN_DIR": str(run_dir)}
    with mounted(url, mnt, "fill=off"):
        start = time.monotonic()
        step(mnt, env)
        seconds = time.monotonic() - start
        stats = run_logged([*BACKUPFS, "stats", "--json", str(mnt)])
    return seconds, int(json.loads(stats)["bytes_fetched"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--link", default="20", help=LINK_HELP)
    parser.add_argument("--snapshots", type=int, default=30)
    parser.add_argument("--size-mib", type=int, default=1536)
    parser.add_argument("--tree", default=str(Path(ROOT) / "bench/out/history/tree"))
    parser.add_argument("--keep", help="build the store here once and reuse it next time")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-history-"))
    try:
        store = work / "store"
        if args.keep and (store / "backupfs-store.json").exists():
            names = sorted(p.name for p in (store / "bench").iterdir())
            image_bytes = args.size_mib << 20
        else:
            store, names, image_bytes = build(work, Path(args.tree), args.snapshots, args.size_mib)
        rows: dict[str, list[float]] = {}
        with Nginx(store, work / "nginx") as nginx, link_url(nginx, args.link) as url:
            for _ in range(args.runs):
                s, err = timed([*BACKUPFS, "log", "--stats", url, "bench", LOGGED])
                rows.setdefault("log: backupfs log (s)", []).append(s)
                rows.setdefault("log: backupfs log (MB fetched)", []).append(fetched(err) / 1e6)
                a, b = names[-2], names[-1]
                s, err = timed([*BACKUPFS, "find", "--stats", url, f"bench/{a}", "no-such-name"])
                rows.setdefault("diff's part: a walk of one snapshot (% fetched)", []).append(
                    fetched(err) / image_bytes * 100
                )
                s, err = timed([*BACKUPFS, "diff", "--stats", url, f"bench/{a}", f"bench/{b}"])
                rows.setdefault("diff: backupfs diff (s)", []).append(s)
                share = fetched(err) / image_bytes * 100
                rows.setdefault("diff: backupfs diff (% of the image fetched)", []).append(share)

                def log_by_attach(mnt: Path, env: dict[str, str]) -> None:
                    for name in names:
                        target = work / "att"
                        run_logged([*BACKUPFS, "attach", str(mnt / "bench" / name / "disk0.img"),
                                    str(target)], env=env)  # fmt: skip
                        try:
                            run_logged(["sha256sum", str(target / "p0" / LOGGED.lstrip("/"))])
                        finally:
                            run_logged([*BACKUPFS, "detach", str(target)], env=env)

                def diff_by_attach(mnt: Path, env: dict[str, str]) -> None:
                    targets = [work / "att-a", work / "att-b"]
                    for name, target in zip(names[-2:], targets, strict=True):
                        run_logged([*BACKUPFS, "attach", str(mnt / "bench" / name / "disk0.img"),
                                    str(target)], env=env)  # fmt: skip
                    try:
                        pair = [str(t / "p0") for t in targets]
                        subprocess.run(["diff", "-rq", "--no-dereference", *pair],
                                       capture_output=True, timeout=3600)  # fmt: skip
                    finally:
                        for target in targets:
                            run_logged([*BACKUPFS, "detach", str(target)], env=env)

                s, got = attached_each(url, work, log_by_attach)
                rows.setdefault("log: attach each + sha256sum (s)", []).append(s)
                rows.setdefault("log: attach each + sha256sum (MB fetched)", []).append(got / 1e6)
                s, got = attached_each(url, work, diff_by_attach)
                rows.setdefault("diff: attach both + diff -rq (s)", []).append(s)
                rows.setdefault("diff: attach both + diff -rq (% fetched)", []).append(
                    got / image_bytes * 100
                )
        print(f"{args.snapshots} snapshots of {image_bytes >> 20} MiB, link {args.link}")
        print(f"{'measure':<48} {'median':>9}  runs")
        for name, values in rows.items():
            shown = " ".join(f"{v:.2f}" for v in values)
            print(f"{name:<48} {statistics.median(values):>9.2f}  {shown}")
    finally:
        if not args.keep:
            remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
