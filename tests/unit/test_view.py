"""What the mount shows (mount.view), driven without FUSE."""

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from backupfs.mount import control
from backupfs.mount.control import (
    CONTROL_DIR_INODE,
    METRICS_INODE,
    STATS_INODE,
    VOLUMES_DIR_INODE,
    StatsSources,
)
from backupfs.mount.tree import ROOT_INODE, Tree, build_tree
from backupfs.mount.view import (
    IMMUTABLE_TIMEOUT_S,
    ControlFile,
    ImageFile,
    MountView,
    ViewError,
)
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.readahead import ReadaheadConfig, Stream, StreamTracker
from backupfs.stats import Stats
from backupfs.store.image import Image
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

T1 = 1_795_143_600_000_000_000  # 2026-11-20T0300Z
T2 = 1_795_230_000_000_000_000
WALL_NS = 1_800_000_000_123_456_789
UID, GID = 1234, 5678
SDA_BYTES = 10_000
# build_tree numbers inodes in catalogue order:
WEB1, SNAP1, SDA1, SDB1, SNAP2, SDA2, DB, WEEKLY = range(2, 10)


def _catalogue() -> Catalogue:
    sda = DiskEntry("sda.img", SDA_BYTES, 0, 4096, "ab" * 32)
    sdb = DiskEntry("sdb.img", 0, 0, 1 << 20, "0" * 64)
    return Catalogue(
        (
            SnapshotEntry("web1", "2026-11-20T0300Z", T1, (sda, sdb)),
            SnapshotEntry("web1", "2026-11-21T0300Z", T2, (sda,)),
            SnapshotEntry("db", "weekly", 5, ()),
        )
    )


def _sources(stats: Stats | None = None) -> StatsSources:
    stats = stats or Stats()
    return StatsSources(
        store_url="https://backup.example/store/",
        stats=stats,
        cache=BlockCache(1 << 20, stats),
        cache_max_bytes=1 << 20,
        readahead_max_bytes=64 << 20,
        started_s=100.0,
    )


def _view(
    allow_other: bool = False,
    sources: StatsSources | None = None,
    trackers: list[StreamTracker] | None = None,
) -> MountView:
    return MountView(
        build_tree(_catalogue(), "https://backup.example/store/", 0),
        sources or _sources(),
        allow_other=allow_other,
        uid=UID,
        gid=GID,
        open_trackers=lambda: trackers or [],
        wall_ns=lambda: WALL_NS,
        monotonic_s=lambda: 142.25,
    )


def _errno(call: Callable[..., object], *args: object) -> int:
    with pytest.raises(ViewError) as err:
        call(*args)
    return err.value.errno


def test_tree_inodes_are_as_the_tests_assume() -> None:
    view = _view()
    names = {i: n.name for i, n in view.tree.nodes.items()}
    assert names == {
        ROOT_INODE: "",
        WEB1: "web1",
        SNAP1: "2026-11-20T0300Z",
        SDA1: "sda.img",
        SDB1: "sdb.img",
        SNAP2: "2026-11-21T0300Z",
        SDA2: "sda.img",
        DB: "db",
        WEEKLY: "weekly",
    }


def test_owner_only_modes_by_default() -> None:
    view = _view()
    assert view.attributes(SDA1).mode == stat.S_IFREG | 0o400
    for inode in (ROOT_INODE, WEB1, SNAP1, WEEKLY):
        assert view.attributes(inode).mode == stat.S_IFDIR | 0o500
    assert view.attributes(CONTROL_DIR_INODE).mode == stat.S_IFDIR | 0o500
    assert view.attributes(STATS_INODE).mode == stat.S_IFREG | 0o400


def test_allow_other_makes_everything_world_readable() -> None:
    view = _view(allow_other=True)
    assert view.attributes(SDA1).mode == stat.S_IFREG | 0o444
    assert view.attributes(SNAP1).mode == stat.S_IFDIR | 0o555
    assert view.attributes(ROOT_INODE).mode == stat.S_IFDIR | 0o555
    assert view.attributes(CONTROL_DIR_INODE).mode == stat.S_IFDIR | 0o555
    assert view.attributes(STATS_INODE).mode == stat.S_IFREG | 0o444


def test_owner_is_the_given_uid_and_gid() -> None:
    view = _view()
    for inode in (ROOT_INODE, SDA1, CONTROL_DIR_INODE, STATS_INODE):
        attrs = view.attributes(inode)
        assert (attrs.uid, attrs.gid) == (UID, GID)


def test_directory_nlink_counts_subdirectories() -> None:
    view = _view()
    assert view.attributes(ROOT_INODE).nlink == 4  # web1, db
    assert view.attributes(WEB1).nlink == 4  # two snapshots
    assert view.attributes(DB).nlink == 3
    assert view.attributes(SNAP1).nlink == 2  # files only
    assert view.attributes(WEEKLY).nlink == 2  # empty
    assert view.attributes(SDA1).nlink == 1
    assert view.attributes(CONTROL_DIR_INODE).nlink == 3  # volumes/
    assert view.attributes(VOLUMES_DIR_INODE).nlink == 2
    assert view.attributes(STATS_INODE).nlink == 1


def test_nlink_of_a_hand_built_tree() -> None:
    tree = Tree()
    top = tree.add(ROOT_INODE, "top", 7)
    for name in ("a", "b", "c"):
        tree.add(top.inode, name, 7)
    image = Image(
        image_id=1, url="http://x/f", size_bytes=1, block_size=4096, digest_block_size=4096
    )
    tree.add(top.inode, "f.img", 7, image)
    view = MountView(tree, _sources(), allow_other=False, uid=0, gid=0)
    assert view.attributes(top.inode).nlink == 2 + 3
    assert view.attributes(ROOT_INODE).nlink == 3
    assert view.attributes(top.inode).mtime_ns == 7


def test_sizes_and_blocks() -> None:
    view = _view()
    sda = view.attributes(SDA1)
    assert (sda.size, sda.blocks, sda.blksize) == (SDA_BYTES, 20, 1 << 20)  # 10000/512 rounded up
    sdb = view.attributes(SDB1)
    assert (sdb.size, sdb.blocks) == (0, 0)
    snap = view.attributes(SNAP1)
    assert (snap.size, snap.blocks) == (0, 0)


def test_mtimes_come_from_the_snapshots() -> None:
    view = _view()
    assert view.attributes(SDA1).mtime_ns == T1
    assert view.attributes(SDA2).mtime_ns == T2
    assert view.attributes(SNAP1).mtime_ns == T1
    assert view.attributes(WEB1).mtime_ns == T2  # the newest snapshot
    assert view.attributes(WEEKLY).mtime_ns == 5
    assert view.attributes(ROOT_INODE).mtime_ns == 0  # hosts were added with mtime 0
    assert view.attributes(STATS_INODE).mtime_ns == WALL_NS  # changes all the time
    assert view.attributes(CONTROL_DIR_INODE).mtime_ns == WALL_NS


def test_tree_attributes_are_cached_for_a_day() -> None:
    attrs = _view().attributes(SDA1)
    assert attrs.entry_timeout_s == attrs.attr_timeout_s == IMMUTABLE_TIMEOUT_S == 86400.0


def test_lookup_finds_entries_with_their_attributes() -> None:
    view = _view()
    assert view.lookup(ROOT_INODE, "web1") == view.attributes(WEB1)
    assert view.lookup(WEB1, "2026-11-21T0300Z").inode == SNAP2
    assert view.lookup(SNAP2, "sda.img") == view.attributes(SDA2)


def test_lookup_of_unknown_names_is_enoent() -> None:
    view = _view()
    assert _errno(view.lookup, ROOT_INODE, "nobody") == errno.ENOENT
    assert _errno(view.lookup, SNAP1, "sdc.img") == errno.ENOENT
    assert _errno(view.lookup, SDA1, "x") == errno.ENOENT  # a file has no entries
    assert _errno(view.lookup, 999, "x") == errno.ENOENT  # no such directory
    assert _errno(view.lookup, CONTROL_DIR_INODE, "nothing") == errno.ENOENT
    assert _errno(view.lookup, STATS_INODE, "x") == errno.ENOENT


def test_control_dir_answers_lookup_only_at_the_root() -> None:
    view = _view()
    attrs = view.lookup(ROOT_INODE, ".backupfs")
    assert attrs.inode == CONTROL_DIR_INODE and stat.S_ISDIR(attrs.mode)
    assert view.lookup(CONTROL_DIR_INODE, "stats").inode == STATS_INODE
    assert _errno(view.lookup, WEB1, ".backupfs") == errno.ENOENT
    assert _errno(view.lookup, SNAP1, ".backupfs") == errno.ENOENT


def test_control_dir_is_absent_from_the_root_listing() -> None:
    view = _view()
    assert view.entries(ROOT_INODE) == [(WEB1, "web1"), (DB, "db")]
    assert view.entries(CONTROL_DIR_INODE) == [
        (STATS_INODE, "stats"),
        (VOLUMES_DIR_INODE, "volumes"),
        (METRICS_INODE, "metrics"),
    ]


def test_entries_are_in_inode_order() -> None:
    view = _view()
    assert view.entries(WEB1) == [(SNAP1, "2026-11-20T0300Z"), (SNAP2, "2026-11-21T0300Z")]
    assert view.entries(SNAP1) == [(SDA1, "sda.img"), (SDB1, "sdb.img")]
    assert view.entries(WEEKLY) == []
    tree = Tree()
    for name in ("zz", "aa", "mm"):
        tree.add(ROOT_INODE, name, 0)
    listed = MountView(tree, _sources(), allow_other=False, uid=0, gid=0).entries(ROOT_INODE)
    assert listed == [(2, "zz"), (3, "aa"), (4, "mm")]


def test_entries_and_open_dir_refuse_what_is_not_a_directory() -> None:
    view = _view()
    assert _errno(view.entries, SDA1) == errno.ENOTDIR
    assert _errno(view.entries, 999) == errno.ENOENT
    assert _errno(view.open_dir, SDA1) == errno.ENOTDIR
    assert _errno(view.open_dir, 999) == errno.ENOENT
    assert _errno(view.open_dir, STATS_INODE) == errno.ENOTDIR
    view.open_dir(ROOT_INODE)
    view.open_dir(CONTROL_DIR_INODE)
    view.open_dir(WEEKLY)


def test_unknown_inodes_are_enoent() -> None:
    view = _view()
    assert _errno(view.attributes, 999) == errno.ENOENT
    assert _errno(view.attributes, METRICS_INODE + 1) == errno.ENOENT
    assert _errno(view.open_file, 999, os.O_RDONLY) == errno.ENOENT
    assert _errno(view.open_file, METRICS_INODE + 1, os.O_RDONLY) == errno.ENOENT


def test_stats_file_renders_the_counters() -> None:
    stats = Stats(bytes_served=4096, bytes_fetched=8192, cache_hits=3, cache_misses=2)
    stats.record_fetch(0.25)
    sources = _sources(stats)
    sources.cache.put(("img", 0), b"x" * 1000)
    config = ReadaheadConfig()
    trackers = [
        StreamTracker(config, [Stream(0, window=1 << 20), Stream(0, window=0)]),
        StreamTracker(config, [Stream(0, window=4 << 20)]),
    ]
    view = _view(sources=sources, trackers=trackers)
    opened = view.open_file(STATS_INODE, os.O_RDONLY)
    assert isinstance(opened, ControlFile) and opened.contents.endswith(b"\n")
    doc = json.loads(opened.contents)
    assert doc["store"] == "https://backup.example/store/"
    assert doc["uptime_s"] == 42.2  # 142.25 - 100.0, rounded
    assert doc["bytes_served"] == 4096 and doc["bytes_fetched"] == 8192
    assert doc["cache_hits"] == 3 and doc["cache_misses"] == 2
    assert doc["fetch_p50_ms"] == 250.0
    assert doc["blocks_in_cache"] == 1 and doc["cache_bytes"] == 1000
    assert doc["cache_max_bytes"] == 1 << 20
    assert doc["readahead_windows"] == [4 << 20, 1 << 20]
    assert doc["readahead_max_bytes"] == 64 << 20
    assert view.attributes(STATS_INODE).size == len(opened.contents)


def test_stats_file_is_rendered_at_each_open() -> None:
    sources = _sources()
    view = _view(sources=sources)
    first = view.open_file(STATS_INODE, os.O_RDONLY)
    sources.stats.bytes_served = 123_456_789
    second = view.open_file(STATS_INODE, os.O_RDONLY)
    assert isinstance(first, ControlFile) and isinstance(second, ControlFile)
    assert json.loads(first.contents)["bytes_served"] == 0  # an open handle keeps its snapshot
    assert json.loads(second.contents)["bytes_served"] == 123_456_789
    assert view.attributes(STATS_INODE).size == len(second.contents) > len(first.contents)


@pytest.mark.parametrize("flag", [os.O_WRONLY, os.O_RDWR, os.O_TRUNC, os.O_APPEND])
def test_write_flags_give_erofs(flag: int) -> None:
    view = _view()
    for inode in (SDA1, STATS_INODE, SNAP1, CONTROL_DIR_INODE, 999):
        assert _errno(view.open_file, inode, flag | os.O_CREAT) == errno.EROFS


def test_opening_a_directory_is_eisdir() -> None:
    view = _view()
    for inode in (ROOT_INODE, WEB1, SNAP1, CONTROL_DIR_INODE):
        assert _errno(view.open_file, inode, os.O_RDONLY) == errno.EISDIR


def test_opening_an_image_gives_it() -> None:
    view = _view()
    opened = view.open_file(SDA2, os.O_RDONLY | os.O_NOATIME)
    assert isinstance(opened, ImageFile)
    assert opened.name == "sda.img" and opened.image is view.tree.nodes[SDA2].image
    assert opened.image.url == "https://backup.example/store/web1/2026-11-21T0300Z/sda.img"


def test_statfs_counts_blocks_and_files() -> None:
    fs = _view().statfs()
    assert fs.block_bytes == 4096
    assert fs.blocks == 3 + 0 + 3  # two 10000-byte disks in 4 KiB blocks, one empty disk
    assert fs.files == 9  # the root and eight tree nodes, not the control files
    assert fs.blocks_free == fs.files_free == 0
    assert fs.name_max == 255


def test_view_error_carries_errno_and_message() -> None:
    exc = ViewError(errno.EROFS)
    assert exc.errno == errno.EROFS and os.strerror(errno.EROFS) in str(exc)


def test_control_constants() -> None:
    assert control.CONTROL_DIR == ".backupfs"
    assert control.is_control(CONTROL_DIR_INODE) and not control.is_control(WEEKLY)


def test_view_imports_neither_pyfuse3_nor_trio() -> None:
    probe = "import sys, backupfs.mount.view; print(sorted({'pyfuse3', 'trio'} & set(sys.modules)))"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n"
