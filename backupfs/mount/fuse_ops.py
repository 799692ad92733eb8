"""The pyfuse3 adapter: translates FUSE requests to the tree and the block reader.

Only this module imports pyfuse3 (with `daemon.py`, which runs its main loop); errno
mapping happens here and nowhere else.
"""

import errno
import logging
import os
import stat
import time
from typing import cast

import pyfuse3
import trio

from backupfs.errors import FetchError, StoreError
from backupfs.mount import control
from backupfs.mount.tree import ROOT_INODE, Node, Tree
from backupfs.readpath.blocks import BlockReader
from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker
from backupfs.remote.metadata import DigestLoader

log = logging.getLogger(__name__)
IMMUTABLE_TIMEOUT_S = 24 * 3600.0  # snapshots never change: cache names and attributes a day


class BackupFsOps(pyfuse3.Operations):
    def __init__(
        self,
        tree: Tree,
        reader: BlockReader,
        digests: DigestLoader,
        readahead: ReadaheadConfig,
        allow_other: bool,
        view: control.MountView,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.view = view
        self.reader = reader
        self.digests = digests
        self.readahead = readahead
        self.uid, self.gid = os.getuid(), os.getgid()
        self.file_mode = 0o444 if allow_other else 0o400
        self.dir_mode = 0o555 if allow_other else 0o500
        self._handles: dict[int, tuple[Node, StreamTracker]] = {}
        self._control_handles: dict[int, bytes] = {}  # contents rendered at open
        self._next_fh = 1
        self.initialized = trio.Event()  # set once the kernel's FUSE_INIT is answered

    def init(self) -> None:
        self.initialized.set()

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _render(self, inode: int) -> bytes:
        trackers = [tracker for _, tracker in self._handles.values()]
        return control.render(inode, self.view, trackers, time.monotonic())

    def _control_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        """Control files change with every read: nothing about them is cached."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = cast(pyfuse3.InodeT, inode)
        if inode == control.CONTROL_DIR_INODE:
            attr.st_mode = stat.S_IFDIR | self.dir_mode
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | self.file_mode
            attr.st_nlink = 1
            attr.st_size = len(self._render(inode))
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = time.time_ns()
        return attr

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = cast(pyfuse3.InodeT, node.inode)
        attr.entry_timeout = IMMUTABLE_TIMEOUT_S
        attr.attr_timeout = IMMUTABLE_TIMEOUT_S
        if node.is_dir:
            attr.st_mode = stat.S_IFDIR | self.dir_mode
            attr.st_nlink = 2 + sum(self.tree.nodes[i].is_dir for i in node.children.values())
        else:
            attr.st_mode = stat.S_IFREG | self.file_mode
            attr.st_nlink = 1
        attr.st_size = node.size_bytes
        attr.st_blksize = 1 << 20
        attr.st_blocks = -(-node.size_bytes // 512)
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if control.is_control(inode):
            return self._control_attr(inode)
        return self._attr(self._node(inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if parent_inode == ROOT_INODE and text == control.CONTROL_DIR:
            return self._control_attr(control.CONTROL_DIR_INODE)
        if parent_inode == control.CONTROL_DIR_INODE and text in control.FILES:
            return self._control_attr(control.FILES[text])
        if control.is_control(parent_inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.tree.lookup(parent_inode, text)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(node)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != control.CONTROL_DIR_INODE and not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The control directory lists its files; the root does not list the control directory.
        if fh == control.CONTROL_DIR_INODE:
            entries = [(inode, name) for name, inode in control.FILES.items()]
        else:
            entries = [(i, self.tree.nodes[i].name) for i in self._node(fh).children.values()]
        for inode, name in sorted(entries):
            if inode <= start_id:
                continue
            attr = (
                self._control_attr(inode)
                if control.is_control(inode)
                else self._attr(self.tree.nodes[inode])
            )
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, inode):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if control.is_control(inode):
            if inode == control.CONTROL_DIR_INODE:
                raise pyfuse3.FUSEError(errno.EISDIR)
            fh = self._new_fh()
            self._control_handles[fh] = self._render(inode)
            return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, fh), direct_io=True)
        node = self._node(inode)
        if node.image is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            await self.digests.ensure(node.image)
        except StoreError as exc:
            log.error("cannot open %s: %s", node.name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        fh = self._new_fh()
        self._handles[fh] = (node, StreamTracker(self.readahead))
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, fh), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self._control_handles:
            return self._control_handles[fh][off : off + size]
        node, tracker = self._handles[fh]
        assert node.image is not None
        try:
            return await self.reader.read(node.image, off, size, tracker)
        except FetchError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error reading %s", node.name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
        self._control_handles.pop(fh, None)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = sum(-(-i.size_bytes // 4096) for i in self.tree.images())
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.tree.nodes)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st
