"""The mount daemon: build everything in one nursery, mount, serve, tear down in reverse.

`backupfs mount` without -f forks before any trio runtime exists; the child reports
"ready" or a one-line error through a pipe, and the parent waits for it with a deadline.
"""

import contextlib
import json
import logging
import logging.handlers
import os
import select
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pyfuse3
import trio
import trio.lowlevel

from backupfs.errors import EXIT_INTERNAL, UserError, user_error_in
from backupfs.linux.holders import is_dead_mount
from backupfs.linux.mountinfo import top_fstype
from backupfs.mount import control, metrics_export, tuning
from backupfs.mount.control import VOLUMES_REL
from backupfs.mount.fill import Filler, fill_budget
from backupfs.mount.fuse_ops import BackupFsOps
from backupfs.mount.opening import open_store
from backupfs.mount.plan_server import PlanServer
from backupfs.mount.tree import Tree
from backupfs.options import MountOptions
from backupfs.readpath.blocks import BlockReader, ReaderConfig
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.diskcache import DiskCache
from backupfs.readpath.disksource import DiskCachedSource
from backupfs.readpath.readahead import ReadaheadConfig
from backupfs.readpath.source import RangeSource
from backupfs.readpath.vdisk import DiskReader
from backupfs.remote.client import (
    ClientConfig,
    StoreClient,
    enlarge_socket_reads,
    make_clients,
    redact,
)
from backupfs.remote.credentials import Credentials
from backupfs.remote.discovery import UNVERIFIED, Discovered, unverified
from backupfs.remote.metadata import DigestLoader
from backupfs.stats import Stats

log = logging.getLogger(__name__)
_READY = b"R"
_ERROR = b"E"
PLAN_AHEAD_BYTES = 256 << 20  # a read plan is prefetched at most this far ahead


def fuse_mount_options(url: str, opts: MountOptions) -> set[str]:
    fsname = redact(url).replace(",", "%2C")
    options = set(pyfuse3.default_options) | {"ro", f"fsname={fsname}", "subtype=backupfs"}
    if opts.allow_other:
        options.add("allow_other")
    return options


def _served_path(tree: Tree, mountpoint: str, inode: int) -> str | None:
    """Where a served file is in the mount (for the fill's metadata walk)."""
    volume = tree.volumes.by_inode.get(inode)
    if volume is not None:
        return os.path.join(mountpoint, VOLUMES_REL, volume.name)
    rel = tree.path_of(inode)
    return None if rel is None else os.path.join(mountpoint, rel)


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("received signal %d, unmounting", signum)
        scope.cancel()
        return


async def _when_initialized(ops: BackupFsOps, mountpoint: str, ready: Callable[[], None]) -> None:
    """Tune the mount and report ready once the kernel's FUSE_INIT is answered.

    The kernel sets the mount's readahead when it reads our INIT reply, which libfuse
    writes right after ops.init() returns: override it after that.
    """
    await ops.initialized.wait()
    await trio.lowlevel.checkpoint()
    tuning.raise_kernel_readahead(mountpoint)
    ready()


async def serve(
    url: str,
    mountpoint: str,
    opts: MountOptions,
    creds: Credentials,
    ready: Callable[[], None],
    discovered: Discovered | None = None,
) -> None:
    tuning.mark_io_flusher()
    stats = Stats()
    readahead = ReadaheadConfig(max_bytes=opts.readahead)
    # Receive signals from the start, so that one sent right after "ready" is not lost.
    # SIGHUP too, as libfuse does: a closed terminal under `mount -f`, or `systemctl kill -s
    # HUP`, unmounts cleanly instead of leaving a dead mount (log_file= follows logrotate by
    # itself: see setup_logging).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        client_config = ClientConfig.from_options(opts, s3=creds.aws is not None)
        enlarge_socket_reads()
        async with make_clients(client_config, creds) as clients, trio.open_nursery() as nursery:
            store = StoreClient(clients, url, client_config, stats)
            digests = DigestLoader(store, opts.digest_cache_bytes)
            listed = None if discovered is None else discovered.catalogue
            tree = await open_store(store, opts.block_size, listed, opts.catalogue_refresh)
            if discovered is not None:  # an unindexed store (-o no_index): no digests
                unverified(tree.stored_images(), url, discovered)
                stats.unverified_disks = len(tree.images())
                log.warning("%s", UNVERIFIED)
            cache = BlockCache(opts.block_cache_bytes, stats)
            source: RangeSource = store
            if opts.cache_dir is not None:
                disk = await trio.to_thread.run_sync(DiskCache, opts.cache_dir, opts.cache_dir_size)
                source = DiskCachedSource(store, disk, nursery, stats)
            reader = BlockReader(source, cache, nursery, ReaderConfig.from_options(opts), stats)
            stats_sources = control.StatsSources(
                store_url=redact(url),
                stats=stats,
                cache=cache,
                cache_max_bytes=opts.block_cache_bytes,
                readahead_max_bytes=opts.readahead,
                started_s=time.monotonic(),
                mountpoint=mountpoint,
            )
            disks = DiskReader(reader)
            plans = PlanServer(
                tree,
                digests,
                reader,
                ahead_bytes=min(PLAN_AHEAD_BYTES, opts.lru_bytes // 2),
                warm_bytes=opts.lru_bytes * 3 // 4,
                warm_window_bytes=2 * opts.in_flight_bytes,
                allow_other=opts.allow_other,
                disks=disks,
            )
            filler = None
            if opts.fill != "off":
                limiter = store.limiter
                filler = Filler(
                    disks,
                    nursery,
                    stats,
                    opts.fill_max or fill_budget(),
                    pyfuse3.notify_store,
                    busy=lambda: limiter.waiting[0] > 0 or plans.plans > 0,
                    planning=lambda: plans.plans > 0,
                    path_of=lambda inode: _served_path(tree, mountpoint, inode),
                    data=opts.fill == "auto",
                )
                plans.filled = filler.filled
            ops = BackupFsOps(
                tree, disks, digests, readahead, opts.allow_other, stats_sources, filler
            )
            await nursery.start(plans.serve, mountpoint)
            # -o metrics_port=, metrics_textfile=: a port in use fails here, before the mount
            await nursery.start(metrics_export.export, opts, stats_sources, ops._open_trackers)
            pyfuse3.init(ops, mountpoint, fuse_mount_options(url, opts))
            unmounted = False
            try:
                log.info("mounted %s on %s", redact(url), mountpoint)
                with trio.CancelScope() as main_scope:
                    nursery.start_soon(_cancel_on_signal, signals, main_scope)
                    nursery.start_soon(_when_initialized, ops, mountpoint, ready)
                    await pyfuse3.main()
                    unmounted = True  # main() returns once the kernel unmounted us
            except BaseException:
                # A crash leaves a dead mount ("Transport endpoint is not connected"), never
                # an empty directory that rsync --delete could take for an empty source.
                pyfuse3.close(unmount=False)
                raise
            pyfuse3.close(unmount=not unmounted)
            log.info("unmounted %s; %s", mountpoint, json.dumps(stats.snapshot()))
            nursery.cancel_scope.cancel()


def setup_logging(opts: MountOptions, foreground: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()  # the CLI's stderr handler: the daemon logs as set up here
    root.setLevel(logging.DEBUG if opts.debug else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.DEBUG if opts.debug else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    handler: logging.Handler
    if opts.log_file is not None:
        # Reopened when logrotate moves it away, with no signal needed.
        handler = logging.handlers.WatchedFileHandler(opts.log_file)
    elif foreground:
        handler = logging.StreamHandler()
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log", socktype=socket.SOCK_DGRAM)
        handler.setFormatter(logging.Formatter("backupfs[%(process)d]: %(message)s"))
        root.addHandler(handler)
        return
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def _run(
    url: str,
    mountpoint: str,
    opts: MountOptions,
    creds: Credentials,
    ready: Callable[[], None],
    discovered: Discovered | None,
) -> None:
    trio.run(serve, url, mountpoint, opts, creds, ready, discovered)


def run_foreground(
    url: str,
    mountpoint: str,
    opts: MountOptions,
    creds: Credentials,
    discovered: Discovered | None = None,
) -> None:
    setup_logging(opts, foreground=True)
    if opts.log_file is not None:  # else the log is stderr, where the CLI printed them
        for warning in creds.warnings:
            log.warning("%s", warning)
    try:
        _run(url, mountpoint, opts, creds, _notify_systemd, discovered)
    except BaseExceptionGroup as group:
        user_error = user_error_in(group)
        if user_error is None:
            raise
        raise user_error from None


def _notify_systemd() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")


def run_background(
    url: str,
    mountpoint: str,
    opts: MountOptions,
    creds: Credentials,
    wait_s: float,
    discovered: Discovered | None = None,
) -> None:
    """Fork a daemon and return once it reports the mount ready; raise UserError otherwise."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        setup_logging(opts, foreground=False)
        for warning in creds.warnings:  # the CLI printed them on stderr
            log.warning("%s", warning)
        status = 0

        def ready() -> None:
            os.write(write_fd, _READY)

        try:
            _run(url, mountpoint, opts, creds, ready, discovered)
        except BaseException as exc:
            user_error = user_error_in(exc)
            message = str(user_error) if user_error else f"mount failed: {exc!r}"
            code = user_error.exit_code if user_error else EXIT_INTERNAL
            if user_error is None:
                log.exception("mount daemon failed")
            with contextlib.suppress(OSError):
                os.write(write_fd, _ERROR + bytes([code]) + message.encode()[:4000])
            status = 1
        os._exit(status)
    os.close(write_fd)
    try:
        readable, _, _ = select.select([read_fd], [], [], wait_s)
        reply = os.read(read_fd, 4096) if readable else None
    finally:
        os.close(read_fd)
    if reply is None:
        os.kill(pid, signal.SIGTERM)
        raise UserError(f"mount did not become ready within {wait_s:g}s")
    if reply.startswith(_READY):
        return
    os.waitpid(pid, 0)
    if reply.startswith(_ERROR) and len(reply) > 1:
        raise UserError(reply[2:].decode(errors="replace"), exit_code=reply[1])
    raise UserError("the mount daemon exited during start-up (see its log)")


def check_mountpoint(path: str, nonempty: bool = False) -> str:
    """The mountpoint, resolved; refused when busy, missing, not a directory, or (unless
    `nonempty`, as for other FUSE filesystems) holding files the mount would hide."""
    # An autofs mount is systemd's automount trigger: mounting over it is the point.
    top = top_fstype(path)
    if top == "fuse.backupfs" and is_dead_mount(path):
        raise UserError(
            f"mountpoint {path} is a dead backupfs mount (its daemon is gone): "
            f"`backupfs umount {path}` clears it"
        )
    if top not in (None, "autofs"):
        raise UserError(f"mountpoint {path} is busy (something is already mounted there)")
    mnt = Path(path)
    if not mnt.exists():
        raise UserError(f"mountpoint {path} does not exist")
    if not mnt.is_dir():
        raise UserError(f"mountpoint {path} is not a directory")
    # Listing an autofs trigger would fire it (and wait for this very mount): not looked in.
    if top is None and not nonempty and any(mnt.iterdir()):
        raise UserError(
            f"mountpoint {path} is not empty: the mount would hide its files "
            "(-o nonempty mounts over them anyway)"
        )
    return str(mnt.resolve())
