"""Shared pieces of the benchmarks: links (direct or through a delaying proxy), process
metrics, dropping caches between cold runs, and loop-mounting partition 1 of an image file."""

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)
# `python3 -m backupfs` in child processes runs this checkout, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

from tests.support.nginx import Nginx  # noqa: E402
from tests.support.proxy import DelayProxy  # noqa: E402
from tests.support.system import unmount  # noqa: E402

LOOP_MOUNT_OPTIONS = "ro,noload,nosuid,nodev,noexec"  # what `backupfs attach` uses for ext4
LINK_HELP = "comma-separated links: `direct` (nginx on loopback) or RTT_MS[@MBIT] (a proxy)"


@contextlib.contextmanager
def link_url(nginx: Nginx, link: str) -> Iterator[str]:
    """The store URL as seen through `link`: `direct`, or `RTT_MS[@MBIT]` via DelayProxy."""
    if link == "direct":
        yield nginx.url
        return
    rtt, _, rate = link.partition("@")
    with DelayProxy(nginx.port, rtt_ms=float(rtt), rate_mbit=float(rate) if rate else None) as p:
        yield p.url


def peak_rss_mib(pid: int) -> float:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True, timeout=120)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def run_logged(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run a command; return its stdout, or raise RuntimeError with the end of its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode:
        error = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise RuntimeError(f"{shlex.join(argv)[:300]} exited with {proc.returncode}: {error}")
    return proc.stdout


def loop_mount(image: Path, target: Path, stack: contextlib.ExitStack) -> None:
    """Mount partition 1 of `image` (found with `sfdisk --json`) read-only at `target`
    through one buffered loop device (`losetup --offset --sizelimit`), with the options
    `backupfs attach` uses for ext4; the undo steps go on `stack` as they become due."""
    table = json.loads(run_logged(["sfdisk", "--json", str(image)], timeout=300))
    table = table["partitiontable"]
    part = table["partitions"][0]
    sector = int(table.get("sectorsize", 512))
    device = run_logged(
        [
            "losetup",
            "--find",
            "--show",
            "--read-only",
            "--offset",
            str(part["start"] * sector),
            "--sizelimit",
            str(part["size"] * sector),
            str(image),
        ],
        timeout=300,
    ).strip()
    stack.callback(detach_loop, device, image)
    target.mkdir(exist_ok=True)
    stack.callback(unmount_dir, target)
    run_logged(["mount", "-t", "ext4", "-o", LOOP_MOUNT_OPTIONS, device, str(target)], timeout=300)


def detach_loop(device: str, image: Path) -> None:
    """Free `device` if it still points at `image` (a device number may be reused)."""
    back = subprocess.run(
        ["losetup", "--noheadings", "--output", "BACK-FILE", device],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    if back and os.path.realpath(back.removesuffix(" (deleted)")) == os.path.realpath(image):
        run_logged(["losetup", "--detach", device], timeout=300)
    elif back:
        print(f"[suite] left {device} alone: it now points at {back}", file=sys.stderr)


def unmount_dir(target: Path) -> None:
    """umount, retried while busy for a moment (a process still closing a file), then lazily."""
    unmount(target, attempts=10, timeout_s=300)
