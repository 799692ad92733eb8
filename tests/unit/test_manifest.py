"""Store metadata (store.manifest) and the indexer that writes it (store.indexer)."""

import calendar
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from backupfs.errors import ManifestError, UserError
from backupfs.store import indexer, manifest
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

BS = 4096
HEX = "ab" * 32


def _catalogue() -> Catalogue:
    disk = DiskEntry("sda.img", 10_000, 1_700_000_000_123_456_789, BS, HEX)
    disk2 = DiskEntry("sdb.img", 0, 0, 1 << 20, "0" * 64)
    return Catalogue(
        (
            SnapshotEntry("web1", "2026-11-20T0300Z", 1_795_143_600_000_000_000, (disk, disk2)),
            SnapshotEntry("web1", "2026-11-21T0300Z", 1_795_230_000_000_000_000, (disk,)),
            SnapshotEntry("db", "weekly", 5, ()),
        )
    )


def _doc() -> dict[str, Any]:
    return json.loads(manifest.dump_catalogue(_catalogue()))


def _parse(doc: object) -> Catalogue:
    return manifest.parse_catalogue(json.dumps(doc).encode())


def test_catalogue_round_trip() -> None:
    cat = _catalogue()
    data = manifest.dump_catalogue(cat)
    assert data.endswith(b"\n")
    doc = json.loads(data)
    assert doc["format"] == "backupfs-store" and doc["version"] == 1
    assert manifest.parse_catalogue(data) == cat
    assert manifest.parse_catalogue(manifest.dump_catalogue(Catalogue(()))) == Catalogue(())


def test_snapshot_meta_round_trip() -> None:
    snap = _catalogue().snapshots[0]
    assert manifest.parse_snapshot_meta(manifest.dump_snapshot_meta(snap)) == snap


def test_paths() -> None:
    assert manifest.image_path("h", "s", "d.img") == "h/s/d.img"
    assert manifest.digests_path("h", "s", "d.img") == "h/s/.backupfs/d.img.sha256"
    assert manifest.snapshot_meta_path("h", "s") == "h/s/.backupfs/snapshot.json"


@pytest.mark.parametrize("where", ["host", "snapshot", "disk"])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("..", "unsafe {what} name in store metadata: '..'"),
        (".", "unsafe {what} name in store metadata: '.'"),
        ("a/b", "unsafe {what} name in store metadata: 'a/b'"),
        ("x\0y", "unsafe {what} name in store metadata: 'x\\x00y'"),
        (".x", "unsafe {what} name in store metadata: '.x' (hidden name)"),
        ("é" * 128, "unsafe {what} name in store metadata: '" + "é" * 128 + "'"),
        ("", "malformed store metadata: {what} name must be a non-empty string"),
        (7, "malformed store metadata: {what} name must be a non-empty string"),
        (None, "malformed store metadata: {what} name must be a non-empty string"),
        (["a"], "malformed store metadata: {what} name must be a non-empty string"),
    ],
)
def test_unsafe_names_rejected(where: str, name: object, message: str) -> None:
    doc = _doc()
    if where == "disk":
        doc["snapshots"][0]["disks"][0]["name"] = name
    elif where == "host":
        doc["snapshots"][0]["host"] = name
    else:
        doc["snapshots"][0]["name"] = name
    with pytest.raises(ManifestError) as info:
        _parse(doc)
    assert str(info.value) == message.format(what=where)


def test_name_of_255_bytes_is_fine() -> None:
    assert manifest.check_name("a" * 255, "disk") == "a" * 255
    assert manifest.check_name("x..y", "disk") == "x..y"
    assert manifest.check_name("a b%c", "disk") == "a b%c"


def test_duplicate_disk_name_rejected() -> None:
    doc = _doc()
    disks = doc["snapshots"][0]["disks"]
    disks[1]["name"] = disks[0]["name"]
    with pytest.raises(
        ManifestError,
        match=r"^malformed store metadata: duplicate disk in "
        r"web1/2026-11-20T0300Z name$",
    ):
        _parse(doc)


def test_duplicate_snapshot_rejected() -> None:
    doc = _doc()
    doc["snapshots"][1]["name"] = doc["snapshots"][0]["name"]
    with pytest.raises(ManifestError, match=r"^malformed store metadata: duplicate snapshot name$"):
        _parse(doc)
    # The same snapshot name under another host is fine.
    doc = _doc()
    doc["snapshots"][2]["name"] = doc["snapshots"][0]["name"]
    assert len(_parse(doc).snapshots) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "malformed store metadata: not a backupfs store catalogue"),
        ({"format": None}, "malformed store metadata: not a backupfs store catalogue"),
        ({"version": 2}, "store format version 2 is not supported (this backupfs reads 1)"),
        ({"version": "1"}, "store format version '1' is not supported (this backupfs reads 1)"),
        ({"version": None}, "store format version None is not supported (this backupfs reads 1)"),
        ({"snapshots": {}}, "malformed store metadata: snapshots is not a list"),
    ],
)
def test_header_rejected(change: dict[str, Any], message: str) -> None:
    doc = _doc() | change
    with pytest.raises(ManifestError) as info:
        _parse(doc)
    assert str(info.value) == message


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(version: object) -> None:
    with pytest.raises(ManifestError, match="is not supported"):
        _parse(_doc() | {"version": version})


@pytest.mark.parametrize(
    "data", [b"", b"{", b"not json", b"\xff\xfe", b'{"format": "backupfs-store",}']
)
def test_invalid_json_rejected(data: bytes) -> None:
    with pytest.raises(ManifestError, match=r"^malformed store metadata: not valid JSON \("):
        manifest.parse_catalogue(data)


@pytest.mark.parametrize("data", [b"[]", b"null", b"1", b'"backupfs-store"'])
def test_not_an_object_rejected(data: bytes) -> None:
    with pytest.raises(ManifestError, match="not a backupfs store catalogue"):
        manifest.parse_catalogue(data)


def _disk_change(field: str, value: object) -> dict[str, Any]:
    doc = _doc()
    doc["snapshots"][0]["disks"][0][field] = value
    return doc


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_size", 3 * 4096, "block_size of sda.img is not a power of two"),
        ("block_size", 4097, "block_size of sda.img is not a power of two"),
        ("block_size", 128 << 20, "block_size of sda.img is not a power of two"),
        ("block_size", 2048, "block_size of sda.img must be an integer >= 4096"),
        ("block_size", 4096.0, "block_size of sda.img must be an integer >= 4096"),
        ("block_size", True, "block_size of sda.img must be an integer >= 4096"),
        ("size_bytes", -1, "size_bytes of sda.img must be an integer >= 0"),
        ("size_bytes", True, "size_bytes of sda.img must be an integer >= 0"),
        ("size_bytes", "10", "size_bytes of sda.img must be an integer >= 0"),
        ("size_bytes", None, "size_bytes of sda.img must be an integer >= 0"),
        ("mtime_ns", False, "mtime_ns of sda.img must be an integer"),
        ("digests_sha256", "AB" * 32, "digests_sha256 of sda.img is not SHA-256"),
        ("digests_sha256", "ab" * 31, "digests_sha256 of sda.img is not SHA-256"),
        ("digests_sha256", "ab" * 32 + "0", "digests_sha256 of sda.img is not SHA-256"),
        ("digests_sha256", "zz" * 32, "digests_sha256 of sda.img is not SHA-256"),
        ("digests_sha256", None, "digests_sha256 of sda.img is not SHA-256"),
    ],
)
def test_bad_disk_fields_rejected(field: str, value: object, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        _parse(_disk_change(field, value))
    assert str(info.value) == f"malformed store metadata: {message}"


def test_max_block_size_accepted() -> None:
    assert _parse(_disk_change("block_size", 64 << 20)).snapshots[0].disks[0].block_size == 64 << 20


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(time_ns=True), "time_ns must be an integer"),
        (lambda s: s.update(disks=None), "disks of web1/2026-11-20T0300Z is not a list"),
        (lambda s: s["disks"].append("sdc.img"), "a disk entry is not an object"),
    ],
)
def test_bad_snapshot_fields_rejected(mutate: Any, message: str) -> None:
    doc = _doc()
    mutate(doc["snapshots"][0])
    with pytest.raises(ManifestError) as info:
        _parse(doc)
    assert str(info.value) == f"malformed store metadata: {message}"


def test_snapshot_entry_not_an_object() -> None:
    doc = _doc()
    doc["snapshots"].append(["web2", "x"])
    with pytest.raises(ManifestError, match="a snapshot entry is not an object"):
        _parse(doc)


def test_snapshot_meta_rejections() -> None:
    good = json.loads(manifest.dump_snapshot_meta(_catalogue().snapshots[0]))
    bad = copy.deepcopy(good)
    bad["snapshot"]["host"] = ".."
    with pytest.raises(ManifestError, match=r"unsafe host name in store metadata: '\.\.'"):
        manifest.parse_snapshot_meta(json.dumps(bad).encode())
    with pytest.raises(ManifestError, match="a snapshot entry is not an object"):
        manifest.parse_snapshot_meta(json.dumps(good | {"snapshot": None}).encode())
    with pytest.raises(ManifestError, match="version 7 is not supported"):
        manifest.parse_snapshot_meta(json.dumps(good | {"version": 7}).encode())


def test_manifest_error_is_a_user_error() -> None:
    assert issubclass(ManifestError, UserError)


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
    assert manifest.parse_catalogue((root / manifest.CATALOGUE_NAME).read_bytes()) == cat
    listed = {f"{s.host}/{s.name}/{d.name}": (s, d) for s in cat.snapshots for d in s.disks}
    assert sorted(listed) == sorted(images)
    for rel, data in images.items():
        snap, disk = listed[rel]
        digests = (root / manifest.digests_path(snap.host, snap.name, disk.name)).read_bytes()
        assert digests == _block_digests(data, BS)
        assert len(digests) == 32 * -(-len(data) // BS)
        assert disk.digests_sha256 == hashlib.sha256(digests).hexdigest()
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
    _write(root / "alpha/2026-11-20T0300Z/disk1.raw", b"c" * 10)
    (root / "alpha/2026-11-20T0300Z/sub").mkdir()
    say = Say()
    cat = indexer.index_store(root, block_size=BS, say=say)
    _check_indexed(root, images, cat)
    skipped = sorted(line for line in say.lines if line.startswith("skipped "))
    assert skipped == [
        f"skipped {root}/alpha/2026-11-20T0300Z/disk1.raw: not a .img file "
        "(raw images are indexed by that name)",
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
    assert manifest.parse_catalogue((tmp_path / manifest.CATALOGUE_NAME).read_bytes()) == cat


def test_catalogue_written_by_index_can_be_read_back_for_old_dates(tmp_path: Path) -> None:
    _write(tmp_path / "host/1969-07-20/sda.img", os.urandom(100))
    indexer.index_store(tmp_path, block_size=BS, say=Say())
    manifest.parse_catalogue((tmp_path / manifest.CATALOGUE_NAME).read_bytes())
