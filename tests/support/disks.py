"""Build partitioned disk images for tests: a gpt or dos table with a filesystem per partition.

Needs root and sfdisk and blkid, plus whatever `tests/support/fsimages.py` needs for the
filesystems. Nothing here relies on the kernel parsing partition tables: filesystems are built
as separate files and copied into the disk image at their partition's offset.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tests.support.fsimages import (
    MIB,
    PartSpec,
    blank_file,
    make_fs_image,
    run_tool,
    sparse_copy,
)

SECTOR = 512
ALIGN = MIB  # partitions start on 1 MiB boundaries

# sfdisk type shortcuts, valid for both gpt and dos tables
_LINUX, _SWAP, _EFI = "L", "S", "U"
# MBR ids for FAT by what mkfs.vfat chose (blkid VERSION)
_DOS_FAT_IDS = {"FAT12": "1", "FAT16": "e", "FAT32": "c"}


def _part_type(table: str, spec: PartSpec, image: Path) -> str:
    if spec.fstype == "swap":
        return _SWAP
    if spec.fstype == "vfat":
        if table == "gpt":
            return _EFI
        version = run_tool(["blkid", "-p", "-s", "VERSION", "-o", "value", str(image)]).strip()
        return _DOS_FAT_IDS.get(version, "c")
    return _LINUX


def _sfdisk_layout(path: Path) -> list[tuple[int, int]]:
    table = json.loads(run_tool(["sfdisk", "--json", str(path)]))["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    return [(p["start"] * sector, p["size"] * sector) for p in table.get("partitions", [])]


def make_disk(path: Path, table: str, parts: list[PartSpec]) -> list[tuple[int, int]]:
    """A disk image with a "gpt" or "dos" (MBR) partition table made by sfdisk, 1 MiB aligned,
    each partition exactly the size of its spec; each filesystem built with make_fs_image in a
    temp file and copied into place at the partition's offset (dd conv=notrunc,sparse or Python
    with os.copy_file_range). Partition type GUIDs/ids should match the filesystem (linux data,
    swap, EFI/FAT for vfat). Returns [(offset_bytes, size_bytes)] per partition. With
    table="none", the disk is exactly one filesystem (parts must have one element).

    Types: linux data (gpt 0FC63DAF-... / dos 83) for ext*, xfs, btrfs and "none"; linux swap
    (0657FD6D-... / 82); vfat is an EFI System partition on gpt and FAT12/16/32 (01/0e/0c, by
    what mkfs.vfat chose) on dos. On gpt a spec's label is also the partition name. The
    returned layout is read back from `sfdisk --json`. dos tables take at most 4 partitions
    (all primary).
    """
    if table == "none":
        if len(parts) != 1:
            raise ValueError(f'table="none" takes exactly one filesystem, not {len(parts)}')
        make_fs_image(path, parts[0])
        return [(0, parts[0].size_mib * MIB)]
    if table not in ("gpt", "dos"):
        raise ValueError(f'table must be "gpt", "dos" or "none", not {table!r}')
    if not parts:
        raise ValueError("a partitioned disk needs at least one partition")
    if table == "dos" and len(parts) > 4:
        raise ValueError(f"a dos table holds at most 4 primary partitions, not {len(parts)}")
    for spec in parts:
        if '"' in spec.label or "\n" in spec.label:
            raise ValueError(f"unusable label {spec.label!r}")

    layout: list[tuple[int, int]] = []
    offset = ALIGN
    for spec in parts:
        layout.append((offset, spec.size_mib * MIB))
        offset += spec.size_mib * MIB
    # gpt keeps a backup header and entry array in the last 33 sectors: give it an aligned MiB
    total = offset + (ALIGN if table == "gpt" else 0)

    images: list[Path] = []
    try:
        for i, spec in enumerate(parts, 1):
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.p{i}.", dir=path.parent)
            os.close(fd)
            images.append(Path(name))
            make_fs_image(images[-1], spec)

        script = [f"label: {table}", "unit: sectors"]
        for (start, size), spec, image in zip(layout, parts, images, strict=True):
            line = f"start={start // SECTOR}, size={size // SECTOR}, "
            line += f"type={_part_type(table, spec, image)}"
            if table == "gpt" and spec.label:
                line += f', name="{spec.label}"'
            script.append(line)
        blank_file(path, total)
        run_tool(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", str(path)],
            stdin="\n".join(script) + "\n",
        )
        reported = _sfdisk_layout(path)
        if reported != layout:
            raise RuntimeError(f"sfdisk made {reported}, expected {layout}")
        for (start, _), image in zip(layout, images, strict=True):
            sparse_copy(image, path, start)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        for image in images:
            image.unlink(missing_ok=True)
    return layout
