"""Browsing through an attachment with and without the background fill: `grep -rF`,
`ls -lR`, `find -type f` over the whole tree, and `backupfs restore --files-from` of 1 %
of its files, each on a fresh mount with caches dropped (wall seconds from the start of
the mount to the end of the command), with `fill=off`, `fill=metadata` and `fill=auto`.

    python3 bench/fill.py [--runs 3] [--links 20,20@400] [--modes off,metadata,auto]

The data is the contender suite's tree disk (bench/dataset.py: a debootstrap tree in ext4
in a GPT disk; build it once with bench/suite.py or bench/vdisks.py). Prints medians of
seconds, bytes fetched and the daemon's CPU seconds. Needs root, nginx and fuse3.
"""

import argparse
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import LINK_HELP, cpu_seconds, drop_caches, link_url
from dataset import NEEDLE

from tests.support.attachment import attach_env, attached
from tests.support.mounting import daemon_pids, mounted, read_stats
from tests.support.nginx import Nginx

HERE = Path(__file__).resolve().parent
STORE = HERE / "out" / "suite" / "store"
DISK = "bench-tree/2026-01-01T0000Z/disk0.img"
WORKLOADS = ("grep -r", "ls -lR", "find", "restore 1%")


def _command(workload: str, root: Path, listing: Path, dest: Path) -> list[str]:
    if workload == "grep -r":
        return ["grep", "-rF", "-c", NEEDLE, "."]
    if workload == "ls -lR":
        return ["ls", "-lR", "."]
    if workload == "find":
        return ["find", ".", "-type", "f"]
    return ["python3", "-m", "backupfs", "restore", "--files-from", str(listing), ".", str(dest)]


def _listing(root: Path, path: Path) -> None:
    """1 % of the regular files, chosen with a fixed seed, relative to the tree's root."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                   and not p.is_symlink())  # fmt: skip
    path.write_text("\n".join(random.Random(1).sample(files, max(1, len(files) // 100))) + "\n")


def one_run(
    url: str, work: Path, mode: str, workload: str, listing: Path
) -> tuple[float, int, float]:
    drop_caches()
    mnt, target, dest = work / "mnt", work / "target", work / "dest"
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    mnt.mkdir(exist_ok=True)
    started = time.monotonic()
    with mounted(url, mnt, f"fill={mode}"):
        env = attach_env(work / "run")
        with attached(mnt / DISK, target, env, "--clones", "1"):
            root = target / "p1"
            argv = _command(workload, root, listing, dest)
            proc = subprocess.run(argv, cwd=root, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=3600, env=env)  # fmt: skip
            took = time.monotonic() - started
            if proc.returncode not in (0, 1) or (workload == "restore 1%" and proc.returncode):
                raise RuntimeError(f"{workload}: exit {proc.returncode}: {proc.stderr[-500:]!r}")
            fetched = int(read_stats(mnt)["bytes_fetched"])
            cpu = sum(cpu_seconds(pid) for pid in daemon_pids(mnt))
    return took, fetched, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--links", default="20,20@400", help=LINK_HELP)
    parser.add_argument("--modes", default="off,metadata,auto")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    if not (STORE / DISK).exists():
        raise SystemExit(f"no {STORE / DISK}: build the suite's dataset first (bench/suite.py)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bfs-fill-") as tmp:
        work = Path(tmp)
        listing = work / "listing"
        with Nginx(STORE, work / "nginx") as nginx:
            for link in args.links.split(","):
                with link_url(nginx, link) as url:
                    if not listing.exists():  # from a first attach, fill off
                        (work / "m0").mkdir()
                        with mounted(url, work / "m0", "fill=off"):
                            env = attach_env(work / "run")
                            with attached(work / "m0" / DISK, work / "t0", env):
                                _listing(work / "t0" / "p1", listing)
                    for workload in args.workloads.split(","):
                        for mode in args.modes.split(","):
                            runs = [one_run(url, work, mode, workload, listing)
                                    for _ in range(args.runs)]  # fmt: skip
                            medians = [statistics.median(col) for col in zip(*runs, strict=True)]
                            rows.append((link, workload, mode, *medians))
                            print(f"[fill] {link} {workload} fill={mode}: {rows[-1][3]:.2f} s",
                                  flush=True)  # fmt: skip
    print(f"\nmedians of {args.runs} cold runs through attach (wall s from mount to end)")
    print(f"{'link':8} {'workload':11} {'fill':9} {'seconds':>8} {'vs off':>7} "
          f"{'fetched MB':>11} {'daemon CPU s':>13}")  # fmt: skip
    off = {(r[0], r[1]): r[3] for r in rows if r[2] == "off"}
    for link, workload, mode, seconds, fetched, cpu in rows:
        ratio = f"{seconds / off[(link, workload)]:.2f}" if (link, workload) in off else "-"
        print(f"{link:8} {workload:11} {mode:9} {seconds:8.2f} {ratio:>7} "
              f"{fetched / 1e6:11.1f} {cpu:13.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
