"""The indexer (store.indexer): snapshot times from names, and index_store writing digests,
per-snapshot metadata and the catalogue of a store directory.

The format of what it writes is tested in test_manifest.py.
"""

import calendar
import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from backupfs.errors import UserError
from backupfs.store import digestfile, indexer, manifest
from backupfs.store.manifest import Catalogue
from tests.support.catalogue import read_store_catalogue

BS = 4096


# --- indexer.snapshot_time_ns ---


def _utc(*fields: int) -> int:
    return calendar.timegm((*fields, 0, 0, 0)) * 1_000_000_000


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("2026-11-20T0300Z", _utc(2026, 11, 20, 3, 0, 0)),
        ("2026-11-20T03:00:00Z", _utc(2026, 11, 20, 3, 0, 0)),
        ("2026-11-20T03:04:05", _utc(2026, 11, 20, 3, 4, 5)),
        ("2026-11-20_2359", _utc(2026, 11, 20, 23, 59, 0)),
        ("2026-11-20", _utc(2026, 11, 20, 0, 0, 0)),
    ],
)
def test_snapshot_time_from_name(name: str, expected: int) -> None:
    assert indexer.snapshot_time_ns(name, 42) == expected


def test_snapshot_time_known_value() -> None:
    assert indexer.snapshot_time_ns("2026-11-20T0300Z", 0) == 1_795_143_600 * 10**9


@pytest.mark.parametrize(
    "name",
    [
        "daily.0",
        "weekly",
        "2026-11",
        "2026-11-20T03",
        "x2026-11-20",
        "2026-13-01",
        "2026-11-20T0300Zjunk",
        "",
    ],
)
def test_snapshot_time_falls_back(name: str) -> None:
    assert indexer.snapshot_time_ns(name, 123_456) == 123_456


# --- indexer.index_store ---


def _write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _block_digests(data: bytes, block_size: int) -> bytes:
    return b"".join(
        hashlib.sha256(data[i : i + block_size]).digest() for i in range(0, len(data), block_size)
    )


class Say:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def hashed(self) -> list[str]:
        """Image paths hashed since the last call."""
        out = [ln.split()[1] for ln in self.lines if ln.startswith("hashing ")]
        self.lines.clear()
        return sorted(out)


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "store"
    images = {
        "alpha/2026-11-20T0300Z/sda.img": os.urandom(3 * BS + 100),
        "alpha/2026-11-20T0300Z/sdb.img": os.urandom(BS),
        "beta/daily.0/disk.img": os.urandom(10),
        "beta/daily.0/empty.img": b"",
    }
    for rel, data in images.items():
        _write(root / rel, data)
    return root, images


def _check_indexed(root: Path, images: dict[str, bytes], cat: Catalogue) -> None:
    assert read_store_catalogue(root) == cat
    listed = {f"{s.host}/{s.name}/{d.name}": (s, d) for s in cat.snapshots for d in s.disks}
    assert sorted(listed) == sorted(images)
    for rel, data in images.items():
        snap, disk = listed[rel]
        digests = (root / manifest.digests_path(snap.host, snap.name, disk.name)).read_bytes()
        assert digests == _block_digests(data, BS)
        assert len(digests) == 32 * -(-len(data) // BS)
        index = (root / manifest.digest_index_path(snap.host, snap.name, disk.name)).read_bytes()
        assert index == digestfile.chunk_index(digests)
        assert disk.digest_index_sha256 == hashlib.sha256(index).hexdigest()
        assert disk.digests_sha256 is None
        assert disk.size_bytes == len(data)
        assert disk.block_size == BS
        assert disk.mtime_ns == (root / rel).stat().st_mtime_ns
        meta = root / manifest.snapshot_meta_path(snap.host, snap.name)
        assert manifest.parse_snapshot_meta(meta.read_bytes()) == snap


def test_index_store_writes_digests_and_catalogue(store: tuple[Path, dict[str, bytes]]) -> None:
    root, images = store
    _write(root / "alpha/2026-11-20T0300Z/notes.txt", b"not an image")
    (root / "beta/empty-snapshot").mkdir()
    say = Say()
    cat = indexer.index_store(root, block_size=BS, say=say)
    _check_indexed(root, images, cat)
    assert say.hashed() == sorted(images)
    assert [(s.host, s.name) for s in cat.snapshots] == [
        ("alpha", "2026-11-20T0300Z"),
        ("beta", "daily.0"),
    ]
    assert cat.snapshots[0].time_ns == _utc(2026, 11, 20, 3, 0, 0)
    mtimes = [(root / "beta/daily.0" / n).stat().st_mtime_ns for n in ("disk.img", "empty.img")]
    assert cat.snapshots[1].time_ns == max(mtimes)  # no date in the name: newest image


def test_second_run_hashes_only_what_changed(store: tuple[Path, dict[str, bytes]]) -> None:
    root, images = store
    say = Say()
    indexer.index_store(root, block_size=BS, say=say)
    assert len(say.hashed()) == 4

    cat = indexer.index_store(root, block_size=BS, say=say)
    assert say.hashed() == []
    _check_indexed(root, images, cat)

    images["alpha/2026-11-21T0300Z/sda.img"] = _write(
        root / "alpha/2026-11-21T0300Z/sda.img", os.urandom(2 * BS)
    )
    cat = indexer.index_store(root, block_size=BS, say=say)
    assert say.hashed() == ["alpha/2026-11-21T0300Z/sda.img"]
    assert len(cat.snapshots) == 3
    _check_indexed(root, images, cat)

    # Same size, new content and mtime: only that image is hashed again.
    rel = "alpha/2026-11-20T0300Z/sdb.img"
    images[rel] = _write(root / rel, os.urandom(BS))
    st = (root / rel).stat()
    os.utime(root / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    cat = indexer.index_store(root, block_size=BS, say=say)
    assert say.hashed() == [rel]
    _check_indexed(root, images, cat)

    # New size with the old mtime put back: hashed again too.
    rel = "beta/daily.0/disk.img"
    st = (root / rel).stat()
    images[rel] = _write(root / rel, images[rel] + b"more")
    os.utime(root / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
    cat = indexer.index_store(root, block_size=BS, say=say)
    assert say.hashed() == [rel]
    _check_indexed(root, images, cat)

    # Another block size re-hashes everything.
    cat = indexer.index_store(root, block_size=2 * BS, say=say)
    assert say.hashed() == sorted(images)


def test_missing_digest_file_is_rewritten(store: tuple[Path, dict[str, bytes]]) -> None:
    root, images = store
    say = Say()
    indexer.index_store(root, block_size=BS, say=say)
    say.hashed()
    (root / manifest.digests_path("beta", "daily.0", "disk.img")).unlink()
    cat = indexer.index_store(root, block_size=BS, say=say)
    assert say.hashed() == ["beta/daily.0/disk.img"]
    _check_indexed(root, images, cat)


def test_unsafe_names_are_skipped(store: tuple[Path, dict[str, bytes]]) -> None:
    root, images = store
    _write(root / ".hidden/2026-11-20/sda.img", b"x" * 100)
    _write(root / "alpha/.snap/sda.img", b"y" * 100)
    _write(root / "alpha/2026-11-20T0300Z/.secret.img", b"z" * 100)
    say = Say()
    cat = indexer.index_store(root, block_size=BS, say=say)
    _check_indexed(root, images, cat)
    assert ".hidden" not in {s.host for s in cat.snapshots}
    assert not (root / ".hidden/2026-11-20/.backupfs").exists()
    assert not (root / "alpha/.snap/.backupfs").exists()
    skipped = [line for line in say.lines if line.startswith("skipped ")]
    assert len(skipped) == 3 and all("(hidden name)" in line for line in skipped)
    for name in (".hidden", ".snap", ".secret.img"):
        assert any(name in line for line in skipped)
    assert say.hashed() == sorted(images)


def test_misplaced_images_are_listed_not_silently_ignored(
    store: tuple[Path, dict[str, bytes]],
) -> None:
    root, images = store
    _write(root / "stray.img", b"a" * 10)
    _write(root / "alpha/disk0.img", b"b" * 10)
    _write(root / "alpha/2026-11-20T0300Z/disk1.bin", b"c" * 10)
    (root / "alpha/2026-11-20T0300Z/sub").mkdir()
    say = Say()
    cat = indexer.index_store(root, block_size=BS, say=say)
    _check_indexed(root, images, cat)
    skipped = sorted(line for line in say.lines if line.startswith("skipped "))
    assert skipped == [
        f"skipped {root}/alpha/2026-11-20T0300Z/disk1.bin: not a disk image (no qcow2, VMDK, "
        "VHD or VHDX header; raw images are indexed by the names *.img and *.raw)",
        f"skipped {root}/alpha/2026-11-20T0300Z/sub: not a regular file",
        f"skipped {root}/alpha/disk0.img: not in a snapshot directory "
        "(images go in STORE/HOST/SNAPSHOT/DISK.img)",
        f"skipped {root}/stray.img: not in a host directory "
        "(images go in STORE/HOST/SNAPSHOT/DISK.img)",
    ]


def test_index_store_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        indexer.index_store(tmp_path / "nope", say=Say())


def test_empty_store_gives_an_empty_catalogue(tmp_path: Path) -> None:
    cat = indexer.index_store(tmp_path, block_size=BS, say=Say())
    assert cat == Catalogue(())
    assert read_store_catalogue(tmp_path) == cat


def test_catalogue_written_by_index_can_be_read_back_for_old_dates(tmp_path: Path) -> None:
    _write(tmp_path / "host/1969-07-20/sda.img", os.urandom(100))
    indexer.index_store(tmp_path, block_size=BS, say=Say())
    read_store_catalogue(tmp_path)


def test_index_writes_version_3_host_parts_then_the_top_level(
    store: tuple[Path, dict[str, bytes]],
) -> None:
    root, images = store
    cat = indexer.index_store(root, block_size=BS, say=Say())
    top = manifest.parse_store_catalogue((root / manifest.CATALOGUE_NAME).read_bytes())
    assert isinstance(top, manifest.HostIndex)
    assert [h.name for h in top.hosts] == ["alpha", "beta"]
    assert [h.snapshots for h in top.hosts] == [1, 1] and top.hosts[0].block_sizes == (BS,)
    assert top.probe == manifest.ProbeEntry("alpha/2026-11-20T0300Z/sda.img", 3 * BS + 100)
    assert sorted(p.name for p in (root / manifest.HOSTS_DIR).iterdir()) == [
        "alpha.json",
        "beta.json",
    ]
    files = manifest.catalogue_files(cat)
    assert [rel for rel, _ in files] == [
        ".backupfs/hosts/alpha.json",
        ".backupfs/hosts/beta.json",
        "backupfs-store.json",
    ]
    assert all((root / rel).read_bytes() == data for rel, data in files)
    # Run again with nothing changed: the parts are left as they are (their ETags stay).
    before = {p.name: p.stat().st_mtime_ns for p in (root / manifest.HOSTS_DIR).iterdir()}
    time.sleep(0.01)
    indexer.index_store(root, block_size=BS, say=Say())
    after = {p.name: p.stat().st_mtime_ns for p in (root / manifest.HOSTS_DIR).iterdir()}
    assert after == before


def test_the_part_of_a_host_gone_from_the_store_is_removed(
    store: tuple[Path, dict[str, bytes]],
) -> None:
    root, images = store
    indexer.index_store(root, block_size=BS, say=Say())
    shutil.rmtree(root / "beta")
    say = Say()
    cat = indexer.index_store(root, block_size=BS, say=say)
    assert {s.host for s in cat.snapshots} == {"alpha"}
    assert [p.name for p in (root / manifest.HOSTS_DIR).iterdir()] == ["alpha.json"]
    assert read_store_catalogue(root) == cat
    assert not [line for line in say.lines if line.startswith("skipped ")]  # not .backupfs


def test_a_host_name_with_no_room_for_its_part_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path / ("h" * 251) / "s" / "sda.img", b"x" * 100)
    _write(tmp_path / ("h" * 250) / "s" / "sda.img", b"y" * 100)
    say = Say()
    cat = indexer.index_store(tmp_path, block_size=BS, say=say)
    assert [s.host for s in cat.snapshots] == ["h" * 250]
    assert say.lines[-1] == (
        f"skipped {tmp_path}/{'h' * 251}: a host name of over 250 bytes leaves no room for "
        "the name of its catalogue part"
    )
    assert read_store_catalogue(tmp_path) == cat
