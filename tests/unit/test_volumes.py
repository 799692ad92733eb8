"""Volumes joined from ranges of disks: `Volume.pieces` against a plain byte-by-byte model,
the plan channel's volume request refused for every malformed shape, the mount's volume
table (mount.volumes) and the `.backupfs/volumes/` directory of the view (mount.view)."""

import errno
import json
import os
import random
import re
import stat
from array import array
from collections.abc import Callable

import pytest

from backupfs.mount import control, volumes
from backupfs.mount.control import CONTROL_DIR_INODE, VOLUMES_DIR_INODE, StatsSources
from backupfs.mount.tree import ROOT_INODE, build_tree
from backupfs.mount.view import IMMUTABLE_TIMEOUT_S, ImageFile, MountView, ViewError
from backupfs.mount.volumes import VolumeRefused, VolumeTable
from backupfs.plan import channel
from backupfs.plan.channel import ChannelError, VolumeRequest
from backupfs.readpath.cache import BlockCache
from backupfs.stats import Stats
from backupfs.store.image import (
    ChainLink,
    Disk,
    Image,
    VirtualDisk,
    Volume,
    VolumeRun,
    stored_images,
)
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

KiB, MiB = 1 << 10, 1 << 20


def _image(image_id: int, size_bytes: int = 4 * MiB) -> Image:
    return Image(image_id, f"http://store/h/s/d{image_id}.img", size_bytes, 1 << 20, 4096)


# -- Volume.pieces against a model that deals a run's stripes out in turn, byte by byte

DISKS = [_image(n) for n in range(3)]
Layout = list[tuple[int, int, list[tuple[int, int]]]]  # (size, stripe, [(disk, offset)])


def _volume(layout: Layout) -> Volume:
    runs, start = [], 0
    for size, stripe, areas in layout:
        runs.append(VolumeRun(start, size, stripe, tuple((DISKS[d], o) for d, o in areas)))
        start += size
    return Volume(1, "vg-lv", start, runs)


def _model(layout: Layout) -> tuple["array[int]", "array[int]"]:
    """(disk, offset) of each byte of the volume: row after row, a stripe of each area."""
    disk_of, offset_of = array("b"), array("q")
    for size, stripe, areas in layout:
        for row in range(size // len(areas) // stripe):
            for disk, offset in areas:
                first = offset + row * stripe
                disk_of.extend([disk] * stripe)
                offset_of.extend(range(first, first + stripe))
    return disk_of, offset_of


# a linear run is one stripe of the whole run (as channel.check_volume makes it)
LINEAR: Layout = [(1536, 1536, [(0, 512)]), (8192, 8192, [(1, 0)]), (2560, 2560, [(0, 9216)])]
STRIPED_2_4K: Layout = [(2 * 4096 * 5, 4096, [(0, 0), (1, 1536)])]
STRIPED_3_4K: Layout = [(3 * 4096 * 4, 4096, [(2, 4096), (0, 512), (1, 65536)])]
STRIPED_2_64K: Layout = [(2 * 65536 * 3, 65536, [(1, 0), (2, 3 * MiB)])]
STRIPED_3_64K: Layout = [(3 * 65536 * 2, 65536, [(0, MiB), (1, MiB), (2, 512)])]
MIXED = LINEAR[:1] + STRIPED_3_4K + STRIPED_2_64K + LINEAR[1:] + STRIPED_3_64K + STRIPED_2_4K
LAYOUTS = {
    "linear": LINEAR,
    "2x4k": STRIPED_2_4K,
    "3x4k": STRIPED_3_4K,
    "2x64k": STRIPED_2_64K,
    "3x64k": STRIPED_3_64K,
    "mixed": MIXED,
}


def _ranges(layout: Layout, size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random ranges, small and large, and ranges across each run and stripe boundary and
    the volume's end."""
    edges, at = {0, size}, 0
    for run_size, stripe, _ in layout:
        edges.update(range(at, at + run_size + 1, stripe or run_size))
        at += run_size
    out = [(e + a, e + b) for e in sorted(edges) for a, b in ((-1, 1), (0, 1), (-5, 700))]
    for n in range(200):
        start = rng.randrange(size + 1)
        longest = size if n % 20 == 0 else rng.choice((600, 20_000, 200_000))
        out.append((start, start + rng.randrange(1, longest + 1)))
    return [(max(0, a), b) for a, b in out]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_pieces_are_the_bytes_of_the_model_in_order(layout: Layout) -> None:
    volume = _volume(layout)
    disk_of, offset_of = _model(layout)
    assert volume.size_bytes == len(disk_of) == sum(size for size, _, _ in layout)
    for start, end in _ranges(layout, volume.size_bytes, random.Random(len(layout))):
        at, stop = start, min(end, volume.size_bytes)
        for disk, offset, length in volume.pieces(start, end):
            assert isinstance(disk, Image) and length > 0 and at + length <= stop
            assert disk_of[at : at + length] == array("b", [disk.image_id] * length)
            assert offset_of[at : at + length] == array("q", range(offset, offset + length))
            assert offset + length <= disk.size_bytes
            at += length
        assert at == max(start, stop), (start, end)  # the whole range, and nothing more


def test_pieces_of_a_stripe_stay_within_it() -> None:
    volume = _volume(STRIPED_3_4K)
    got = volume.pieces(4000, 4096 * 3 + 10)
    assert got == [
        (DISKS[2], 4096 + 4000, 96),
        (DISKS[0], 512, 4096),
        (DISKS[1], 65536, 4096),
        (DISKS[2], 4096 + 4096, 10),  # row 1 begins again on the first area
    ]


def test_pieces_past_the_end_or_of_nothing_are_none() -> None:
    volume = _volume(MIXED)
    size = volume.size_bytes
    assert volume.pieces(size, size + 4096) == []
    assert volume.pieces(size + 1, size + 2) == []
    assert volume.pieces(100, 100) == []
    (last,) = volume.pieces(size - 1, size + (1 << 40))
    assert last[2] == 1


# -- channel.check_volume: the request as it arrives from a client

PATH = "h/s/d0.img"
GOOD: dict[str, object] = {
    "volume": "vg-lv_2+x.y",
    "runs": [[8192, 4096, [[PATH, 0], ["h/s/d1.img", 512]]], [4096, 0, [[PATH, 8192]]]],
}


def _with(**changes: object) -> dict[str, object]:
    return {**GOOD, **changes}


def _run(run: object) -> dict[str, object]:
    return _with(runs=[run])


def test_a_good_request_is_accepted() -> None:
    request = channel.check_volume(channel.decode(channel.encode(GOOD)))
    assert request == VolumeRequest(
        "vg-lv_2+x.y",
        [(8192, 4096, [(PATH, 0), ("h/s/d1.img", 512)]), (4096, 4096, [(PATH, 8192)])],
    )  # a linear run's stripe is the run
    assert channel.check_volume(_with(volume="a" * channel.MAX_VOLUME_NAME)).name == "a" * 128
    big = _run([(1 << 62) - 512, 0, [[PATH, (1 << 62) - 1]]])
    assert channel.check_volume(big).runs[0][0] == (1 << 62) - 512
    most = _with(runs=[[4096, 0, [[PATH, 0]]]] * channel.MAX_RUNS)
    assert len(channel.check_volume(most).runs) == channel.MAX_RUNS
    wide = _run([512 * 128 * 8, 4096, [[PATH, n * 4096] for n in range(channel.MAX_AREAS)]])
    assert len(channel.check_volume(wide).runs[0][2]) == channel.MAX_AREAS


def test_a_linear_run_of_one_small_extent_is_accepted() -> None:
    # lvm2 allows extents of 1 KiB (vgcreate -s 1k); lvextend by one gives such a run
    request = _with(runs=[[8192, 0, [[PATH, 0]]], [1024, 0, [[PATH, 16384]]]])
    assert channel.check_volume(request).runs[1] == (1024, 1024, [(PATH, 16384)])


def _areas(count: int) -> list[list[object]]:
    return [[PATH, n * MiB] for n in range(count)]


REFUSED: dict[str, dict[str, object]] = {
    "no name": {"runs": GOOD["runs"]},
    "null name": _with(volume=None),
    "number name": _with(volume=5),
    "list name": _with(volume=["vg-lv"]),
    "empty name": _with(volume=""),
    "slash": _with(volume="vg/lv"),
    "dot-dot-slash": _with(volume="../lv"),
    "dot start": _with(volume=".lv"),
    "dot dot": _with(volume=".."),
    "space": _with(volume="vg lv"),
    "nul": _with(volume="vg\0lv"),
    "newline": _with(volume="vg\nlv"),
    "too long": _with(volume="a" * (channel.MAX_VOLUME_NAME + 1)),
    "no runs": {"volume": "vg-lv"},
    "zero runs": _with(runs=[]),
    "runs not a list": _with(runs={"0": [4096, 0, [[PATH, 0]]]}),
    "too many runs": _with(runs=[[512, 0, [[PATH, 0]]]] * (channel.MAX_RUNS + 1)),
    "run not a list": _run({"size": 4096}),
    "run of two": _run([4096, [[PATH, 0]]]),
    "run of four": _run([4096, 0, [[PATH, 0]], 0]),
    "size a string": _run(["4096", 0, [[PATH, 0]]]),
    "size a float": _run([4096.0, 0, [[PATH, 0]]]),
    "size true": _run([True, 0, [[PATH, 0]]]),
    "stripe null": _run([4096, None, [[PATH, 0]]]),
    "stripe true": _run([8192, True, _areas(2)]),
    "areas not a list": _run([4096, 0, {PATH: 0}]),
    "no areas": _run([4096, 0, []]),
    "too many areas": _run([4096 * 129, 4096, _areas(channel.MAX_AREAS + 1)]),
    "area not a list": _run([4096, 0, [PATH]]),
    "area of one": _run([4096, 0, [[PATH]]]),
    "area of three": _run([4096, 0, [[PATH, 0, 0]]]),
    "area path a number": _run([4096, 0, [[7, 0]]]),
    "offset a string": _run([4096, 0, [[PATH, "0"]]]),
    "offset false": _run([4096, 0, [[PATH, False]]]),
    "offset true": _run([4096, 0, [[PATH, True]]]),
    "negative offset": _run([4096, 0, [[PATH, -512]]]),
    "offset too large": _run([4096, 0, [[PATH, 1 << 62]]]),
    "zero size": _run([0, 0, [[PATH, 0]]]),
    "negative size": _run([-4096, 0, [[PATH, 0]]]),
    "size not of sectors": _run([4097, 0, [[PATH, 0]]]),
    "size not of sectors per area": _run([3 * 512 * 2 + 512, 4096, _areas(2)]),
    "stripe under the minimum": _run([8192, 2048, _areas(2)]),
    "stripe zero": _run([8192, 0, _areas(2)]),
    "stripe negative": _run([8192, -4096, _areas(2)]),
    "stripe not of sectors": _run([2 * 4352 * 2, 4352, _areas(2)]),
    "stripe does not divide": _run([2 * 12288, 8192, _areas(2)]),
    "stripe larger than an area": _run([2 * 4096, 8192, _areas(2)]),
    "run too large": _run([1 << 62, 0, [[PATH, 0]]]),
    "volume too large": _with(runs=[[1 << 60, 0, [[PATH, 0]]]] * 4),
}


@pytest.mark.parametrize("message", REFUSED.values(), ids=list(REFUSED))
def test_malformed_requests_are_refused_with_one_line(message: dict[str, object]) -> None:
    with pytest.raises(ChannelError) as info:
        channel.check_volume(message)
    assert "\n" not in str(info.value)


def test_a_huge_integer_from_the_socket_is_refused_with_one_line() -> None:
    line = json.dumps(_run([10**4000, 0, [[PATH, 0]]])).encode()
    with pytest.raises(ChannelError) as info:
        channel.check_volume(channel.decode(line))
    assert "\n" not in str(info.value)


# -- VolumeTable.register: the request checked against the disks the mount serves


def _table() -> tuple[VolumeTable, Callable[[str], Disk | None], list[Image]]:
    images = [_image(n, 1 * MiB) for n in range(2)]
    chain = VirtualDisk(9, "h/s/vm.qcow2", 2 * MiB, [ChainLink("qcow2", [_image(7), _image(8)])])
    disks: dict[str, Disk] = {"h/s/d0.img": images[0], "h/s/d1.img": images[1], "h/s/vm": chain}
    return VolumeTable(), disks.get, images


def _request(*runs: tuple[int, int, list[tuple[str, int]]], name: str = "vg-lv") -> VolumeRequest:
    return VolumeRequest(name, list(runs))


LAYOUT = ((8192, 4096, [("h/s/d0.img", 0), ("h/s/d1.img", 4096)]), (4096, 4096, [(PATH, 8192)]))


def test_a_volume_is_made_with_its_runs_on_the_disks() -> None:
    table, find, (d0, d1) = _table()
    volume = table.register(_request(*LAYOUT), find)
    assert re.fullmatch(r"vg-lv\.[0-9a-f]{16}", volume.name)
    assert (volume.size_bytes, volume.volume_id) == (12288, volumes.FIRST_INODE)
    assert volume.runs == [
        VolumeRun(0, 8192, 4096, ((d0, 0), (d1, 4096))),
        VolumeRun(8192, 4096, 4096, ((d0, 8192),)),
    ]
    assert table.by_name == {volume.name: volume} and table.by_inode == {volume.volume_id: volume}


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([(4096, 4096, [("h/s/nothing.img", 0)])], "no disk 'h/s/nothing.img'"),
        ([(8192, 4096, [(PATH, 0), ("h/s/", 0)])], "no disk"),
        ([(4096, 4096, [(PATH, 0)]), (4096, 4096, [("", 0)])], "no disk ''"),
        ([(8192, 4096, [(PATH, MiB - 4096)])], "lies past the end of h/s/d0.img"),
        ([(8192, 4096, [(PATH, 0), ("h/s/d1.img", MiB - 2048)])], "past the end"),
        ([(4096, 4096, [(PATH, 0)]), (4096, 4096, [(PATH, MiB)])], "past the end"),
        ([(4096, 4096, [("h/s/vm", 2 * MiB - 512)])], "past the end of h/s/vm"),
    ],
)
def test_areas_off_the_mounts_disks_are_refused(
    runs: list[tuple[int, int, list[tuple[str, int]]]], message: str
) -> None:
    table, find, _ = _table()
    with pytest.raises(VolumeRefused, match=message) as info:
        table.register(VolumeRequest("vg-lv", runs), find)
    assert "\n" not in str(info.value)
    assert table.by_name == {} and table.by_inode == {}


def test_an_area_may_end_at_its_disks_end() -> None:
    table, find, _ = _table()
    volume = table.register(_request((8192, 4096, [(PATH, MiB - 4096), ("h/s/vm", 0)])), find)
    assert volume.size_bytes == 8192


def test_the_same_layout_gives_the_same_volume() -> None:
    table, find, _ = _table()
    first = table.register(_request(*LAYOUT), find)
    again = channel.check_volume(json.loads(json.dumps({"volume": "vg-lv", "runs": LAYOUT})))
    assert table.register(again, find) is first
    assert table.register(_request(*LAYOUT), find) is first
    assert len(table.by_name) == len(table.by_inode) == 1


def test_a_different_layout_or_name_gives_another_volume() -> None:
    table, find, _ = _table()
    first = table.register(_request(*LAYOUT), find)
    moved = table.register(_request(LAYOUT[0], (4096, 4096, [(PATH, 12288)])), find)
    swapped = table.register(_request(*LAYOUT[::-1]), find)
    renamed = table.register(_request(*LAYOUT, name="vg2-lv"), find)
    made = [first, moved, swapped, renamed]
    assert len({v.name for v in made}) == len({v.volume_id for v in made}) == 4
    assert moved.name.startswith("vg-lv.") and renamed.name.startswith("vg2-lv.")
    assert first.name.split(".")[1] == renamed.name.split(".")[1]  # the layout's digest
    assert table.by_inode == {v.volume_id: v for v in made}


def test_the_table_holds_at_most_max_volumes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volumes, "MAX_VOLUMES", 3)
    table, find, _ = _table()
    made = [table.register(_request((4096, 4096, [(PATH, 4096 * n)])), find) for n in range(3)]
    with pytest.raises(VolumeRefused, match="serves 3 volumes already"):
        table.register(_request((4096, 4096, [(PATH, 4096 * 3)])), find)
    assert table.register(_request((4096, 4096, [(PATH, 4096)])), find) is made[1]
    assert len(table.by_name) == len(table.by_inode) == 3


def test_a_volume_reads_each_stored_image_once() -> None:
    table, find, (d0, d1) = _table()
    runs = [(8192, 4096, [(PATH, 0), ("h/s/d1.img", 0)]), (4096, 4096, [(PATH, 8192)])]
    volume = table.register(_request(*runs, (4096, 4096, [("h/s/d1.img", 8192)])), find)
    assert stored_images(volume) == [d0, d1]
    over_chain = table.register(_request((8192, 4096, [(PATH, 0), ("h/s/vm", 0)])), find)
    assert [i.image_id for i in stored_images(over_chain)] == [0, 7, 8]


# -- the view: MNT/.backupfs/volumes/

UID, GID = 1234, 5678
SDA_BYTES = 4 * MiB


def _view(allow_other: bool = False) -> MountView:
    sda = DiskEntry("sda.img", SDA_BYTES, 0, 4096, "ab" * 32)
    snap = SnapshotEntry(
        "web1", "2026-11-20T0300Z", 7, (sda, DiskEntry("sdb.img", MiB, 0, 4096, "cd" * 32))
    )
    stats = Stats()
    sources = StatsSources("https://x/", stats, BlockCache(1 << 20, stats), 1 << 20, 1 << 20, 0.0)
    tree = build_tree(Catalogue((snap,)), "https://x/", 0)
    return MountView(tree, sources, allow_other=allow_other, uid=UID, gid=GID, wall_ns=lambda: 5)


def _serve(view: MountView, *runs: tuple[int, int, list[tuple[str, int]]]) -> Volume:
    def find(path: str) -> Disk | None:
        node = view.tree.find(path)
        return None if node is None else node.image

    return view.tree.volumes.register(VolumeRequest("vg-lv", list(runs)), find)


SDA, SDB = "web1/2026-11-20T0300Z/sda.img", "web1/2026-11-20T0300Z/sdb.img"


def _errno(call: Callable[..., object], *args: object) -> int:
    with pytest.raises(ViewError) as err:
        call(*args)
    return err.value.errno


def test_the_volumes_directory_is_found_by_lookup() -> None:
    view = _view()
    attrs = view.lookup(CONTROL_DIR_INODE, control.VOLUMES_DIR)
    assert attrs.inode == VOLUMES_DIR_INODE and attrs == view.attributes(VOLUMES_DIR_INODE)
    assert attrs.mode == stat.S_IFDIR | 0o500 and attrs.nlink == 2
    assert view.attributes(CONTROL_DIR_INODE).nlink == 3  # . , .. and volumes/
    assert (VOLUMES_DIR_INODE, "volumes") in view.entries(CONTROL_DIR_INODE)
    view.open_dir(VOLUMES_DIR_INODE)
    assert _errno(view.open_file, VOLUMES_DIR_INODE, os.O_RDONLY) == errno.EISDIR
    assert _errno(view.lookup, ROOT_INODE, "volumes") == errno.ENOENT
    assert _errno(view.lookup, VOLUMES_DIR_INODE, "vg-lv") == errno.ENOENT
    assert view.entries(VOLUMES_DIR_INODE) == []


def test_the_volumes_directory_lists_the_registered_volumes() -> None:
    view = _view()
    one = _serve(view, (8192, 4096, [(SDA, 0), (SDB, 0)]))
    two = _serve(view, (4096, 4096, [(SDA, MiB)]), (4096, 4096, [(SDB, 8192)]))
    assert _serve(view, (8192, 4096, [(SDA, 0), (SDB, 0)])) is one
    assert view.entries(VOLUMES_DIR_INODE) == [(one.volume_id, one.name), (two.volume_id, two.name)]
    assert view.lookup(VOLUMES_DIR_INODE, two.name).inode == two.volume_id
    assert _errno(view.lookup, CONTROL_DIR_INODE, one.name) == errno.ENOENT  # only in volumes/


@pytest.mark.parametrize(("allow_other", "mode"), [(False, 0o400), (True, 0o444)])
def test_a_volume_is_a_read_only_regular_file_of_its_size(allow_other: bool, mode: int) -> None:
    view = _view(allow_other)
    volume = _serve(view, (3 * 4096 * 2, 4096, [(SDA, 0), (SDB, 0), (SDA, 2 * MiB)]))
    attrs = view.lookup(VOLUMES_DIR_INODE, volume.name)
    assert attrs == view.attributes(volume.volume_id)
    assert (attrs.inode, attrs.mode, attrs.nlink) == (volume.volume_id, stat.S_IFREG | mode, 1)
    assert (attrs.size, attrs.blocks) == (3 * 4096 * 2, 3 * 4096 * 2 // 512)
    assert (attrs.uid, attrs.gid) == (UID, GID)
    assert attrs.attr_timeout_s == attrs.entry_timeout_s == IMMUTABLE_TIMEOUT_S
    assert _errno(view.open_dir, volume.volume_id) == errno.ENOTDIR


def test_opening_a_volume_gives_it_and_writing_is_erofs() -> None:
    view = _view()
    volume = _serve(view, (8192, 4096, [(SDA, 0), (SDB, 0)]))
    opened = view.open_file(volume.volume_id, os.O_RDONLY | os.O_NOATIME)
    assert isinstance(opened, ImageFile)
    assert opened.image is volume and opened.name == volume.name
    for flag in (os.O_WRONLY, os.O_RDWR, os.O_TRUNC, os.O_APPEND, os.O_WRONLY | os.O_CREAT):
        assert _errno(view.open_file, volume.volume_id, flag) == errno.EROFS


def test_the_root_listing_still_hides_the_control_directory() -> None:
    view = _view()
    _serve(view, (8192, 4096, [(SDA, 0), (SDB, 0)]))
    names = [name for _, name in view.entries(ROOT_INODE)]
    assert names == ["web1"]
