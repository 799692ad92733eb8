"""The contender suite's data: a real file tree and a big random file, each in ext4 inside a
GPT disk image in a store served by nginx, with what every result is checked against.

The tree is a Debian root filesystem made by `debootstrap` (the tarball is cached in
/var/cache/backupfs-bench, so a rerun downloads nothing) or, with `tree_source`, a copy of
a local directory. Everything built lands in `work/`; a stamp file says what it was built
from, so reruns with the same parameters reuse it.
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import loop_mount, run_logged

from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec
from tests.support.mounting import sha256_file
from tests.support.system import unmount_under

MIB = 1 << 20
TREE_IMAGE = "bench-tree/2026-01-01T0000Z/disk0.img"
BIG_IMAGE = "bench-big/2026-01-01T0000Z/disk0.img"
BIG_NAME = "big.bin"
SAMPLE_SEED = 20261120
SAMPLE_FRACTION = 0.01
NEEDLE = "GNU General Public License"  # W4: grep -rF for this
DEBOOTSTRAP_SUITE = "bookworm"
# A server with the usual tools on top of debootstrap's base (which alone has ~8k files):
# gives the tree its 20k+ files, most of them small.
DEBOOTSTRAP_INCLUDE = (
    "python3,python3-pip,perl,vim,git,man-db,manpages,manpages-dev,locales,openssh-server,"
    "rsync,curl,ca-certificates,less,build-essential"
)
DEBOOTSTRAP_CACHE = Path("/var/cache/backupfs-bench")
STAMP_VERSION = 2


@dataclass(frozen=True)
class Manifest:
    """Regular files (relative path -> SHA-256) and symlinks (-> target) of a tree."""

    files: dict[str, str]
    sizes: dict[str, int]
    links: dict[str, str]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


@dataclass(frozen=True)
class Dataset:
    store: Path
    tree_source: str  # what the tree was made from, for the report
    tree: Manifest
    big_sha256: str
    big_bytes: int
    sample: list[str]  # W3: relative paths of a fixed-seed 1% sample of the tree's files
    grep_status: int  # W4 baseline: grep's exit status and sorted output on the source
    grep_lines: list[str]
    ls_lines: int  # W5 baseline: `ls -lR` lines on the source (see ls_line_count)
    # W6 baseline: len(tree.files); W7 baseline: du_baseline(), made lazily

    @property
    def sample_bytes(self) -> int:
        return sum(self.tree.sizes[rel] for rel in self.sample)


def scan_tree(root: Path) -> Manifest:
    found = scan_paths(root)
    files = {rel: root / rel for rel, (kind, _) in found.items() if kind == "f"}
    return Manifest(
        files={rel: sha256_file(path) for rel, path in files.items()},
        sizes={rel: path.stat().st_size for rel, path in files.items()},
        links={rel: target for rel, (kind, target) in found.items() if kind == "l"},
    )


def scan_paths(root: Path) -> dict[str, tuple[str, str]]:
    """Regular files ("f", "") and symlinks ("l", target) under root, by relative path."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*filenames, *dirnames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("l", os.readlink(path))
            elif path.is_file():
                out[rel] = ("f", "")
    return dict(sorted(out.items()))


def _run_in(root: Path, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, cwd=root, capture_output=True, timeout=timeout_s,
                          env={**os.environ, "LC_ALL": "C"})  # fmt: skip


def run_grep(root: Path, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """W4, on the source tree and on each contender's: `grep -rF NEEDLE .` in `root`."""
    return _run_in(root, ["grep", "-rF", NEEDLE, "."], timeout_s)


def grep_lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    return sorted(proc.stdout.decode("utf-8", "surrogateescape").splitlines())


def run_ls(root: Path, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """W5, on the source tree and on each contender's: `ls -lR .` in `root`."""
    return _run_in(root, ["ls", "-lR", "."], timeout_s)


def ls_line_count(proc: subprocess.CompletedProcess[bytes]) -> int:
    """Lines `ls -lR .` printed, without the `lost+found` that mkfs adds to an ext4 root
    (its entry in `.` and its own block), so the count matches the source tree's."""
    text = proc.stdout.decode("utf-8", "surrogateescape")
    blocks = [b for b in text.rstrip("\n").split("\n\n") if not b.startswith("./lost+found:\n")]
    lines = [line for b in blocks for line in b.split("\n")]
    root = blocks[0].split("\n") if blocks else []
    found = any(line.startswith("d") and line.endswith(" lost+found") for line in root)
    return len(lines) + len(blocks) - 1 - found


def run_find(root: Path, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """W6, on each contender's tree: `find . -type f | wc -l` in `root` (bash with pipefail:
    an error of find fails the pipeline)."""
    return _run_in(root, ["bash", "-o", "pipefail", "-c", "find . -type f | wc -l"], timeout_s)


def run_du(root: Path, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """W7, on each contender's tree and once on the image's own (du_baseline): `du -s .` in
    `root`, KiB allocated (st_blocks), each hard-linked inode once."""
    return _run_in(root, ["du", "-s", "."], timeout_s)


def first_number(proc: subprocess.CompletedProcess[bytes]) -> int | None:
    """The number a command printed first (`wc -l`'s count, `du -s`'s KiB), or None."""
    words = proc.stdout.split()
    return int(words[0]) if words and words[0].isdigit() else None


DU_CACHE = "dataset-du.json"  # next to dataset.json; not part of the dataset's stamp
_du_baselines: dict[str, int] = {}


def du_baseline(ds: Dataset) -> int:
    """W7's baseline: `du -s` of the tree's ext4 filesystem itself, the store's image file
    loop-mounted here as the contenders' image files are (the source tree is deleted once
    the image holds it, and a copy on another filesystem would allocate other sizes).
    Made the first time W7 runs on a dataset, kept in dataset-du.json next to dataset.json
    for as long as the image file stays the same (path, size, mtime): computing it lazily
    keeps it out of dataset.json and its stamp, so no existing dataset has to be rebuilt."""
    image = ds.store / TREE_IMAGE
    st = image.stat()
    key = f"{image.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key in _du_baselines:
        return _du_baselines[key]
    cache = ds.store.parent / DU_CACHE
    doc = _read_json(cache)
    if isinstance(doc, dict) and doc.get("image") == key and isinstance(doc.get("du_kib"), int):
        _du_baselines[key] = doc["du_kib"]
        return doc["du_kib"]
    say(f"du -s of the tree's filesystem in {image} (once; kept in {cache})")
    mnt = ds.store.parent / "du-baseline"
    with contextlib.ExitStack() as stack:
        mnt.mkdir(exist_ok=True)
        stack.callback(_rmdir_quietly, mnt)
        loop_mount(image, mnt, stack)
        proc = run_du(mnt, 3600)
    kib = first_number(proc)
    if proc.returncode or kib is None:
        raise RuntimeError(f"du -s failed on {image}: {proc.stderr.decode(errors='replace')}")
    cache.write_text(json.dumps({"image": key, "du_kib": kib}) + "\n")
    _du_baselines[key] = kib
    return kib


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # still mounted (unmount failed, and said so): keep it
        path.rmdir()


def pick_sample(manifest: Manifest) -> list[str]:
    files = sorted(manifest.files)
    count = max(1, round(len(files) * SAMPLE_FRACTION))
    return random.Random(SAMPLE_SEED).sample(files, count)


# --------------------------------------------------------------------------------------------
# the source tree


def debootstrap_tarball(mirror: str) -> Path:
    """A tarball of a fresh `debootstrap` root filesystem, made once and cached."""
    tag = hashlib.sha256(DEBOOTSTRAP_INCLUDE.encode()).hexdigest()[:8]
    tarball = DEBOOTSTRAP_CACHE / f"debootstrap-{DEBOOTSTRAP_SUITE}-amd64-{tag}.tar"
    if tarball.exists():
        return tarball
    DEBOOTSTRAP_CACHE.mkdir(parents=True, exist_ok=True)
    say(f"debootstrap {DEBOOTSTRAP_SUITE} from {mirror} (once; cached as {tarball})")
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=DEBOOTSTRAP_CACHE) as tmp:
        root = Path(tmp) / "root"
        try:
            run_logged(
                [
                    "debootstrap",
                    "--arch=amd64",
                    f"--include={DEBOOTSTRAP_INCLUDE}",
                    DEBOOTSTRAP_SUITE,
                    str(root),
                    mirror,
                ],
                timeout=3600,
            )
        finally:
            unmount_under(root)  # debootstrap mounts proc and sys inside; a failure may leave them
        partial = tarball.with_suffix(".tar.part")
        run_logged(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--acls",
                "-cf",
                str(partial),
                "-C",
                str(root),
                ".",
            ],
            timeout=3600,
        )
        partial.rename(tarball)
    return tarball


def make_source_tree(dest: Path, tree_source: str | None, mirror: str) -> None:
    """`dest` becomes a copy of the tree: debootstrap's root filesystem (without the .debs
    it leaves in apt's cache, as `apt-get clean` would), or `tree_source`."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if tree_source:
        run_logged(["cp", "-a", "--", f"{tree_source}/.", str(dest)], timeout=3600)
        return
    tarball = debootstrap_tarball(mirror)
    tar = ["tar", "--numeric-owner", "--xattrs", "--acls", "-xpf", str(tarball), "-C", str(dest)]
    run_logged([*tar, "--exclude=./var/cache/apt/archives/*.deb"], timeout=3600)


def make_big_file(path: Path, size_mib: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(0, size_mib, 16):
            chunk = os.urandom(16 * MIB)
            f.write(chunk)
            digest.update(chunk)
        f.truncate(size_mib * MIB)
    return sha256_file(path) if size_mib % 16 else digest.hexdigest()


# --------------------------------------------------------------------------------------------
# images and store


def _du(root: Path, flag: str) -> int:
    out = subprocess.run(["du", "-s", flag, str(root)], capture_output=True, text=True,
                         check=True, timeout=3600).stdout  # fmt: skip
    return int(out.split()[0])


def _disk_usage(root: Path) -> tuple[int, int]:
    """Bytes of disk used by the tree, and its number of inodes."""
    return _du(root, "--block-size=1"), _du(root, "--inodes")


def ext4_size_mib(root: Path) -> int:
    """Room for the tree's blocks plus ext4's metadata, and enough inodes at ext4's default
    of one inode per 16 KiB."""
    used, inodes = _disk_usage(root)
    return max(int(used * 1.15) // MIB + 96, inodes * 16384 * 5 // 4 // MIB + 16)


def build_store(store: Path, tree: Path, big_dir: Path) -> None:
    for image, source in ((TREE_IMAGE, tree), (BIG_IMAGE, big_dir)):
        path = store / image
        path.parent.mkdir(parents=True, exist_ok=True)
        say(f"building {path} (ext4 in GPT) from {source}")
        make_disk(path, "gpt", [PartSpec("ext4", ext4_size_mib(source), "bench", source)])
    run_logged([sys.executable, "-m", "backupfs", "index", str(store)], timeout=3600)


# --------------------------------------------------------------------------------------------


def prepare(work: Path, tree_source: str | None, big_mib: int, mirror: str) -> Dataset:
    """Build (or reuse) the source tree, the big file, the store and the baselines."""
    source = tree_source or f"debootstrap {DEBOOTSTRAP_SUITE} --include={DEBOOTSTRAP_INCLUDE}"
    stamp = {"version": STAMP_VERSION, "tree_source": source, "big_mib": big_mib}
    stamp_path, cache_path = work / "dataset-stamp.json", work / "dataset.json"
    tree, big_dir, store = work / "source" / "tree", work / "source" / "big", work / "store"
    if _read_json(stamp_path) != stamp or not cache_path.exists() or not store.exists():
        stamp_path.unlink(missing_ok=True)
        shutil.rmtree(store, ignore_errors=True)
        make_source_tree(tree, tree_source, mirror)
        say(f"writing a random {big_mib} MiB file")
        big_sha = make_big_file(big_dir / BIG_NAME, big_mib)
        build_store(store, tree, big_dir)
        say("hashing the source tree and running the grep / ls baselines on it")
        manifest = scan_tree(tree)
        grep = run_grep(tree, 7200)
        ls = run_ls(tree, 7200)
        if ls.returncode or grep.returncode not in (0, 1):
            raise RuntimeError(f"grep or ls -lR failed on {tree}: {(grep.stderr + ls.stderr)!r}")
        (work / DU_CACHE).unlink(missing_ok=True)  # du_baseline would see the new image anyway
        doc = {
            "files": manifest.files,
            "sizes": manifest.sizes,
            "links": manifest.links,
            "big_sha256": big_sha,
            "big_bytes": big_mib * MIB,
            "grep_status": grep.returncode,
            "grep_lines": grep_lines(grep),
            "ls_lines": ls_line_count(ls),
        }
        cache_path.write_text(json.dumps(doc))
        stamp_path.write_text(json.dumps(stamp))
        shutil.rmtree(work / "source")  # the images hold it; checks use the hashes above
    doc = json.loads(cache_path.read_text())
    manifest = Manifest(doc["files"], doc["sizes"], doc["links"])
    return Dataset(
        store=store,
        tree_source=tree_source or f"debootstrap {DEBOOTSTRAP_SUITE} + {DEBOOTSTRAP_INCLUDE}",
        tree=manifest,
        big_sha256=doc["big_sha256"],
        big_bytes=doc["big_bytes"],
        sample=pick_sample(manifest),
        grep_status=doc["grep_status"],
        grep_lines=doc["grep_lines"],
        ls_lines=doc["ls_lines"],
    )


def _read_json(path: Path) -> object:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return None


# --------------------------------------------------------------------------------------------
# checks of restored results


def check_files(expected: dict[str, str], found: dict[str, Path]) -> str | None:
    """Every expected file exists where `found` says and has its SHA-256."""
    missing = [rel for rel in expected if rel not in found or not found[rel].is_file()]
    if missing:
        return f"{len(missing)} files missing, e.g. {missing[0]}"
    wrong = [rel for rel, sha in expected.items() if sha256_file(found[rel]) != sha]
    if wrong:
        return f"{len(wrong)} files differ, e.g. {wrong[0]}"
    return None


def check_tree(manifest: Manifest, restored: Path) -> str | None:
    """`restored` holds exactly the manifest's files (by SHA-256) and symlinks; mkfs's empty
    lost+found may be there too."""
    if not restored.is_dir():
        return f"{restored} was not created"
    got = scan_paths(restored)
    extra = sorted(set(got) - set(manifest.files) - set(manifest.links))
    if extra:
        return f"{len(extra)} unexpected files, e.g. {extra[0]}"
    bad_links = [rel for rel, target in manifest.links.items() if got.get(rel) != ("l", target)]
    if bad_links:
        return f"{len(bad_links)} symlinks missing or wrong, e.g. {bad_links[0]}"
    return check_files(
        manifest.files, {rel: restored / rel for rel, (kind, _) in got.items() if kind == "f"}
    )


def dataset_arguments(parser: argparse.ArgumentParser, link_help: str) -> None:
    """The options of the benchmarks that restore from the suite's dataset."""
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--link", default="20@400", help=link_help)
    parser.add_argument("--tree-source", default=None, help="a directory instead of debootstrap")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--mirror", default="http://deb.debian.org/debian")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "suite",
                        help="the dataset's directory")  # fmt: skip


def say(text: str) -> None:
    print(f"[suite] {text}", file=sys.stderr, flush=True)
