"""The store's metadata format (store.manifest): catalogue and snapshot files, their checks.

The indexer that writes these files is tested in test_indexer.py.
"""

import copy
import json
from typing import Any

import pytest

from backupfs.errors import ManifestError, UserError
from backupfs.store import manifest
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

BS = 4096
HEX = "ab" * 32
UNSUPPORTED = "is not supported (this backupfs reads 1, 2 and 3)"


def _catalogue() -> Catalogue:
    disk = DiskEntry("sda.img", 10_000, 1_700_000_000_123_456_789, BS, digest_index_sha256=HEX)
    disk2 = DiskEntry("sdb.img", 0, 0, 1 << 20, digest_index_sha256="0" * 64)
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
    assert doc["format"] == "backupfs-store" and doc["version"] == 2
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
        ({"version": 4}, f"store format version 4 {UNSUPPORTED}"),
        ({"version": 3}, "malformed store metadata: hosts is not a list"),
        ({"version": "1"}, f"store format version '1' {UNSUPPORTED}"),
        ({"version": None}, f"store format version None {UNSUPPORTED}"),
        ({"snapshots": {}}, "malformed store metadata: snapshots is not a list"),
    ],
)
def test_header_rejected(change: dict[str, Any], message: str) -> None:
    doc = _doc() | change
    with pytest.raises(ManifestError) as info:
        _parse(doc)
    assert str(info.value) == message


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_an_integer(version: object) -> None:
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
        ("digest_index_sha256", "AB" * 32, "digest_index_sha256 of sda.img is not SHA-256"),
        ("digest_index_sha256", "ab" * 31, "digest_index_sha256 of sda.img is not SHA-256"),
        ("digest_index_sha256", "ab" * 32 + "0", "digest_index_sha256 of sda.img is not SHA-256"),
        ("digest_index_sha256", "zz" * 32, "digest_index_sha256 of sda.img is not SHA-256"),
        ("digest_index_sha256", None, "digest_index_sha256 of sda.img is not SHA-256"),
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
