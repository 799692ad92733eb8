"""One cold run of one contender on one workload, and what is measured of it: wall and setup
time, the bytes nginx served (its access log: the bytes fetched), CPU of the daemon (also
per GB fetched) and of the workload's commands, the daemon's peak RSS, and whether the
result was right (FAILED) or the run could be made at all (ERROR).

A run starts from an empty scratch directory, synced and with caches dropped, and leaves
the directory empty again; everything the contender set up is undone before the check.
"""

import re
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common import drop_caches
from contender import Contender
from contenders import opened
from dataset import Dataset
from workloads import CommandFailed, Workload

from tests.support.system import remove_tree


@dataclass
class Run:
    wall_s: float = float("nan")  # setup (mount/attach or download) + the workload
    setup_s: float = float("nan")
    served_bytes: int = 0  # response bodies nginx sent during the run (its access log)
    daemon_cpu_s: float = float("nan")  # what serves the data: FUSE daemon(s), or curl
    cmd_cpu_s: float = float("nan")  # the workload's commands (restore, cp, grep, ls)
    daemon_rss_mib: float = float("nan")  # its peak RSS (VmHWM)
    failure: str | None = None  # FAILED: the result was wrong or a command failed
    error: str | None = None  # ERROR: the run could not be made (setup failed)

    @property
    def daemon_cpu_s_per_gb(self) -> float:
        """Daemon CPU seconds per GB (1e9 bytes) nginx served; NaN when nothing was served."""
        return self.daemon_cpu_s / (self.served_bytes / 1e9) if self.served_bytes else float("nan")


class AccessLog:
    """Bytes of response bodies nginx logged after a mark ($body_bytes_sent, combined format)."""

    LINE = re.compile(rb'^\S+ \S+ \S+ \[[^\]]*\] "(?:[^"\\]|\\.)*" \d{3} (\d+)')

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def bytes_since(self, mark: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(mark)
            return sum(int(m.group(1)) for line in f if (m := self.LINE.match(line)))


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(
    contender: Contender,
    workload: Workload,
    url: str,
    ds: Dataset,
    scratch: Path,
    log: AccessLog,
    timeout_s: float,
) -> Run:
    fresh_dir(scratch)
    dest = scratch / "dest"
    dest.mkdir()
    run = Run()
    mark = log.mark()
    drop_caches()
    start = time.perf_counter()
    try:
        with opened(contender, url, workload.image, scratch) as o:
            run.setup_s = time.perf_counter() - start
            cpu_before = children_cpu_s()
            try:
                check = workload.run(contender, o, dest, ds, timeout_s)
            except CommandFailed as exc:
                run.failure = str(exc)
            except subprocess.TimeoutExpired as exc:
                run.failure = f"{Path(exc.cmd[0]).name} took more than {exc.timeout:.0f} s"
            run.wall_s = time.perf_counter() - start
            run.cmd_cpu_s = children_cpu_s() - cpu_before
            run.daemon_cpu_s, run.daemon_rss_mib = o.metrics()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:500]
    time.sleep(0.2)  # nginx logs a request when its connection is done with it
    run.served_bytes = log.bytes_since(mark)
    if run.error is None and run.failure is None:
        run.failure = check()
    fresh_dir(scratch)
    return run


def fresh_dir(path: Path) -> None:
    """Empty `path`, refusing if anything below it is still mounted (never delete through a
    mount that cleanup failed to undo)."""
    remove_tree(path)
    path.mkdir(parents=True)
