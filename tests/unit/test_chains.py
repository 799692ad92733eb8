"""Chains of images in a store: parents named by path resolved to images of the store
(store.chains), the index over images made by qemu-img (formats from headers, loops,
missing and absolute parents, --map-parent), and a catalogue whose chain is broken."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from backupfs.errors import UsageError
from backupfs.mount.tree import build_tree
from backupfs.store import manifest
from backupfs.store.chains import MAX_CHAIN_DEPTH, ParentMap, broken_chains, resolve_parent
from backupfs.store.image import VirtualDisk
from backupfs.store.indexer import index_store
from tests.support import vhdwriter

MIB = 1 << 20
KNOWN = {"web01/s1/base.qcow2": 1, "web01/s2/top.qcow2": 1, "web01/base/t.vhdx": 1}
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed"
)


@pytest.mark.parametrize(
    ("written", "image_dir", "maps", "expected"),
    [
        ("../s1/base.qcow2", "web01/s2", [], "web01/s1/base.qcow2"),
        ("./../s1/base.qcow2", "web01/s2", [], "web01/s1/base.qcow2"),
        ("..\\s1\\base.qcow2", "web01/s2", [], "web01/s1/base.qcow2"),  # VHD's W2ru
        ("/var/lib/libvirt/images/base.qcow2", "web01/s2",
         [ParentMap("/var/lib/libvirt/images/", "web01/s1")], "web01/s1/base.qcow2"),
        ("C:\\VMs\\t.vhdx", "web01/s2", [ParentMap("C:\\VMs\\", "web01/base")],
         "web01/base/t.vhdx"),
    ],
)  # fmt: skip
def test_parents_resolve_to_images_of_the_store(
    written: str, image_dir: str, maps: list[ParentMap], expected: str
) -> None:
    assert resolve_parent(written, image_dir, KNOWN, maps) == expected


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("../../../../etc/passwd", "is outside the store"),
        ("../s1/missing.qcow2", "is not an image of the store"),
        ("/var/lib/libvirt/images/base.qcow2", "is an absolute path (map it with --map-parent)"),
        ("C:\\VMs\\t.vhdx", "is an absolute path"),
        ("../../web01/s1", "is not an image of the store"),
    ],
)
def test_parents_outside_the_store_are_refused(written: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_parent(written, "web01/s2", KNOWN, [])


def test_parent_maps_must_point_into_the_store() -> None:
    assert ParentMap.parse("/old/=web01/s1/") == ParentMap("/old/", "web01/s1")
    for bad in ("/old/", "=web01", "/old/=/etc", "/old/=web01/../../x"):
        with pytest.raises(UsageError):
            ParentMap.parse(bad)


def test_broken_chains_are_found() -> None:
    deep = {f"h/s/{n}": f"h/s/{n + 1}" for n in range(MAX_CHAIN_DEPTH + 2)}
    deep[f"h/s/{MAX_CHAIN_DEPTH + 2}"] = None
    parents = {"a": "b", "b": "a", "c": "a", "d": None, "e": "d", "f": "gone", **deep}
    bad = broken_chains(parents)
    assert bad["a"] == "its chain loops through a" and "loops" in bad["b"] and "c" in bad
    assert bad["f"] == "its parent gone was not indexed"
    assert "d" not in bad and "e" not in bad
    assert "deeper than" in bad["h/s/0"] and f"h/s/{MAX_CHAIN_DEPTH}" not in bad


# --- the index, over images made by qemu-img ---


def _qemu_img(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert proc.returncode == 0, proc.stderr


def _snap(store: Path, name: str) -> Path:
    path = store / "web01" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _index(store: Path, *maps: ParentMap) -> tuple[dict[str, manifest.DiskEntry], list[str]]:
    said: list[str] = []
    catalogue = index_store(store, 4096, say=said.append, parent_maps=list(maps))
    disks = {f"{s.host}/{s.name}/{d.name}": d for s in catalogue.snapshots for d in s.disks}
    return disks, [line for line in said if line.startswith("skipped")]


@needs_qemu
def test_the_index_refuses_loops_and_missing_parents(tmp_path: Path) -> None:
    store = tmp_path / "store"
    a, b = _snap(store, "a") / "disk0.qcow2", _snap(store, "b") / "disk0.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(a), "16M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "../a/disk0.qcow2", "-F", "qcow2", str(b))
    _qemu_img("rebase", "-u", "-f", "qcow2", "-b", "../b/disk0.qcow2", "-F", "qcow2", str(a))
    c = _snap(store, "c") / "disk0.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "../gone/disk0.qcow2", "-F", "qcow2", "-u",
              str(c), "16M")  # fmt: skip
    disks, skipped = _index(store)
    assert disks == {}
    assert any("web01/a/disk0.qcow2: its chain loops through" in s for s in skipped), skipped
    assert any("web01/c/disk0.qcow2: parent '../gone/disk0.qcow2'" in s for s in skipped)


@needs_qemu
def test_absolute_parents_are_mapped_into_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = _snap(store, "2026-11-01") / "disk0.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    top = _snap(store, "2026-11-02") / "disk0.qcow2"
    written = "/var/lib/libvirt/images/disk0.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", written, "-F", "qcow2", str(top), "16M")
    disks, skipped = _index(store)
    assert "web01/2026-11-02/disk0.qcow2" not in disks
    assert any("--map-parent" in s for s in skipped), skipped
    disks, skipped = _index(store, ParentMap("/var/lib/libvirt/images/", "web01/2026-11-01"))
    assert disks["web01/2026-11-02/disk0.qcow2"].parent == "web01/2026-11-01/disk0.qcow2"
    assert skipped == []


@needs_qemu
def test_formats_come_from_headers_not_names(tmp_path: Path) -> None:
    store = tmp_path / "store"
    snap = _snap(store, "s")
    _qemu_img("create", "-q", "-f", "qcow2", str(snap / "vm.img"), "8M")  # libvirt's naming
    _qemu_img("create", "-q", "-f", "qcow2", str(snap / "kept.raw"), "8M")  # .raw stays raw
    _qemu_img("create", "-q", "-f", "qcow2", str(snap / "data.qcow2"), "8M")
    (snap / "data.img").write_bytes(bytes(4096))  # would be served as data.img too
    (snap / "notes.txt").write_text("not an image")
    disks, skipped = _index(store)
    assert disks["web01/s/vm.img"].format == "qcow2"
    assert disks["web01/s/vm.img"].virtual_size == 8 << 20
    assert disks["web01/s/kept.raw"].format == "raw"
    assert disks["web01/s/data.img"].format == "raw" and "web01/s/data.qcow2" not in disks
    assert any("data.qcow2: it would be served as data.img" in s for s in skipped), skipped
    assert any("notes.txt: not a disk image" in s for s in skipped), skipped


@needs_qemu
def test_a_damaged_image_is_skipped_with_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    snap = _snap(store, "s")
    bad = snap / "bad.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(bad), "8M")
    data = bytearray(bad.read_bytes())
    data[40:48] = (1 << 40).to_bytes(8, "big")  # l1_table_offset far past the end
    bad.write_bytes(bytes(data))
    _qemu_img("create", "-q", "-f", "qcow2", str(snap / "good.qcow2"), "8M")
    disks, skipped = _index(store)
    assert list(disks) == ["web01/s/good.qcow2"]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {bad}: ")
    assert "\n" not in skipped[0]


def test_a_catalogue_whose_chain_loops_serves_the_rest() -> None:
    disk = {"size_bytes": 65536, "mtime_ns": 0, "block_size": 65536, "format": "qcow2",
            "virtual_size": 1 << 20, "digest_index_sha256": "ab" * 32}  # fmt: skip
    snaps = [
        {"host": "h", "name": "a", "time_ns": 0,
         "disks": [disk | {"name": "d.qcow2", "parent": "h/b/d.qcow2"}]},
        {"host": "h", "name": "b", "time_ns": 0,
         "disks": [disk | {"name": "d.qcow2", "parent": "h/a/d.qcow2"}]},
        {"host": "h", "name": "c", "time_ns": 0,
         "disks": [disk | {"name": "d.qcow2", "parent": "h/nowhere/d.qcow2"},
                   disk | {"name": "ok.qcow2"}]},
    ]  # fmt: skip
    doc = {"format": "backupfs-store", "version": 2, "snapshots": snaps}
    tree = build_tree(manifest.parse_catalogue(json.dumps(doc).encode()), "http://s/", 0)
    served = [n for n in tree.nodes.values() if n.image is not None]
    assert [n.name for n in served] == ["ok.img"]
    assert isinstance(served[0].image, VirtualDisk) and served[0].size_bytes == 1 << 20


@needs_qemu
def test_a_differencing_vhd_needs_the_parent_it_was_made_from(tmp_path: Path) -> None:
    """VHD names its parent by path and by unique id: another image at that path (a base
    made again, same name) is refused, where reading through it would give wrong bytes."""
    store, work = tmp_path / "store", tmp_path / "work"
    snap = _snap(store, "s")
    work.mkdir()
    base_raw, child_raw = work / "base.raw", work / "child.raw"
    base_raw.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    child_raw.write_bytes(base_raw.read_bytes()[:4096] + b"\xaa" * 4096 + bytes(2 * MIB - 8192))
    vpc = ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"]
    _qemu_img("convert", "-f", "raw", *vpc, str(base_raw), str(snap / "base.vhd"))
    vhdwriter.write_differencing_vhd(snap / "disk0.vhd", snap / "base.vhd", base_raw, child_raw,
                                     absolute=False)  # fmt: skip
    disks, skipped = _index(store)
    assert disks["web01/s/disk0.vhd"].parent == "web01/s/base.vhd" and skipped == []
    (snap / "base.vhd").unlink()  # made again: same name, same bytes, another unique id
    _qemu_img("convert", "-f", "raw", *vpc, str(base_raw), str(snap / "base.vhd"))
    disks, skipped = _index(store)
    assert "web01/s/disk0.vhd" not in disks and "web01/s/base.vhd" in disks
    assert any("is not the image it was made from" in s for s in skipped), skipped
