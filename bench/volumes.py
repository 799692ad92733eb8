"""Restore through LVM and through NTFS against plain ext4: `backupfs restore` of

  LVM   the dataset's tree from (a) its ext4 partition of a GPT disk and (b) the very same
        ext4 filesystem (its bytes copied out of that partition) in a two-segment logical
        volume of a GPT disk's LVM physical volume, joined by the mount daemon; the
        target is (b) within 1.1x of (a);
  NTFS  (i) --small-files random files of 1-16 KiB (uniform sizes, random.Random seed
        SMALL_SEED, 100 to a directory) and (ii) one --big-mib MiB random file (seed
        BIG_SEED), each from an NTFS partition (mkntfs, filled through ntfs-3g; attached
        through ntfs3, or ntfs-3g where the kernel has no ntfs3) next to the same content
        in an ext4 partition (mkfs.ext4 -d), each partition 1 of a GPT disk.

    python3 bench/volumes.py [--runs 3] [--link 20@400] [--tree-source DIR]
                             [--big-mib 1024] [--small-files 10000]

The tree is the contender suite's (bench/dataset.py, under --work: debootstrap or
--tree-source); the rest is built under bench/out/volumes and reused while its inputs stay
the same. Every run is cold: a fresh mount through the link, caches dropped, a fresh DEST.
Every restore is checked (SHA-256 of every file; the tree also its symlinks and no extra
files); a mismatch aborts. Prints medians of seconds, MB/s, bytes fetched (data, digests)
and the daemon's CPU seconds per GB. Needs root, nginx, fuse3, lvm2 (used without
device-mapper), ntfs-3g (mkntfs), sfdisk, losetup.
"""

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common import LINK_HELP, cpu_seconds, drop_caches, link_url, run_logged
from dataset import (
    MIB,
    TREE_IMAGE,
    Manifest,
    check_files,
    check_tree,
    dataset_arguments,
    ext4_size_mib,
    prepare,
)

from backupfs.attach.fstypes import mount_type
from tests.support.attachment import attach_env, attached
from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec, blank_file, run_tool, sparse_copy
from tests.support.lvm_images import loop, lvm, pe_start, segments, write_volume
from tests.support.mounting import mounted, read_stats, run_cli
from tests.support.nginx import Nginx
from tests.support.system import is_mounted, remove_tree, unmount

OUT = Path(__file__).resolve().parent / "out" / "volumes"
SNAP = "2026-01-01T0000Z"
SECTOR, EXTENT, GAP_MIB = 512, 4 * MIB, 64
SMALL_SEED, BIG_SEED, BIG_NAME = 20260301, 20260302, "big.bin"
STAMP_VERSION = 1
LVM_PV = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # Windows' basic data partition
SFDISK = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never"]


def say(text: str) -> None:
    print(f"[volumes] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def scratch(parent: Path) -> Iterator[Path]:
    """A fresh directory, removed afterwards (refused while anything is mounted below it)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent))
    try:
        yield path
    finally:
        remove_tree(path)


def image(store: Path, host: str) -> Path:
    return store / host / SNAP / "disk0.img"


# --------------------------------------------------------------------------------------------
# building the disks


def gpt_disk(disk: Path, part_mib: int, type_guid: str) -> int:
    """A sparse GPT disk with one partition of `part_mib` at 1 MiB; returns its offset."""
    disk.parent.mkdir(parents=True, exist_ok=True)
    blank_file(disk, (part_mib + 2) * MIB)
    script = (
        f"label: gpt\nstart={MIB // SECTOR}, size={part_mib * MIB // SECTOR}, type={type_guid}\n"
    )
    run_tool([*SFDISK, str(disk)], stdin=script)
    return MIB


def first_partition(disk: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the disk's first partition, by `sfdisk --json`."""
    table = json.loads(run_tool(["sfdisk", "--json", str(disk)]))["partitiontable"]
    sector, part = int(table.get("sectorsize", SECTOR)), table["partitions"][0]
    return int(part["start"]) * sector, int(part["size"]) * sector


def extract(disk: Path, offset: int, size: int, dst: Path) -> None:
    """`size` bytes of `disk` from `offset` into a fresh sparse file (zero MiBs skipped)."""
    blank_file(dst, size)
    zeros = bytes(MIB)
    with open(disk, "rb") as fi, open(dst, "r+b") as fo:
        for pos in range(0, size, MIB):
            chunk = os.pread(fi.fileno(), min(MIB, size - pos), offset + pos)
            if chunk != zeros[: len(chunk)]:
                os.pwrite(fo.fileno(), chunk, pos)


def build_lvm(tree_disk: Path, disk: Path, tmp: Path) -> dict[str, object]:
    """The tree's ext4 partition, byte for byte, in vgbench/root: half of it, then the
    64 MiB volume `gap`, then the rest (lvextend), all on one physical volume."""
    offset, size = first_partition(tree_disk)
    fs_image = tmp / "tree.ext4"
    extract(tree_disk, offset, size, fs_image)
    fs_mib = -(-size // MIB)
    full, half = -(-fs_mib // 4) * 4, -(-fs_mib // 8) * 4
    pv_mib = full + GAP_MIB + 8
    part = gpt_disk(disk, pv_mib, LVM_PV)
    with loop(disk, part, pv_mib * MIB) as device:
        lvm("pvcreate", "-q", device)
        lvm("vgcreate", "-q", "-s", "4M", "vgbench", device)
        new = ["lvcreate", "-q", "-an", "-Zn", "-n"]
        lvm(*new, "root", "-L", f"{half}M", "vgbench")
        lvm(*new, "gap", "-L", f"{GAP_MIB}M", "vgbench")
        lvm("lvextend", "-q", "-L", f"{full}M", "vgbench/root")
        segs, start = segments("vgbench")["root"], part + pe_start(device)
    if len(segs) != 2 or sum(s.size for s in segs) < size:
        raise RuntimeError(f"vgbench/root came out as {segs}, not two segments of {size} B")
    write_volume(fs_image, segs, EXTENT, {device: (disk, start)})
    return {"fs_mib": fs_mib, "segments_mib": [[s.start // MIB, s.size // MIB] for s in segs]}


def make_small(root: Path, count: int) -> dict[str, str]:
    rng, sums = random.Random(SMALL_SEED), {}
    for i in range(count):
        rel = f"d{i // 100:03d}/f{i:05d}.bin"
        data = rng.randbytes(rng.randint(1024, 16384))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def make_big(root: Path, mib: int) -> dict[str, str]:
    rng, digest = random.Random(BIG_SEED), hashlib.sha256()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / BIG_NAME, "wb") as f:
        for _ in range(mib):
            chunk = rng.randbytes(MIB)
            f.write(chunk)
            digest.update(chunk)
    return {BIG_NAME: digest.hexdigest()}


@contextlib.contextmanager
def ntfs3g_mounted(fs: Path, mnt: Path) -> Iterator[Path]:
    """`ntfs-3g FILE DIR` read-write, kept in the foreground (no_detach) so that its exit
    after the umount says everything reached the file; ended by its PID if it hangs."""
    mnt.mkdir()
    with open(mnt.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(["ntfs-3g", "-o", "no_detach", str(fs), str(mnt)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                text = mnt.with_suffix(".log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ntfs-3g {fs} did not mount: {text}")
            time.sleep(0.05)
        yield mnt
    finally:
        try:
            unmount(mnt, attempts=5)
        finally:
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    if proc.returncode:
        raise RuntimeError(f"ntfs-3g {fs} exited with {proc.returncode}")


def build_ntfs(disk: Path, root: Path, tmp: Path) -> None:
    """An NTFS partition of a GPT disk holding `root`'s files (room for each file's
    clusters and MFT record, plus 25% and 64 MiB for NTFS's own files)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    clusters = sum(-(-p.stat().st_size // 4096) * 4096 + 4096 for p in files)
    size_mib = clusters * 5 // 4 // MIB + 64
    fs = tmp / "ntfs.img"
    blank_file(fs, size_mib * MIB)
    run_tool(["mkntfs", "-q", "-F", "-Q", "-L", "bench", "-p", str(MIB // SECTOR), str(fs)])
    with ntfs3g_mounted(fs, tmp / "ntfs.mnt") as mnt:
        shutil.copytree(root, mnt, dirs_exist_ok=True)
    sparse_copy(fs, disk, gpt_disk(disk, size_mib, BASIC_DATA))


def build(tree_disk: Path, store: Path, small_files: int, big_mib: int) -> dict[str, dict]:
    """The six disks, in a store of their own: each group rebuilt when its stamp changed."""
    doc_path, st = OUT / "build.json", tree_disk.stat()
    doc: dict[str, dict] = {}
    with contextlib.suppress(OSError, ValueError):
        doc = dict(json.loads(doc_path.read_text()))
    stamps: dict[str, dict[str, object]] = {
        "tree": {
            "disk": str(tree_disk),
            "inode": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        },
        "small": {"files": small_files, "seed": SMALL_SEED},
        "big": {"mib": big_mib, "seed": BIG_SEED},
    }
    hosts = {"tree": ("tree-gpt", "tree-lvm"), "small": ("small-ext4", "small-ntfs"),
             "big": ("big-ext4", "big-ntfs")}  # fmt: skip
    for group, stamp in stamps.items():
        stamp = {"version": STAMP_VERSION, **stamp}
        old = doc.get(group)
        if old and old["stamp"] == stamp and all(image(store, h).exists() for h in hosts[group]):
            continue
        doc.pop(group, None)
        doc_path.parent.mkdir(parents=True, exist_ok=True)
        doc_path.write_text(json.dumps(doc))  # not trusted again until rebuilt
        for host in hosts[group]:
            shutil.rmtree(store / host, ignore_errors=True)
        say(f"building the {group} disks in {store}")
        with scratch(OUT / "tmp") as tmp:
            if group == "tree":
                gpt = image(store, "tree-gpt")
                gpt.parent.mkdir(parents=True)
                os.link(tree_disk, gpt)  # the dataset's own disk, unchanged
                info: dict[str, object] = build_lvm(tree_disk, image(store, "tree-lvm"), tmp)
            else:
                src = tmp / "src"
                make = make_small if group == "small" else make_big
                info = {
                    "sums": make(src, small_files if group == "small" else big_mib),
                    "bytes": sum(p.stat().st_size for p in src.rglob("*") if p.is_file()),
                }
                ext4 = image(store, f"{group}-ext4")
                ext4.parent.mkdir(parents=True)
                make_disk(ext4, "gpt", [PartSpec("ext4", ext4_size_mib(src), "bench", src)])
                build_ntfs(image(store, f"{group}-ntfs"), src, tmp)
        doc[group] = {"stamp": stamp, **info}
        doc_path.write_text(json.dumps(doc))
    run_logged([sys.executable, "-m", "backupfs", "index", str(store)], timeout=3600)
    return doc


# --------------------------------------------------------------------------------------------
# measuring


@dataclass(frozen=True)
class Cell:
    test: str  # LVM or NTFS
    workload: str
    source: str
    host: str
    part: str  # what `backupfs attach` shows it as
    restored: int  # bytes
    check: Callable[[Path], str | None]
    baseline: bool = False


@dataclass
class Row:
    cell: Cell
    seconds: float
    fetched: int
    digests: int
    cpu_s: float
    status: str  # the partition's line of `backupfs status`


def run_one(url: str, work: Path, cell: Cell) -> Row:
    mnt, dest, env = work / "mnt", work / "dest", attach_env(work / "run")
    mnt.mkdir()
    with (
        mounted(url, mnt) as daemon,
        attached(image(mnt, cell.host), work / "target", env) as att,
    ):
        lines = run_cli("status", env=env).stdout.splitlines()
        status = next((x.strip() for x in lines if x.strip().startswith(f"{cell.part} ")), "?")
        drop_caches()
        before, cpu0 = read_stats(mnt), cpu_seconds(daemon.pid)
        start = time.perf_counter()
        result = run_cli("restore", str(att.target / cell.part), str(dest), env=env, timeout=7200)
        seconds = time.perf_counter() - start
        after, cpu = read_stats(mnt), cpu_seconds(daemon.pid) - cpu0
        if result.returncode:
            raise RuntimeError(f"restore from {cell.host} failed: {result.stderr.strip()}")
    error = cell.check(dest)
    if error:
        raise RuntimeError(f"{cell.host}: the restored files are wrong: {error}")
    fetched = {k: after[k] - before[k] for k in ("bytes_fetched", "digest_bytes_fetched")}
    return Row(
        cell, seconds, fetched["bytes_fetched"], fetched["digest_bytes_fetched"], cpu, status
    )


def cells(tree: Manifest, doc: dict[str, dict], args: argparse.Namespace) -> list[Cell]:
    def same_tree(dest: Path) -> str | None:
        return check_tree(tree, dest)

    def same_files(sums: dict[str, str]) -> Callable[[Path], str | None]:
        return lambda dest: check_files(sums, {rel: dest / rel for rel in sums})

    name, size = f"tree, {len(tree.files)} files", tree.total_bytes
    segs = "+".join(str(mib) for _, mib in doc["tree"]["segments_mib"])
    out = [
        Cell("LVM", name, "ext4, GPT partition", "tree-gpt", "p1", size, same_tree, True),
        Cell("LVM", name, f"ext4, LV {segs} MiB", "tree-lvm", "vgbench-root", size, same_tree),
    ]
    for group, name in (("small", f"{args.small_files} small files"),
                        ("big", f"one {args.big_mib} MiB file")):  # fmt: skip
        size, check = doc[group]["bytes"], same_files(doc[group]["sums"])
        out.append(Cell("NTFS", name, "ext4", f"{group}-ext4", "p1", size, check, True))
        out.append(Cell("NTFS", name, "ntfs", f"{group}-ntfs", "p1", size, check))
    return out


def dataset_big_mib(work: Path) -> int:
    """The big file the dataset was built with: not used here, so never a reason to rebuild."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((work / "dataset-stamp.json").read_text())["big_mib"])
    return 1024


def report(rows: list[Row], args: argparse.Namespace, tree_source: str) -> None:
    print(f"\nrestore over {args.link} (RTT ms @ Mbit/s), median of {args.runs} cold runs")
    print(f"{'test':<5} {'workload':<22} {'source':<24} {'seconds':>8} {'MB/s':>7} "
          f"{'ratio':>7} {'data MB':>8} {'digest MB':>9} {'CPU s/GB':>8}")  # fmt: skip
    base: dict[str, Row] = {}
    for r in rows:
        c = r.cell
        if c.baseline:
            base[c.workload] = r
        ratio = r.seconds / base[c.workload].seconds if c.workload in base else float("nan")
        print(f"{c.test:<5} {c.workload:<22} {c.source:<24} {r.seconds:>8.2f} "
              f"{c.restored / 1e6 / r.seconds:>7.1f} {ratio:>7.2f} {r.fetched / 1e6:>8.1f} "
              f"{r.digests / 1e6:>9.2f} {r.cpu_s / (c.restored / 1e9):>8.2f}")  # fmt: skip
    print("ratio: seconds over those of the workload's first row (ext4 on GPT; ext4)")
    lvm_rows = [r for r in rows if r.cell.test == "LVM"]
    if len(lvm_rows) == 2:
        ratio = lvm_rows[1].seconds / lvm_rows[0].seconds
        verdict = "met" if ratio <= 1.1 else "NOT met"
        print(f"\nLVM target, (b) LV within 1.1x of (a) GPT partition: {verdict} ({ratio:.2f}x)")
    print("\nparameters:")
    print(f"  command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"  link {args.link}, {args.runs} runs, tree from {tree_source} (dataset in {args.work})")
    print(f"  small files: {args.small_files}, 1-16 KiB, seed {SMALL_SEED}; big file: "
          f"{args.big_mib} MiB, seed {BIG_SEED}; builds in {OUT}")  # fmt: skip
    print(f"  kernel {platform.release()}, python {platform.python_version()}, "
          f"ntfs attached by {mount_type('ntfs')}")  # fmt: skip
    for r in rows:
        print(f"  {r.cell.host}: {r.status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_arguments(parser, LINK_HELP)
    parser.add_argument("--small-files", type=int, default=10000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("volumes: run as root (loop devices, mounts, lvm2, drop_caches)")
    ds = prepare(args.work, args.tree_source, dataset_big_mib(args.work), args.mirror)
    store = OUT / "store"
    doc = build(ds.store / TREE_IMAGE, store, args.small_files, args.big_mib)
    rows: list[Row] = []
    with Nginx(store, OUT / "nginx") as nginx:
        for cell in cells(ds.tree, doc, args):
            runs = []
            for n in range(args.runs):
                say(f"{cell.test} {cell.workload} from {cell.source}: run {n + 1}/{args.runs}")
                with link_url(nginx, args.link) as url, scratch(OUT / "runs") as work:
                    runs.append(run_one(url, work, cell))
            runs.sort(key=lambda r: r.seconds)
            rows.append(runs[len(runs) // 2])
    report(rows, args, ds.tree_source)


if __name__ == "__main__":
    main()
