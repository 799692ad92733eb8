"""What is on a disk image: its partition table and the filesystem in each partition.

Read in userspace (sfdisk, blkid), never through the kernel's partition parsers, which
some kernels lack. Parsing is pure; `read_disk` runs the tools.
"""

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
class Partition:
    number: int  # 0: a bare filesystem, no partition table
    start_bytes: int
    size_bytes: int
    fstype: str | None = None
    label: str | None = None
    uuid: str | None = None
    volume: str | None = None  # an LVM logical volume, as VG-LV
    reason: str | None = None  # why it cannot be mounted, whatever its filesystem

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
    (numbered from LV_NUMBERS on, named VG-LV; a name seen twice is listed once)."""
    out: list[Partition] = []
    for part in parts:
        if part.fstype != "LVM2_member":
            out.append(part)
            continue
        try:
            found = _logical_volumes(image, part, LV_NUMBERS + len(out))
        except lvm.LvmError as exc:
            out.append(dataclasses.replace(part, reason=f"LVM physical volume: {exc}"))
            continue
        out.append(part)
        seen = {p.volume for p in out}
        out += [v for v in found if v.volume not in seen]
    return out


def _logical_volumes(image: str, pv: Partition, first: int) -> list[Partition]:
    with open(image, "rb") as f:

        def read(offset: int, size: int) -> bytes:
            return os.pread(
                f.fileno(), max(0, min(size, pv.size_bytes - offset)), pv.start_bytes + offset
            )

        pv_id, text = lvm.read_metadata(read, pv.size_bytes)
    out = []
    for n, lv in enumerate(lvm.volumes(text, pv_id, pv.size_bytes), first):
        start = pv.start_bytes + lv.start_bytes
        if lv.skipped is not None:
            out.append(Partition(n, start, lv.size_bytes, volume=lv.name, reason=lv.skipped))
        else:
            found = probe(image, start, lv.size_bytes)
            out.append(dataclasses.replace(_with_probe(Partition(n, start, lv.size_bytes), found),
                                           volume=lv.name))  # fmt: skip
    return out


def _with_probe(part: Partition, found: dict[str, str]) -> Partition:
    return dataclasses.replace(
        part, fstype=found.get("TYPE"), label=found.get("LABEL"), uuid=found.get("UUID")
    )
