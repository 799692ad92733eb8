"""Durable restore versus cp: `cp -a` without flush, `cp -a` then fsync of every file
(what `rsync --fsync` or a loop of `sync FILE` does), and `backupfs restore`.

    python3 bench/restore.py [--runs 3] [--tree DIR] [--big-mib 1024] [--only tree,big,loop]

Sources are read from the page cache (read whole before each timed run), so the table
shows the cost of writing and of making it durable. The target is a directory on the
filesystem of --work. Sources: a real tree of small files; one large random file on the
target's own filesystem (where copy_file_range copies inside the kernel); and, as root,
the same file on a loop-mounted ext4 image, as a restore from an attachment reads it (a
copy between two filesystems: copy_file_range says EXDEV, and restore, like cp, reads and
writes 128 KiB at a time). Prints one table of medians. `backupfs restore` runs from
compiled bytecode, as installed (as_installed).
"""

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_TREE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def timed(argv: list[str] | str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, shell=isinstance(argv, str), check=True, stdout=subprocess.DEVNULL,
                   timeout=3600)  # fmt: skip
    return time.perf_counter() - start


def as_installed(prefix: Path) -> None:
    """Let `backupfs restore` run this checkout (PYTHONPATH: whatever else is installed),
    from compiled bytecode, as an installed copy does (pip compiles it at install time):
    where PYTHONDONTWRITEBYTECODE is set (this VM sets it), every run would compile its
    ~100 modules again, ~0.1 s of a 0.6 s restore. The bytecode goes to `prefix`
    (PYTHONPYCACHEPREFIX), not into the source tree, compiled once here."""
    checkout = Path(__file__).resolve().parent.parent
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(checkout / "backupfs")],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip


def warm(src: Path) -> None:
    """Read every file under `src` (or `src` itself), so the timed run reads the page cache.
    Before each run: a VM may page out cache left idle (DAMON's pageout here drops what
    was not read for a minute), and `tar cf - . >/dev/null` reads nothing (GNU tar knows
    /dev/null)."""
    buf = memoryview(bytearray(1 << 20))
    for path in [src] if src.is_file() else src.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def methods(src: Path, dest: Path) -> dict[str, list[str] | str]:
    return {
        "cp -a (no flush)": ["cp", "-a", str(src), str(dest)],
        "cp -a + fsync each file": (
            f"cp -a {src} {dest} && find {dest} -type f -print0 | xargs -0 -r sync --"
        ),
        "backupfs restore": [sys.executable, "-m", "backupfs", "restore", str(src), str(dest)],
    }


@contextlib.contextmanager
def loop_mounted(work: Path, big: Path) -> Iterator[Path | None]:
    """`big`'s directory in an ext4 image (made once, again when big.bin changed) mounted
    read-only through a loop device; None when not root."""
    if os.geteuid() != 0:
        print("not root: no loop-mounted source", file=sys.stderr)
        yield None
        return
    image, mnt = work / "big-loop.img", work / "loop-mnt"
    data = big / "big.bin"
    if not image.exists() or image.stat().st_mtime < data.stat().st_mtime:
        image.unlink(missing_ok=True)
        size_mib = data.stat().st_size * 107 // 100 // (1 << 20) + 64  # room for ext4's own
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(big), str(image), f"{size_mib}M"],
                       check=True)  # fmt: skip
    mnt.mkdir(exist_ok=True)
    if os.path.ismount(mnt):  # left by an interrupted run
        subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", default=str(DEFAULT_TREE), help="a real tree of 50k+ files")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--work", default=str(Path(__file__).parent / "out"))
    parser.add_argument("--only", default="tree,big,loop", help="which sources, comma-separated")
    parser.add_argument("--verbose", action="store_true", help="every run's time, on stderr")
    args = parser.parse_args()
    only = set(args.only.split(","))

    work = Path(args.work) / "restore"
    work.mkdir(parents=True, exist_ok=True)
    as_installed(work / "pycache")
    big = work / "big-src"
    if not (big / "big.bin").exists() or (big / "big.bin").stat().st_size != args.big_mib << 20:
        big.mkdir(exist_ok=True)
        with open(big / "big.bin", "wb") as f:
            subprocess.run(["head", "-c", f"{args.big_mib}M", "/dev/urandom"], check=True, stdout=f)
    rows = []
    with loop_mounted(work, big) if "loop" in only else contextlib.nullcontext() as loop:
        sources: dict[str, Path] = {}
        if "tree" in only:
            tree = Path(args.tree)
            files = sum(1 for p in tree.rglob("*") if p.is_file())
            sources[f"tree ({files} files)"] = tree
        if "big" in only:
            sources[f"one {args.big_mib} MiB file"] = big
        if loop is not None:
            sources[f"{args.big_mib} MiB, loop ext4"] = loop
        for label, src in sources.items():
            rows += measure(label, src, work / "dest", args.runs, args.verbose)

    print(f"\nrestore to {work} (ext4 on the VM disk); median of {args.runs} runs")
    print(f"{'source':<22} {'method':<26} {'seconds':>8} {'vs cp -a':>9}")
    for label, name, secs, ratio in rows:
        print(f"{label:<22} {name:<26} {secs:>8.2f} {ratio:>8.2f}x")


def measure(
    label: str, src: Path, dest: Path, runs: int, verbose: bool = False
) -> list[tuple[str, str, float, float]]:
    """Each method `runs` times, interleaved, from a clean DEST after a sync; medians. The
    order turns by one method each run, so none always runs right after the same other
    (on a VM the memory just freed by the previous DEST and the host's disk cache differ
    with what came before)."""
    times: dict[str, list[float]] = {name: [] for name in methods(src, dest)}
    for run in range(runs):
        order = list(methods(src, dest).items())
        for name, argv in order[run % len(order) :] + order[: run % len(order)]:
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            warm(src)
            times[name].append(timed(argv))
    shutil.rmtree(dest, ignore_errors=True)
    if verbose:
        for name, values in times.items():
            print(f"{label}, {name}: {' '.join(f'{v:.2f}' for v in values)}", file=sys.stderr)
    base = statistics.median(times["cp -a (no flush)"])
    return [(label, name, statistics.median(v), statistics.median(v) / base)
            for name, v in times.items()]  # fmt: skip


if __name__ == "__main__":
    main()
