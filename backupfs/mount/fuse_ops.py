"""The pyfuse3 adapter: translates FUSE requests to the mount's view and the block reader.

What the filesystem shows (attributes, names, listings, the control directory) is
decided by `view.py`; this module only converts its plain data to pyfuse3's types, keeps
the file handles and serves reads. Only this module imports pyfuse3 (with `daemon.py`,
which runs its main loop); errno mapping happens here and nowhere else: `_replies`, which
every handler wears.
"""

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from backupfs.errors import FetchError, StoreError
from backupfs.mount import control
from backupfs.mount.fill import Filler
from backupfs.mount.tree import ROOT_INODE, Tree
from backupfs.mount.view import Attributes, ControlFile, ImageFile, MountView, ViewError
from backupfs.readpath.blocks import background_reads
from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker
from backupfs.readpath.vdisk import DiskReader
from backupfs.remote.metadata import DigestLoader
from backupfs.store.image import VirtualDisk

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
_U64_MAX = (1 << 64) - 1  # fsblkcnt_t, fsfilcnt_t


def _replies(handler: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """The one place where failures become FUSE error replies. A ViewError is its errno;
    a fetch failure is EIO (its fetch task logged it), a store failure EIO and one log
    line; anything else is a bug: EIO, and its traceback in the log. pyfuse3 ends its main
    loop (the mount dies) on any exception but FUSEError, so none other may leave."""
    name = handler.__name__

    @functools.wraps(handler)
    async def reply(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ViewError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except FetchError as exc:
            log.debug("FUSE %s: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except StoreError as exc:
            log.error("FUSE %s: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            first = args[1] if len(args) > 1 and isinstance(args[1], int) else ""
            log.exception("FUSE %s(%s) failed; replied EIO", name, first)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return reply


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


def _ours(pid: int) -> bool:
    """Whether a request comes from one of this process's threads (FUSE names the thread)."""
    return pid == os.getpid() or os.path.exists(f"/proc/self/task/{pid}")


class BackupFsOps(pyfuse3.Operations):
    def __init__(
        self,
        tree: Tree,
        disks: DiskReader,
        digests: DigestLoader,
        readahead: ReadaheadConfig,
        allow_other: bool,
        sources: control.StatsSources,
        filler: Filler | None = None,
    ) -> None:
        super().__init__()
        self.filler = filler  # the background fill (fill=auto), or None
        self.disks = disks  # raw images and guests' disks: qcow2, VMDK, VHD(X) chains
        self.digests = digests
        self.readahead = readahead
        # With the inode; no tracker (no readahead) for the daemon's own reads: the fill's
        # metadata walk reads through the mount, and says nothing about what comes next.
        self._handles: dict[int, tuple[ImageFile, StreamTracker | None, int]] = {}
        # One tracker per open image, shared by its handles while any is open: the loop
        # devices of an attachment's clones each hold a handle, and a stream read in turn
        # over them is sequential on the image, never on one handle.
        self._trackers: dict[int, StreamTracker] = {}
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
        return list(self._trackers.values())

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @_replies
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _entry_attributes(self.view.attributes(inode))

    def _host_of(self, inode: int) -> str | None:
        """The host a host or snapshot directory is of, if its tree fills hosts on demand."""
        tree = self.view.tree
        if tree.loader is None:
            return None
        host = tree.host_name(inode)
        if host is None and inode in tree.nodes:
            host = tree.host_name(tree.nodes[inode].parent)
        return host

    async def _loaded(self, inode: int) -> None:
        """A host or snapshot directory's entries are in the tree (mount/catalogue.py)."""
        host = self._host_of(inode)
        loader = self.view.tree.loader
        if host is not None and loader is not None:
            await loader.ensure_host(host)

    async def _refreshed(self, inode: int) -> bool:
        """The catalogue read again (at most every catalogue_refresh= seconds) before the
        root or a host directory is listed or misses a name; whether it changed."""
        loader = self.view.tree.loader
        if loader is None or (inode != ROOT_INODE and self.view.tree.host_name(inode) is None):
            return False
        return await loader.refresh()

    @_replies
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._loaded(parent_inode)
        try:
            return _entry_attributes(self.view.lookup(parent_inode, os.fsdecode(name)))
        except ViewError as exc:
            if exc.errno != errno.ENOENT or not await self._refreshed(parent_inode):
                raise
        await self._loaded(parent_inode)  # a snapshot new since the mount
        return _entry_attributes(self.view.lookup(parent_inode, os.fsdecode(name)))

    @_replies
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.view.open_dir(inode)
        return inode

    @_replies
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            await self._refreshed(fh)
        await self._loaded(fh)
        for inode, name in self.view.entries(fh):
            if inode <= start_id:
                continue
            attrs = _entry_attributes(self.view.attributes(inode))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, inode):
                return

    @_replies
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        opened = self.view.open_file(inode, flags)
        if isinstance(opened, ControlFile):
            fh = self._new_fh()
            self._control_handles[fh] = opened.contents
            return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, fh), direct_io=True)
        await self.digests.ensure_served(opened.image)  # a StoreError: EIO, logged by _replies
        if isinstance(opened.image, VirtualDisk):
            await self.disks.open(opened.image)  # its headers and first tables
        fh = self._new_fh()
        tracker = None
        if not _ours(ctx.pid):
            tracker = self._trackers.setdefault(inode, StreamTracker(self.readahead))
        self._handles[fh] = (opened, tracker, inode)
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, fh), keep_cache=True)

    @_replies
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self._control_handles:
            return self._control_handles[fh][off : off + size]
        handle = self._handles.get(fh)
        if handle is None:
            raise ViewError(errno.EBADF)
        opened, tracker, inode = handle
        if self.filler is not None:
            self.filler.on_read(inode, opened.image)
        # Only the daemon's own handles have no tracker: their reads wait for nobody.
        with background_reads(tracker is None):
            return await self.disks.read(opened.image, off, size, tracker)

    @_replies
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and not any(h[2] == handle[2] for h in self._handles.values()):
            self._trackers.pop(handle[2], None)  # the image's last handle
        self._control_handles.pop(fh, None)

    @_replies
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_replies
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    @_replies
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        fs = self.view.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = fs.block_bytes
        st.f_blocks = min(fs.blocks, _U64_MAX)  # many huge images would overflow it
        st.f_bfree = st.f_bavail = fs.blocks_free
        st.f_files = fs.files
        st.f_ffree = st.f_favail = fs.files_free
        st.f_namemax = fs.name_max
        return st
