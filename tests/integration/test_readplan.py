"""Read plans: FIEMAP extents of attached files, `restore` with a plan, `backupfs warm`."""

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.plan import metaprefetch, readplan
from tests.support import attachment
from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec
from tests.support.kernel import needs_filesystems
from tests.support.mounting import read_stats, run_cli, sha256_file
from tests.support.system import remove_tree
from tests.support.trees import make_tree

pytestmark = needs_filesystems("ext4", "xfs")

SNAP = "db01/2026-11-22"
DISK = "disk0.img"


@dataclass
class Attached:
    image: Path  # the image file in the store (nginx serves it)
    mnt: Path
    target: Path
    env: dict[str, str]
    trees: dict[int, dict[str, str]]  # partition -> {path: sha256}


@pytest.fixture(scope="module")
def attached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attached]:
    work = tmp_path_factory.mktemp("readplan")
    try:
        yield from _attach_disk(work)
    finally:
        remove_tree(work)


def _attach_disk(work: Path) -> Iterator[Attached]:
    store = work / "store"
    (store / SNAP).mkdir(parents=True)
    trees, specs = {}, []
    for number, fstype in ((1, "ext4"), (2, "xfs")):
        root = work / f"tree{number}"
        trees[number] = make_tree(root, seed=number, files=60, special=False)
        specs.append(PartSpec(fstype, 300, tree=root))
    make_disk(store / SNAP / DISK, "gpt", specs)
    env = attachment.attach_env(work / "run")
    with (
        attachment.served_store(store, work, "cache_size=256M") as served,
        attachment.attached(
            served.image(f"{SNAP}/{DISK}"), work / "target", env, "--clones", "2"
        ) as att,
    ):
        yield Attached(store / SNAP / DISK, served.mnt, att.target, att.env, trees)


@pytest.fixture
def run_dir(attached: Attached, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPFS_RUN_DIR", attached.env["BACKUPFS_RUN_DIR"])


def test_warm_metadata_makes_a_listing_cheap(attached: Attached) -> None:
    subtree = attached.target / "p1"  # the first test: nothing read its metadata before
    before = read_stats(attached.mnt)
    result = run_cli("warm", "--metadata", str(subtree), env=attached.env)
    assert result.returncode == 0, result.stderr
    warmed = read_stats(attached.mnt)
    assert warmed["bytes_fetched"] > before["bytes_fetched"]
    listing = subprocess.run(["ls", "-lR", str(subtree)], capture_output=True, text=True)
    assert listing.returncode == 0 and "docs/old:" in listing.stdout
    listed = read_stats(attached.mnt)
    # ls -lR through clone 0 reads what the scan read (partly through other clones).
    assert listed["bytes_fetched"] == warmed["bytes_fetched"]


@pytest.mark.parametrize("partition", [1, 2], ids=["ext4", "xfs"])
def test_plan_extents_are_the_file_bytes_in_the_image(
    attached: Attached, run_dir: None, partition: int
) -> None:
    root = attached.target / f"p{partition}"
    source = readplan.source_of(str(root))
    assert source is not None and source.image == f"{SNAP}/{DISK}"
    mapped = 0
    with open(attached.image, "rb") as image:
        for rel, digest in attached.trees[partition].items():
            path = root / rel
            size = path.stat().st_size
            ranges = list(readplan.image_ranges(source, [(str(path), size, 0)]))
            data = hashlib.sha256()
            for start, end in ranges:
                image.seek(start)
                data.update(image.read(end - start))
            assert sum(e - s for s, e in ranges) == size, rel
            assert data.hexdigest() == digest, rel
            mapped += bool(ranges)
    assert mapped >= len(attached.trees[partition]) - 1  # all but the empty file


def test_extents_read_from_the_inodes_are_the_file_bytes_in_the_image(
    attached: Attached, run_dir: None
) -> None:
    """ext4: the metadata prefetch learns extents from the inodes, and plans use them
    instead of FIEMAP; they must point at the same bytes."""
    root = attached.target / "p1"
    source = readplan.source_of(str(root))
    assert source is not None
    known = readplan.KnownExtents()
    walked = readplan.prefetch_metadata(str(root), known=known)
    assert walked is not None and walked.errors == []
    learnt = 0
    with open(attached.image, "rb") as image:
        for rel, digest in attached.trees[1].items():
            st = (root / rel).stat()
            found = walked.files[st.st_ino]
            assert (found.rel, found.size) == (os.fsencode(rel), st.st_size)
            learnt += found.extents is not None
            ranges = list(
                readplan.image_ranges(source, [("/nonexistent", st.st_size, st.st_ino)], known)
            )
            data = hashlib.sha256()
            for start, end in ranges:
                image.seek(start)
                data.update(image.read(end - start))
            if walked.files[st.st_ino].extents is not None:
                assert data.hexdigest() == digest, rel
    assert learnt == len(attached.trees[1])


def test_restore_sends_a_plan_and_restores_identical_files(
    attached: Attached, tmp_path: Path
) -> None:
    before = read_stats(attached.mnt)
    dest = tmp_path / "out"
    result = run_cli("restore", "--json", str(attached.target / "p1"), str(dest), env=attached.env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    tree = attached.trees[1]
    assert summary["files"] == len(tree) and summary["planned_bytes"] > 0
    for rel, digest in tree.items():
        assert sha256_file(dest / rel) == digest, rel
    after = read_stats(attached.mnt)
    assert after["plan_bytes"] - before["plan_bytes"] >= summary["planned_bytes"] // 2

    plain = run_cli(
        "restore", "--json", "--no-plan", str(attached.target / "p1"), str(tmp_path / "again"),
        env=attached.env,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["planned_bytes"] == 0


def test_restore_files_from_walks_only_the_listed_paths(
    attached: Attached, run_dir: None, tmp_path: Path
) -> None:
    """ext4: the metadata of the listed paths is read first (a selective walk); the
    restore then copies exactly those files, identical, and nothing else."""
    tree = attached.trees[1]
    deep = sorted((rel for rel in tree if rel.count("/") >= 2), key=len)
    listed = [deep[0], deep[-1], sorted(tree)[0]]
    root = attached.target / "p1"
    sel = metaprefetch.selection(listed)
    walked = readplan.prefetch_metadata(str(root), sel)
    assert walked is not None and walked.errors == []
    assert sorted(os.fsdecode(f.rel) for f in walked.files.values()) == sorted(listed)
    listing = tmp_path / "list"
    listing.write_text("".join(f"{rel}\n" for rel in listed))
    dest = tmp_path / "out"
    result = run_cli(
        "restore", "--files-from", str(listing), str(root), str(dest), env=attached.env
    )
    assert result.returncode == 0, result.stderr
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == sorted(listed)
    for rel in listed:
        assert sha256_file(dest / rel) == tree[rel], rel


@pytest.mark.parametrize("partition", [2, 1], ids=["xfs", "ext4"])
def test_warm_fills_the_cache(attached: Attached, partition: int) -> None:
    """xfs: scanned, mapped by FIEMAP; ext4: the metadata walk's files and extents."""
    subtree = attached.target / f"p{partition}" / "data"
    before = read_stats(attached.mnt)
    result = run_cli("warm", str(subtree), env=attached.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("warmed ")
    warmed = read_stats(attached.mnt)
    fetched_by_warm = warmed["bytes_fetched"] - before["bytes_fetched"]
    files = {rel: d for rel, d in attached.trees[partition].items() if rel.startswith("data/")}
    sizes = sum((subtree.parent / rel).stat().st_size for rel in files)
    assert warmed["plan_bytes"] - before["plan_bytes"] >= sizes  # what was already cached too
    assert fetched_by_warm > 0
    # Earlier tests read p1's files: their pages must go, so the reads reach the daemon.
    Path("/proc/sys/vm/drop_caches").write_text("3")
    for rel, digest in files.items():
        assert sha256_file(subtree.parent / rel) == digest
    read = read_stats(attached.mnt)
    assert read["cache_hits"] > warmed["cache_hits"]
    hits = read["cache_hits"] - warmed["cache_hits"]
    misses = read["cache_misses"] - warmed["cache_misses"]
    # What still missed is mostly the kernel's readahead past the files' ends (about
    # 430 hits to 110 misses here).
    assert misses < hits / 2, (hits, misses)
    assert read["bytes_fetched"] - warmed["bytes_fetched"] < sizes * 3 / 4


def test_warm_refuses_a_path_outside_attachments(attached: Attached, tmp_path: Path) -> None:
    result = run_cli("warm", str(tmp_path), env=attached.env)
    assert result.returncode == 1
    assert result.stderr == (
        f"backupfs: {tmp_path}: not in an attached ext2/3/4, xfs or vfat filesystem"
        " (see backupfs attach)\n"
    )
