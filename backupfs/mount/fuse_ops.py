"""The pyfuse3 adapter: translates FUSE requests to the mount's view and the block reader.

What the filesystem shows (attributes, names, listings, the control directory) is
decided by `view.py`; this module only converts its plain data to pyfuse3's types, keeps
the file handles and serves reads. Only this module imports pyfuse3 (with `daemon.py`,
which runs its main loop); errno mapping happens here and nowhere else.
"""

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from typing import cast

import pyfuse3
import trio

from backupfs.errors import FetchError, StoreError
from backupfs.mount import control
from backupfs.mount.tree import Tree
from backupfs.mount.view import Attributes, ControlFile, ImageFile, MountView, ViewError
from backupfs.readpath.blocks import BlockReader
from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker
from backupfs.remote.metadata import DigestLoader

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _view_errors() -> Iterator[None]:
    """The one place where the view's refusals become FUSE error replies."""
    try:
        yield
    except ViewError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None


def _entry_attributes(attrs: Attributes) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = cast(pyfuse3.InodeT, attrs.inode)
    entry.entry_timeout = attrs.entry_timeout_s
    entry.attr_timeout = attrs.attr_timeout_s
    entry.st_mode = attrs.mode
    entry.st_nlink = attrs.nlink
    entry.st_size = attrs.size
    entry.st_blksize = attrs.blksize
    entry.st_blocks = attrs.blocks
    entry.st_uid, entry.st_gid = attrs.uid, attrs.gid
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attrs.mtime_ns
    return entry


class BackupFsOps(pyfuse3.Operations):
    def __init__(
        self,
        tree: Tree,
        reader: BlockReader,
        digests: DigestLoader,
        readahead: ReadaheadConfig,
        allow_other: bool,
        sources: control.StatsSources,
    ) -> None:
        super().__init__()
        self.reader = reader
        self.digests = digests
        self.readahead = readahead
        self._handles: dict[int, tuple[ImageFile, StreamTracker]] = {}
        self._control_handles: dict[int, bytes] = {}  # contents rendered at open
        self._next_fh = 1
        self.view = MountView(
            tree,
            sources,
            allow_other=allow_other,
            uid=os.getuid(),
            gid=os.getgid(),
            open_trackers=self._open_trackers,
        )
        self.initialized = trio.Event()  # set once the kernel's FUSE_INIT is answered

    def init(self) -> None:
        self.initialized.set()

    def _open_trackers(self) -> list[StreamTracker]:
        return [tracker for _, tracker in self._handles.values()]

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _view_errors():
            return _entry_attributes(self.view.attributes(inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _view_errors():
            return _entry_attributes(self.view.lookup(parent_inode, os.fsdecode(name)))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with _view_errors():
            self.view.open_dir(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        with _view_errors():
            for inode, name in self.view.entries(fh):
                if inode <= start_id:
                    continue
                attrs = _entry_attributes(self.view.attributes(inode))
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, inode):
                    return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        with _view_errors():
            opened = self.view.open_file(inode, flags)
        if isinstance(opened, ControlFile):
            fh = self._new_fh()
            self._control_handles[fh] = opened.contents
            return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, fh), direct_io=True)
        try:
            await self.digests.ensure(opened.image)
        except StoreError as exc:
            log.error("cannot open %s: %s", opened.name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        fh = self._new_fh()
        self._handles[fh] = (opened, StreamTracker(self.readahead))
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, fh), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self._control_handles:
            return self._control_handles[fh][off : off + size]
        opened, tracker = self._handles[fh]
        try:
            return await self.reader.read(opened.image, off, size, tracker)
        except FetchError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error reading %s", opened.name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
        self._control_handles.pop(fh, None)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        fs = self.view.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = fs.block_bytes
        st.f_blocks = fs.blocks
        st.f_bfree = st.f_bavail = fs.blocks_free
        st.f_files = fs.files
        st.f_ffree = st.f_favail = fs.files_free
        st.f_namemax = fs.name_max
        return st
