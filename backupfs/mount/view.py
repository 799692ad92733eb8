"""What the mount shows, as plain data: attributes, names, listings, opens and statfs.

The tree of hosts/snapshots/disks (`tree.py`) plus the hidden control directory
(`control.py`), seen the way a read-only filesystem shows them. It knows nothing of FUSE
and imports neither pyfuse3 nor trio, so unit tests drive it directly; `fuse_ops.py`
translates its answers, and its `ViewError`s into FUSE error replies.
"""

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from backupfs.mount import control
from backupfs.mount.tree import ROOT_INODE, Node, Tree
from backupfs.readpath.readahead import StreamTracker
from backupfs.store.image import Served, Volume

IMMUTABLE_TIMEOUT_S = 24 * 3600.0  # snapshots never change: cache names and attributes a day
# The root and host directories gain entries when the catalogue does (mount/catalogue.py):
# their names stay a day, their attributes (link count, mtime) a second.
GROWING_DIR_ATTR_TIMEOUT_S = 1.0
# Control files always had pyfuse3's default timeouts and st_blksize; kept as they were.
CONTROL_TIMEOUT_S = 300.0
CONTROL_BLKSIZE = 4096
IMAGE_BLKSIZE = 1 << 20  # st_blksize: invites 1 MiB reads
STATFS_BLOCK_BYTES = 4096
NAME_MAX = 255
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_CONTROL_DIRS = (control.CONTROL_DIR_INODE, control.VOLUMES_DIR_INODE)


class ViewError(Exception):
    """A request the view refuses; `errno` is the error the filesystem replies with."""

    def __init__(self, err: int) -> None:
        super().__init__(err, os.strerror(err))
        self.errno = err


@dataclass(frozen=True)
class Attributes:
    inode: int
    mode: int  # file type and permission bits, as st_mode
    nlink: int
    size: int  # bytes
    blksize: int
    blocks: int  # 512-byte units, as st_blocks
    uid: int
    gid: int
    mtime_ns: int  # also the atime and ctime
    entry_timeout_s: float  # how long the kernel may cache the name
    attr_timeout_s: float  # how long the kernel may cache these attributes


@dataclass(frozen=True)
class FsStats:
    """statfs: a read-only filesystem, so nothing is free."""

    block_bytes: int  # f_bsize and f_frsize
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int


@dataclass(frozen=True)
class ControlFile:
    """An opened control file: contents rendered at open, so one handle reads one snapshot."""

    contents: bytes


@dataclass(frozen=True)
class ImageFile:
    """An opened disk: a raw image (the block reader), a guest's disk or a volume
    (readpath.vdisk)."""

    name: str
    image: Served


def _no_trackers() -> Iterable[StreamTracker]:
    return ()


class MountView:
    """The filesystem as plain data.

    `open_trackers` returns the readahead trackers of the open file handles (the
    adapter's), whose windows the stats file reports. The clocks are parameters so tests
    can fix them: `wall_ns` is the control files' mtime, `monotonic_s` the uptime's.
    """

    def __init__(
        self,
        tree: Tree,
        sources: control.StatsSources,
        *,
        allow_other: bool,
        uid: int,
        gid: int,
        open_trackers: Callable[[], Iterable[StreamTracker]] = _no_trackers,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tree = tree
        self.sources = sources
        self.uid, self.gid = uid, gid
        self.file_mode = 0o444 if allow_other else 0o400
        self.dir_mode = 0o555 if allow_other else 0o500
        self._open_trackers = open_trackers
        self._wall_ns = wall_ns
        self._monotonic_s = monotonic_s

    def attributes(self, inode: int) -> Attributes:
        if inode in self.tree.volumes.by_inode:
            return self._volume_attributes(self.tree.volumes.by_inode[inode])
        if control.is_control(inode):
            return self._control_attributes(inode)
        return self._node_attributes(self._node(inode))

    def lookup(self, parent_inode: int, name: str) -> Attributes:
        """The entry `name` of a directory; ENOENT if there is none.

        `.backupfs` is found at the root although the root's `entries` do not list it.
        """
        if parent_inode == ROOT_INODE and name == control.CONTROL_DIR:
            return self._control_attributes(control.CONTROL_DIR_INODE)
        if parent_inode == control.CONTROL_DIR_INODE and name in control.FILES:
            return self._control_attributes(control.FILES[name])
        if parent_inode == control.CONTROL_DIR_INODE and name == control.VOLUMES_DIR:
            return self._control_attributes(control.VOLUMES_DIR_INODE)
        if parent_inode == control.VOLUMES_DIR_INODE and name in self.tree.volumes.by_name:
            return self._volume_attributes(self.tree.volumes.by_name[name])
        if control.is_control(parent_inode) or parent_inode not in self.tree.nodes:
            raise ViewError(errno.ENOENT)
        node = self.tree.lookup(parent_inode, name)
        if node is None:
            raise ViewError(errno.ENOENT)
        return self._node_attributes(node)

    def open_dir(self, inode: int) -> None:
        """Check that `inode` is a directory that can be listed."""
        if inode in _CONTROL_DIRS:
            return
        if control.is_control(inode) or not self._node(inode).is_dir:
            raise ViewError(errno.ENOTDIR)

    def entries(self, dir_inode: int) -> list[tuple[int, str]]:
        """`(inode, name)` of a directory's entries in inode order (readdir resumes after an
        inode). The root's entries leave out the control directory."""
        if dir_inode == control.CONTROL_DIR_INODE:
            files = [*control.FILES.items(), (control.VOLUMES_DIR, control.VOLUMES_DIR_INODE)]
            return sorted((inode, name) for name, inode in files)
        if dir_inode == control.VOLUMES_DIR_INODE:
            return sorted((v.volume_id, v.name) for v in self.tree.volumes.by_name.values())
        node = self._node(dir_inode)
        if not node.is_dir:
            raise ViewError(errno.ENOTDIR)
        return sorted((i, self.tree.nodes[i].name) for i in node.children.values())

    def open_file(self, inode: int, flags: int) -> ControlFile | ImageFile:
        """EROFS for any write flag, EISDIR for a directory; control files render here."""
        if flags & WRITE_FLAGS:
            raise ViewError(errno.EROFS)
        if inode in self.tree.volumes.by_inode:
            volume = self.tree.volumes.by_inode[inode]
            return ImageFile(volume.name, volume)
        if control.is_control(inode):
            if inode in _CONTROL_DIRS:
                raise ViewError(errno.EISDIR)
            return ControlFile(self._render(inode))
        node = self._node(inode)
        if node.image is None:
            raise ViewError(errno.EISDIR)
        return ImageFile(node.name, node.image)

    def statfs(self) -> FsStats:
        return FsStats(
            block_bytes=STATFS_BLOCK_BYTES,
            blocks=sum(-(-i.size_bytes // STATFS_BLOCK_BYTES) for i in self.tree.images()),
            blocks_free=0,
            files=len(self.tree.nodes),
            files_free=0,
            name_max=NAME_MAX,
        )

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise ViewError(errno.ENOENT)
        return node

    def _render(self, inode: int) -> bytes:
        if not control.is_control_file(inode):
            raise ViewError(errno.ENOENT)
        return control.render(inode, self.sources, self._open_trackers(), self._monotonic_s())

    def _control_attributes(self, inode: int) -> Attributes:
        """Control files change with every read; the kernel reads them with direct I/O."""
        if inode in _CONTROL_DIRS:
            subdirs = 1 if inode == control.CONTROL_DIR_INODE else 0  # volumes/
            mode, nlink, size = stat.S_IFDIR | self.dir_mode, 2 + subdirs, 0
        else:
            mode, nlink, size = stat.S_IFREG | self.file_mode, 1, len(self._render(inode))
        return Attributes(
            inode=inode,
            mode=mode,
            nlink=nlink,
            size=size,
            blksize=CONTROL_BLKSIZE,
            blocks=0,
            uid=self.uid,
            gid=self.gid,
            mtime_ns=self._wall_ns(),
            entry_timeout_s=CONTROL_TIMEOUT_S,
            attr_timeout_s=CONTROL_TIMEOUT_S,
        )

    def _volume_attributes(self, volume: Volume) -> Attributes:
        """A volume never changes (its name is its layout's digest): cached like a disk."""
        return Attributes(
            inode=volume.volume_id,
            mode=stat.S_IFREG | self.file_mode,
            nlink=1,
            size=volume.size_bytes,
            blksize=IMAGE_BLKSIZE,
            blocks=-(-volume.size_bytes // 512),
            uid=self.uid,
            gid=self.gid,
            mtime_ns=0,
            entry_timeout_s=IMMUTABLE_TIMEOUT_S,
            attr_timeout_s=IMMUTABLE_TIMEOUT_S,
        )

    def _node_attributes(self, node: Node) -> Attributes:
        attr_timeout_s = IMMUTABLE_TIMEOUT_S
        if node.is_dir:
            mode = stat.S_IFDIR | self.dir_mode
            nlink = 2 + self.tree.subdirs(node)
            if node.inode == ROOT_INODE or node.parent == ROOT_INODE:
                attr_timeout_s = GROWING_DIR_ATTR_TIMEOUT_S
        else:
            mode, nlink = stat.S_IFREG | self.file_mode, 1
        return Attributes(
            inode=node.inode,
            mode=mode,
            nlink=nlink,
            size=node.size_bytes,
            blksize=IMAGE_BLKSIZE,
            blocks=-(-node.size_bytes // 512),
            uid=self.uid,
            gid=self.gid,
            mtime_ns=node.mtime_ns,
            entry_timeout_s=IMMUTABLE_TIMEOUT_S,
            attr_timeout_s=attr_timeout_s,
        )
