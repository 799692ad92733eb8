"""LVM volume groups made by the real lvm2 tools on loop devices over image files, without
device-mapper (--driverloaded n; volumes are never activated) and without touching the
host's LVM state (no backups, no archive), and filesystems written where `lvs` says each
volume's segments and stripes lie: the reference the userspace reader is checked against."""

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.fsimages import run_tool

LVM = ["--driverloaded", "n", "--config", "backup { backup = 0 archive = 0 }"]


def lvm(*args: str) -> str:
    return run_tool([args[0], *LVM, *args[1:]])


@contextlib.contextmanager
def loop(path: Path, offset: int, size: int) -> Iterator[str]:
    device = run_tool(["losetup", "-f", "--show", "--offset", str(offset), "--sizelimit",
                       str(size), str(path)]).strip()  # fmt: skip
    try:
        yield device
    finally:
        run_tool(["losetup", "-d", device])


@dataclass(frozen=True)
class Seg:
    start: int  # bytes into the volume
    size: int
    stripe: int  # bytes; the whole segment when linear
    areas: list[tuple[str, int, int]]  # (device, first extent, last extent)


def segments(vg: str) -> dict[str, list[Seg]]:
    """Each volume's segments as `lvs` reports them."""
    out = lvm("lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ";", "-o",
              "lv_name,seg_start,seg_size,stripes,stripe_size,seg_pe_ranges", vg)  # fmt: skip
    found: dict[str, list[Seg]] = {}
    for line in out.splitlines():
        name, start, size, stripes, stripe, ranges = line.strip().split(";")
        areas = [(d, int(lo), int(hi)) for d, lo, hi in re.findall(r"(\S+):(\d+)-(\d+)", ranges)]
        assert len(areas) == int(stripes), line
        width = int(stripe) if int(stripes) > 1 else int(size)
        found.setdefault(name, []).append(Seg(int(start), int(size), width, areas))
    return found


def pe_start(device: str) -> int:
    return int(lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start",
                   device).strip())  # fmt: skip


def write_volume(
    fs_image: Path, segs: list[Seg], extent: int, places: dict[str, tuple[Path, int]]
) -> None:
    """Write `fs_image` into the volume: stripe by stripe, each at the file and offset of
    its device (`places`: device -> (image file, where its extents start in it: the
    device's offset plus its pe_start)). Stripes of zeros are left as the holes of the
    freshly truncated files."""
    data = fs_image.read_bytes()
    for seg in segs:
        for k in range(seg.size // seg.stripe):
            row, which = divmod(k, len(seg.areas))
            device, first, _ = seg.areas[which]
            path, offset = places[device]
            at = offset + first * extent + row * seg.stripe
            chunk = data[seg.start + k * seg.stripe : seg.start + (k + 1) * seg.stripe]
            if not chunk.strip(b"\0"):
                continue
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(chunk)
