"""Durable restore versus cp: `cp -a` without flush, `cp -a` then fsync of every file
(what `rsync --fsync` or a loop of `sync FILE` does), and `backupfs restore`.

    python3 bench/restore.py [--runs 3] [--tree DIR] [--big-mib 1024]

Sources are read from the page cache (each is read once before timing), so the table
shows the cost of writing and of making it durable. The target is a directory on the
filesystem of --work. Prints one table of medians.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TREE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def timed(argv: list[str] | str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, shell=isinstance(argv, str), check=True, stdout=subprocess.DEVNULL,
                   timeout=3600)  # fmt: skip
    return time.perf_counter() - start


def methods(src: Path, dest: Path) -> dict[str, list[str] | str]:
    return {
        "cp -a (no flush)": ["cp", "-a", str(src), str(dest)],
        "cp -a + fsync each file": (
            f"cp -a {src} {dest} && find {dest} -type f -print0 | xargs -0 -r sync --"
        ),
        "backupfs restore": [sys.executable, "-m", "backupfs", "restore", str(src), str(dest)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", default=str(DEFAULT_TREE), help="a real tree of 50k+ files")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--work", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()

    work = Path(args.work) / "restore"
    work.mkdir(parents=True, exist_ok=True)
    big = work / "big-src"
    if not (big / "big.bin").exists() or (big / "big.bin").stat().st_size != args.big_mib << 20:
        big.mkdir(exist_ok=True)
        with open(big / "big.bin", "wb") as f:
            subprocess.run(["head", "-c", f"{args.big_mib}M", "/dev/urandom"], check=True, stdout=f)
    tree = Path(args.tree)
    files = sum(1 for p in tree.rglob("*") if p.is_file())
    sources = {f"tree ({files} files)": tree, f"one {args.big_mib} MiB file": big}
    rows = []
    for label, src in sources.items():
        subprocess.run(["tar", "cf", "-", "-C", str(src), "."], stdout=subprocess.DEVNULL,
                       check=True)  # warm the page cache  # fmt: skip
        times: dict[str, list[float]] = {}
        for _ in range(args.runs):
            for name, argv in methods(src, work / "dest").items():
                shutil.rmtree(work / "dest", ignore_errors=True)
                subprocess.run(["sync"], check=True)
                times.setdefault(name, []).append(timed(argv))
        shutil.rmtree(work / "dest", ignore_errors=True)
        base = statistics.median(times["cp -a (no flush)"])
        for name, values in times.items():
            rows.append((label, name, statistics.median(values), statistics.median(values) / base))

    print(f"\nrestore to {work} (ext4 on the VM disk); median of {args.runs} runs")
    print(f"{'source':<22} {'method':<26} {'seconds':>8} {'vs cp -a':>9}")
    for label, name, secs, ratio in rows:
        print(f"{label:<22} {name:<26} {secs:>8.2f} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
