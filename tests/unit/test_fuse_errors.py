"""Every FUSE handler of mount.fuse_ops answers, whatever goes wrong below it.

pyfuse3 ends its main loop (the mount dies, "Transport endpoint is not connected") on any
exception from a handler but FUSEError. The handlers are called directly here, with no
kernel and no mount, over a view, reader or digest loader that raises.
"""

import errno
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import pytest

from backupfs.errors import FetchError, ManifestError
from backupfs.mount import fuse_ops
from backupfs.mount.control import StatsSources
from backupfs.mount.fuse_ops import BackupFsOps
from backupfs.mount.tree import ROOT_INODE, Tree
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker
from backupfs.readpath.vdisk import DiskReader
from backupfs.stats import Stats
from backupfs.store.image import Image

CTX: Any = pyfuse3.RequestContext()
HOST, SNAP, DISK = 2, 3, 4


class Boom(Exception):
    """A bug: nobody expects it."""


class FakeReader:
    def __init__(self) -> None:
        self.error: Exception | None = None

    async def read(
        self, image: Image, off: int, size: int, tracker: StreamTracker, counted: bool = True
    ) -> bytes:
        if self.error is not None:
            raise self.error
        return b"\0" * size


class FakeDigests:
    def __init__(self) -> None:
        self.error: Exception | None = None

    async def ensure(self, image: Image) -> None:
        if self.error is not None:
            raise self.error

    async def ensure_served(self, image: Image) -> None:
        await self.ensure(image)


def _image(size: int = 1 << 20, image_id: int = DISK) -> Image:
    return Image(image_id, f"http://x/{image_id}.img", size, 4096, 4096)


def _ops(tree: Tree | None = None) -> BackupFsOps:
    if tree is None:
        tree = Tree()
        host = tree.add(ROOT_INODE, "h", 0)
        snap = tree.add(host.inode, "s", 0)
        tree.add(snap.inode, "d.img", 0, _image())
    stats = Stats()
    sources = StatsSources("http://x/", stats, BlockCache(1 << 20, stats), 1 << 20, 1 << 20, 0.0)
    reader: Any = FakeReader()
    digests: Any = FakeDigests()
    return BackupFsOps(tree, DiskReader(reader), digests, ReadaheadConfig(), False, sources)


def _raise(exc: Exception) -> Callable[..., Any]:
    def raiser(*args: object) -> Any:
        raise exc

    return raiser


async def _errno_of(call: Awaitable[object]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


# Each handler, the part of the view (or the handler's own state) it goes through, and
# how to call it.
HANDLERS: dict[str, tuple[str, Callable[[BackupFsOps], Awaitable[object]]]] = {
    "getattr": ("attributes", lambda ops: ops.getattr(DISK, CTX)),
    "lookup": ("lookup", lambda ops: ops.lookup(SNAP, b"d.img", CTX)),
    "opendir": ("open_dir", lambda ops: ops.opendir(SNAP, CTX)),
    "readdir": ("entries", lambda ops: ops.readdir(SNAP, 0, None)),  # type: ignore[arg-type]
    "open": ("open_file", lambda ops: ops.open(DISK, 0, CTX)),
    "statfs": ("statfs", lambda ops: ops.statfs(CTX)),
}


@pytest.mark.parametrize(("part", "call"), HANDLERS.values(), ids=HANDLERS.keys())
async def test_a_bug_below_a_handler_is_eio_and_one_log_line_with_its_traceback(
    part: str,
    call: Callable[[BackupFsOps], Awaitable[object]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ops = _ops()
    setattr(ops.view, part, _raise(Boom("bug")))
    assert await _errno_of(call(ops)) == errno.EIO
    records = [r for r in caplog.records if r.name == fuse_ops.__name__]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert records[0].exc_info is not None and records[0].exc_info[0] is Boom
    assert "replied EIO" in records[0].getMessage()


async def test_read_and_release_answer_too(caplog: pytest.LogCaptureFixture) -> None:
    ops = _ops()
    fh = (await ops.open(DISK, 0, CTX)).fh
    ops.disks.reader.error = Boom("bug")  # type: ignore[attr-defined]
    assert await _errno_of(ops.read(fh, 0, 4096)) == errno.EIO
    assert await _errno_of(ops.read(fh + 100, 0, 4096)) == errno.EBADF  # never opened
    ops._handles = _Unpoppable()  # type: ignore[assignment]
    assert await _errno_of(ops.release(fh)) == errno.EIO
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [Boom, Boom]


class _Unpoppable(dict[int, Any]):
    def pop(self, *args: object) -> Any:
        raise Boom("bug")


async def test_the_expected_failures_keep_their_errno_and_their_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ops = _ops()
    assert await _errno_of(ops.lookup(SNAP, b"nothing", CTX)) == errno.ENOENT
    assert await _errno_of(ops.opendir(DISK, CTX)) == errno.ENOTDIR
    assert await _errno_of(ops.open(DISK, 1, CTX)) == errno.EROFS
    assert await _errno_of(ops.getxattr(DISK, b"user.x", CTX)) == pyfuse3.ENOATTR
    assert await ops.listxattr(DISK, CTX) == []
    ops.digests.error = ManifestError("digest file of x does not match")  # type: ignore[attr-defined]
    assert await _errno_of(ops.open(DISK, 0, CTX)) == errno.EIO
    ops.digests.error = None  # type: ignore[attr-defined]
    fh = (await ops.open(DISK, 0, CTX)).fh
    ops.disks.reader.error = FetchError("HTTP 500", transient=True)  # type: ignore[attr-defined]
    assert await _errno_of(ops.read(fh, 0, 10)) == errno.EIO
    logged = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records
              if r.levelno >= logging.WARNING]  # fmt: skip
    assert logged == [(logging.ERROR, "FUSE open: digest file of x does not match", None)]


async def test_attributes_the_kernel_cannot_take_are_eio_not_a_dead_mount() -> None:
    """A tree built past the catalogue's checks (an image of 2**63 bytes overflows
    st_size): getattr, lookup and readdir answer EIO."""
    tree = Tree()
    tree.add(ROOT_INODE, "h", 0, _image(size=1 << 63, image_id=2))
    ops = _ops(tree)
    assert await _errno_of(ops.getattr(2, CTX)) == errno.EIO
    assert await _errno_of(ops.lookup(ROOT_INODE, b"h", CTX)) == errno.EIO
    assert await _errno_of(ops.readdir(ROOT_INODE, 0, None)) == errno.EIO  # type: ignore[arg-type]


async def test_statfs_of_many_huge_images_is_clamped() -> None:
    tree = Tree()
    for n in range(9000):  # 9000 * 2**51 blocks of 4 KiB: more than an f_blocks holds
        tree.add(ROOT_INODE, f"d{n}", 0, _image(size=(1 << 63) - 1, image_id=n + 2))
    st = await _ops(tree).statfs(CTX)
    assert st.f_blocks == (1 << 64) - 1


def test_every_handler_is_wrapped() -> None:
    """The one errno-mapping place is on every handler BackupFsOps defines."""
    defined = {
        name
        for name, member in vars(BackupFsOps).items()
        if inspect.iscoroutinefunction(inspect.unwrap(member)) and hasattr(pyfuse3.Operations, name)
    }
    assert {"getattr", "lookup", "opendir", "readdir", "open", "read", "release", "statfs",
            "getxattr", "listxattr"} <= defined  # fmt: skip
    for name in defined:
        member = vars(BackupFsOps)[name]
        assert inspect.unwrap(member) is not member, f"{name} is not wrapped by _replies"
