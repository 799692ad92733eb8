"""The daemon's Prometheus exports: `-o metrics_port=` and `-o metrics_textfile=`.

`export` is one task of the daemon nursery. Before it reports started it listens on
127.0.0.1:PORT (prometheus_client's HTTP server, in a thread of its own) and writes the
textfile once, so a port in use or a file that cannot be written fails the mount with
one line before it is made (and before a background mount's parent returns). Then it
rewrites the textfile every TEXTFILE_INTERVAL_S; cancelled (the daemon exits), it writes
it a last time and stops the HTTP server, whose port is free again when it returns.

The stats document is built on trio's thread only: the HTTP server's threads ask it
for one per scrape (trio.from_thread), and the textfile is written in a worker thread
from a document built beforehand. The HTTP endpoint adds the library's process
collector (CPU, memory, file descriptors of the daemon, read from /proc on each scrape);
the textfile and the control file leave it out, since node-exporter reports processes
itself and the samples of several mounts' textfiles would collide (no `mount` label).
"""

import errno
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import trio
from prometheus_client import ProcessCollector, start_http_server, write_to_textfile

from backupfs.errors import UserError
from backupfs.mount import control
from backupfs.mount.metrics import MountCollector, registry_of
from backupfs.options import MountOptions
from backupfs.readpath.readahead import StreamTracker

log = logging.getLogger(__name__)
LISTEN_ADDRESS = "127.0.0.1"
TEXTFILE_INTERVAL_S = 15.0


class HttpExporter:
    """The metrics_port endpoint: prometheus_client's WSGI server and its thread."""

    def __init__(self, port: int, collector: MountCollector) -> None:
        registry = registry_of(collector)
        ProcessCollector(registry=registry)  # registers itself
        try:
            self._server, self._thread = start_http_server(
                port, addr=LISTEN_ADDRESS, registry=registry
            )
        except OSError as exc:
            log.debug("metrics_port=%d: %r", port, exc)  # the CLI prints the line
            reason = (
                "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or exc)
            )
            raise UserError(
                f"metrics_port={port}: cannot listen on {LISTEN_ADDRESS}:{port}: {reason}"
            ) from None
        log.info("serving metrics on http://%s:%d/metrics", LISTEN_ADDRESS, port)

    def close(self) -> None:
        """Stop serving and free the port (shutdown alone keeps the socket open)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def write_textfile(path: Path, doc: Mapping[str, object], mount: str) -> None:
    """Write one stats document to `path` atomically (a temporary file beside it, renamed)."""
    write_to_textfile(str(path), registry_of(MountCollector(mount, lambda: doc)))


async def _rewrite_every(
    path: Path, document: Callable[[], Mapping[str, object]], mount: str
) -> None:
    """Rewrite the textfile every TEXTFILE_INTERVAL_S; a failure is logged (once until a
    write succeeds again), the mount goes on."""
    failing = False
    while True:
        await trio.sleep(TEXTFILE_INTERVAL_S)
        try:
            await trio.to_thread.run_sync(write_textfile, path, document(), mount)
        except OSError as exc:
            if not failing:
                log.warning("metrics_textfile=%s: cannot write it: %r", path, exc)
            failing = True
        else:
            if failing:
                log.info("metrics_textfile=%s: written again", path)
            failing = False


def _on_trio(document: Callable[[], Mapping[str, object]]) -> Callable[[], Mapping[str, object]]:
    """`document` for another thread: it runs on trio's thread, the caller waits."""
    token = trio.lowlevel.current_trio_token()
    return lambda: trio.from_thread.run_sync(document, trio_token=token)


async def export(
    opts: MountOptions,
    sources: control.StatsSources,
    open_trackers: Callable[[], Iterable[StreamTracker]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the metrics the options ask for until cancelled (see the module's doc)."""
    mount, path = sources.mountpoint, opts.metrics_textfile

    def document() -> dict[str, object]:
        return control.stats_document(sources, open_trackers(), time.monotonic())

    http, started = None, False
    try:
        if opts.metrics_port is not None:
            http = HttpExporter(opts.metrics_port, MountCollector(mount, _on_trio(document)))
        if path is not None:
            try:
                write_textfile(path, document(), mount)
            except OSError as exc:
                log.debug("metrics_textfile=%s: %r", path, exc)
                raise UserError(
                    f"metrics_textfile={path}: cannot write it: {exc.strerror or exc}"
                ) from None
        task_status.started()
        started = True
        if path is None:
            await trio.sleep_forever()
        else:
            await _rewrite_every(path, document, mount)
    finally:
        try:
            if started and path is not None:  # the last numbers, the mount's final ones
                write_textfile(path, document(), mount)
        except OSError as exc:
            log.warning("metrics_textfile=%s: cannot write it: %r", path, exc)
        finally:
            if http is not None:
                http.close()
