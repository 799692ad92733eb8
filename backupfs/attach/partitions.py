"""What is on a disk image: its partition table and the filesystem in each partition.

Read in userspace (sfdisk, blkid), never through the kernel's partition parsers, which
some kernels lack. Parsing is pure; `read_disk` runs the tools.
"""

import contextlib
import dataclasses
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from backupfs.attach import lvm
from backupfs.errors import UserError
from backupfs.linux.tools import failure_reason

TOOL_TIMEOUT_S = 120
PROBE_BYTES = 1 << 20  # blkid and sfdisk look near the start and the end of a device
PROBE_THREADS = 8  # blkid runs (and prereads) at once
# A table is the image's word: a crafted one may list thousands of partitions, each of
# which would cost probes, loop devices and mounts. A GPT has room for 128 by default.
MAX_PARTITIONS = 128
LV_NUMBERS = 1000  # logical volumes are numbered from here (partitions stay below)
MAX_SIBLING_DISKS = 16  # other disks of a snapshot searched for physical volumes
_EXTENDED_MBR_TYPES = {"5", "f", "85"}  # containers of logical partitions, not filesystems
_LDM = "Windows dynamic disk (LDM) volume (not supported)"
_TYPE_REASONS = {  # partition types known to hold no filesystem backupfs can mount by itself
    "42": _LDM,  # MBR
    "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": _LDM + ": its metadata",  # GPT
    "AF9B60A0-1431-4F62-BC68-3311714A69AD": _LDM,  # GPT
}
# What sfdisk (libfdisk's fdisk_partname) puts between the device and the number: "p"
# after a name ending in a digit (disk0 -> disk0p1), "-part" or "part" for some names.
_NODE_NUMBER = re.compile(r"(?:p|-part|part)?([0-9]+)")


@dataclass(frozen=True)
class Run:
    """One segment of a logical volume on disk images: `size_bytes` taken from its areas
    in stripes of `stripe_bytes` (one area: linear), each area a (disk image, offset)."""

    size_bytes: int
    stripe_bytes: int
    areas: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Partition:
    number: int  # 0: a bare filesystem, no partition table
    start_bytes: int
    size_bytes: int
    fstype: str | None = None
    label: str | None = None
    uuid: str | None = None
    volume: str | None = None  # an LVM logical volume, as VG-LV
    reason: str | None = None  # why it cannot be mounted, whatever its filesystem
    # A volume that is not one range of this disk: its runs, which the mount daemon
    # concatenates into one file (attach asks for it); start_bytes is then 0.
    runs: tuple[Run, ...] | None = None
    backing: str | None = None  # the file that holds it, when that is not the disk image

    @property
    def name(self) -> str:
        return self.volume or f"p{self.number}"


def parse_blkid_export(text: str) -> dict[str, str]:
    """`blkid -o export` output: KEY=value lines."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_sfdisk_json(text: str) -> list[Partition]:
    """Partitions from `sfdisk --json`; extended (container) MBR partitions are left out.
    More than MAX_PARTITIONS, two with one number, or a negative start or size are
    refused with one line."""
    try:
        table = json.loads(text)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        device = str(table.get("device", ""))
        entries = table.get("partitions", [])
        if len(entries) > MAX_PARTITIONS:
            raise UserError(
                f"the partition table lists {len(entries)} partitions; "
                f"backupfs attaches disks of at most {MAX_PARTITIONS}"
            )
        parts: list[Partition] = []
        for p in entries:
            extended = str(p.get("type", "")).lower() in _EXTENDED_MBR_TYPES
            if table.get("label") == "dos" and extended:
                continue
            number = _node_number(str(p["node"]), device, len(parts) + 1)
            start, size = int(p["start"]) * sector, int(p["size"]) * sector
            if sector <= 0 or not 0 <= start <= start + size < 1 << 63:
                raise ValueError(f"partition {number} at {start} of {size} bytes")
            if any(q.number == number for q in parts):
                raise ValueError(f"two partitions numbered {number}")
            reason = _TYPE_REASONS.get(str(p.get("type", "")).upper())
            parts.append(Partition(number, start, size, reason=reason))
        return parts
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read the partition table: {exc}") from None


def _node_number(node: str, device: str, position: int) -> int:
    """The partition number in sfdisk's name for it: what follows the device's name
    ("p3" after "disk0", "3" after "sda"); its place in the table if the name is odd."""
    found = _NODE_NUMBER.fullmatch(node[len(device) :]) if node.startswith(device) else None
    return int(found[1]) if found else position


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError:
        raise UserError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{argv[0]} took longer than {TOOL_TIMEOUT_S}s on the image") from None


def probe(
    image: str, start_bytes: int | None = None, size_bytes: int | None = None
) -> dict[str, str]:
    """Low-level blkid probe of the image, or of a range of it; {} when nothing is found."""
    argv = ["blkid", "-p", "-o", "export"]
    if start_bytes is not None and size_bytes is not None:
        argv += ["-O", str(start_bytes), "-S", str(size_bytes)]
    proc = _run([*argv, image])
    if proc.returncode == 2:
        return {}
    if proc.returncode != 0:
        raise UserError(f"{image}: blkid: {failure_reason(proc)}")
    return parse_blkid_export(proc.stdout)


def preread(image: str, spans: list[tuple[int, int]]) -> None:
    """Read the head and tail of each `(start, size)` span at once, in parallel: blkid and
    sfdisk then find them in the page cache, instead of paying a round trip to the
    store for each of their dozens of small dependent reads."""
    reads = []
    for start, size in spans:
        n = min(PROBE_BYTES, size)
        reads += [(start, n), (start + size - n, n)]
    if not reads:
        return
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # the tools will say what is wrong
    try:
        with ThreadPoolExecutor(min(len(reads), PROBE_THREADS)) as pool:
            list(pool.map(lambda r: os.pread(fd, r[1], r[0]), reads))
    except OSError:
        pass
    finally:
        os.close(fd)


def read_disk(image: str, size_bytes: int) -> list[Partition]:
    """Every partition (or the one bare filesystem) with its detected filesystem type."""
    preread(image, [(0, size_bytes)])
    whole = probe(image)
    if "PTTYPE" not in whole:
        if "TYPE" in whole:
            return with_volumes(image, [_with_probe(Partition(0, 0, size_bytes), whole)])
        raise UserError(f"{image}: no partition table or filesystem found (not a disk image?)")
    proc = _run(["sfdisk", "--json", image])
    if proc.returncode != 0:
        raise UserError(f"{image}: sfdisk cannot read its {whole['PTTYPE']} partition table")
    try:
        parts = parse_sfdisk_json(proc.stdout)
    except UserError as exc:
        raise UserError(f"{image}: {exc}") from None
    if not parts:
        raise UserError(f"{image}: its {whole['PTTYPE']} partition table lists no partitions")
    preread(image, [(p.start_bytes, p.size_bytes) for p in parts])
    with ThreadPoolExecutor(max(1, min(len(parts), PROBE_THREADS))) as pool:
        found = list(pool.map(lambda p: probe(image, p.start_bytes, p.size_bytes), parts))
    return with_volumes(image, [_with_probe(p, f) for p, f in zip(parts, found, strict=True)])


def with_volumes(image: str, parts: list[Partition]) -> list[Partition]:
    """The partitions, each LVM physical volume followed by the logical volumes it holds
    (numbered from LV_NUMBERS on, named VG-LV; a name seen twice is listed once). The
    physical volumes of a group are looked for on this disk, then on the other disks of
    its directory (a snapshot's disk0.img, disk1.img, ...)."""
    texts: dict[int, tuple[str, str]] = {}  # each PV of this disk, read once: (id, text)
    broken: dict[int, lvm.LvmError] = {}
    for part in parts:
        if part.fstype == "LVM2_member":
            try:
                texts[part.start_bytes] = _metadata(image, part.start_bytes, part.size_bytes)
            except lvm.LvmError as exc:
                broken[part.start_bytes] = exc
    places = _Places(image, {texts[p.start_bytes][0]: (image, p.start_bytes, p.size_bytes)
                             for p in reversed(parts) if p.start_bytes in texts})  # fmt: skip
    out: list[Partition] = []
    for part in parts:
        if part.fstype != "LVM2_member":
            out.append(part)
            continue
        try:
            if part.start_bytes in broken:
                raise broken[part.start_bytes]
            pv_id, text = texts[part.start_bytes]
            found = lvm.volumes(text, pv_id, part.size_bytes)
        except lvm.LvmError as exc:
            out.append(dataclasses.replace(part, reason=f"LVM physical volume: {exc}"))
            continue
        out.append(part)
        for lv in found:
            if lv.name not in {p.volume for p in out}:
                out.append(_placed(image, lv, LV_NUMBERS + len(out), places))
    return out


def _metadata(image: str, start: int, size: int) -> tuple[str, str]:
    """The id and volume group text of the physical volume at `start` of `image`."""
    with open(image, "rb") as f:

        def read(offset: int, length: int) -> bytes:
            return os.pread(f.fileno(), max(0, min(length, size - offset)), start + offset)

        return lvm.read_metadata(read, size)


class _Places:
    """Where each physical volume is: pv id -> (disk image, start, size). Those of this
    disk are read first; the other disks of its directory only when a volume needs a
    physical volume this disk lacks."""

    def __init__(self, image: str, found: dict[str, tuple[str, int, int]]) -> None:
        self.image = image
        self.found = found  # this disk's, read by with_volumes
        self.scanned = False

    @staticmethod
    def _labels(image: str, spans: list[tuple[int, int]]) -> dict[str, tuple[str, int, int]]:
        out: dict[str, tuple[str, int, int]] = {}
        for start, size in spans:
            try:
                pv_id, _ = _metadata(image, start, size)
            except (lvm.LvmError, OSError):
                continue
            out.setdefault(pv_id, (image, start, size))
        return out

    def of(self, pv_id: str) -> tuple[str, int, int] | None:
        if pv_id not in self.found and not self.scanned:
            self.scanned = True
            for disk in _sibling_disks(self.image):
                for pv, place in self._labels(disk, _pv_spans(disk)).items():
                    self.found.setdefault(pv, place)
        return self.found.get(pv_id)


def _sibling_disks(image: str) -> list[str]:
    """The other regular files of the image's directory (the snapshot's other disks)."""
    directory = os.path.dirname(image)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(directory, name)
        if path != image and not name.startswith(".") and os.path.isfile(path):
            out.append(path)
    return out[:MAX_SIBLING_DISKS]


def _pv_spans(disk: str) -> list[tuple[int, int]]:
    """Where a physical volume may start on `disk`: each partition, and the disk itself."""
    try:
        size = os.path.getsize(disk)
    except OSError:
        return []
    spans = [(0, size)]
    proc = _run(["sfdisk", "--json", disk])
    if proc.returncode == 0:
        with contextlib.suppress(UserError):
            spans += [(p.start_bytes, p.size_bytes) for p in parse_sfdisk_json(proc.stdout)]
    return spans


def _placed(image: str, lv: lvm.LogicalVolume, number: int, places: _Places) -> Partition:
    """The logical volume as a partition: one range of this disk (a loop device's), runs
    for the daemon to concatenate, or the reason it is not mounted."""
    if lv.skipped is not None:
        return Partition(number, 0, lv.size_bytes, volume=lv.name, reason=lv.skipped)
    runs = []
    for seg in lv.segments:
        areas = []
        for area in seg.areas:
            place = places.of(area.pv_id)
            if place is None:
                why = f"its physical volume {area.pv_id} is on no disk of {os.path.dirname(image)}"
                return Partition(number, 0, lv.size_bytes, volume=lv.name, reason=why)
            disk, start, size = place
            if area.start_bytes + lvm.area_bytes(seg) > size:
                why = "it lies past the end of its physical volume"
                return Partition(number, 0, lv.size_bytes, volume=lv.name, reason=why)
            areas.append((disk, start + area.start_bytes))
        runs.append(Run(seg.size_bytes, seg.stripe_bytes, tuple(areas)))
    if lv.contiguous is not None and runs[0].areas[0][0] == image:
        start = runs[0].areas[0][1]
        found = probe(image, start, lv.size_bytes)
        part = _with_probe(Partition(number, start, lv.size_bytes), found)
        return dataclasses.replace(part, volume=lv.name)
    return Partition(number, 0, lv.size_bytes, volume=lv.name, runs=tuple(runs))


def joined_volume(part: Partition, path: str) -> Partition:
    """A volume of runs once the mount daemon serves it at `path`: probed there."""
    return dataclasses.replace(_with_probe(part, probe(path)), backing=path)


def _with_probe(part: Partition, found: dict[str, str]) -> Partition:
    return dataclasses.replace(
        part, fstype=found.get("TYPE"), label=found.get("LABEL"), uuid=found.get("UUID")
    )
