"""What a snapshot directory holds: each file's disk format (from its header), and for
the formats with tables its virtual size, the parent it names and its extent files."""

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backupfs.errors import FormatError, ManifestError
from backupfs.store import manifest
from backupfs.store.formats import registry
from backupfs.store.formats.base import ParentRef
from backupfs.store.formats.local import open_local

RAW_SUFFIXES = (".img", ".raw")  # raw images are known by name; `.raw` is raw whatever it holds


@dataclass
class FoundImage:
    path: Path
    format: str
    virtual_size: int | None = None  # None: raw, the file's size
    parent: ParentRef | None = None
    extents: list[Path] = field(default_factory=list)
    unique_id: str | None = None  # VHD, VHDX: the id a differencing child names it by


def detect_file(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = os.pread(f.fileno(), registry.HEAD_BYTES, 0)
        tail = os.pread(f.fileno(), registry.TAIL_BYTES, max(0, size - registry.TAIL_BYTES))
    return registry.detect(head, tail, size)


def _open(path: Path, fmt: str) -> FoundImage:
    """Open a formatted image as the mount will, checking its tables (FormatError)."""
    local = open_local(registry.LAYERS[fmt], path)
    layer = local.layer
    unique_id = getattr(layer, "unique_id", None) or None
    return FoundImage(path, fmt, layer.virtual_size, layer.parent, local.paths[1:], unique_id)


NOT_AN_IMAGE = ("not a disk image (no qcow2, VMDK, VHD or VHDX header; raw images are "
                "indexed by the names *.img and *.raw)")  # fmt: skip


def stored_format(name: str, detected: str | None) -> str | None:
    """What a file named `name` is indexed as, given the format its header shows: "raw"
    for `.raw` (whatever it holds) and for a headerless `.img`; None when it is no image."""
    if name.endswith(RAW_SUFFIXES[1]) or (detected is None and name.endswith(RAW_SUFFIXES)):
        return "raw"
    return detected


def _classify(path: Path) -> FoundImage | str:
    """The image at `path`, or why it is not one."""
    if not path.is_file():
        return "not a regular file"
    try:
        manifest.check_name(path.name, "disk")
        fmt = stored_format(path.name, detect_file(path))
        if fmt is None:
            return NOT_AN_IMAGE
        return FoundImage(path, "raw") if fmt == "raw" else _open(path, fmt)
    except (FormatError, ManifestError) as exc:
        return str(exc).removeprefix(f"{path.name}: ")
    except OSError as exc:
        return exc.strerror or str(exc)


def find_images(snap_dir: Path, say: Callable[[str], None]) -> list[FoundImage]:
    """The disks of a snapshot directory; what cannot be served is said and left out.
    Files that a VMDK descriptor names as its extents are part of it, not disks."""
    paths = sorted(p for p in snap_dir.iterdir() if p.name != manifest.META_DIR)
    found = {p: _classify(p) for p in paths}
    parts = {e for f in found.values() if isinstance(f, FoundImage) for e in f.extents}
    disks: list[FoundImage] = []
    served: dict[str, Path] = {}
    for path, image in found.items():
        if path in parts:
            continue
        if isinstance(image, str):
            say(f"skipped {path}: {image}")
            continue
        missing = [e for e in image.extents if not e.is_file()]
        if missing:
            say(f"skipped {image.path}: its extent file {missing[0].name} is missing")
            continue
        shown = manifest.served_name(image.path.name, image.format)
        other = served.setdefault(shown, image.path)
        if other != image.path:
            say(f"skipped {image.path}: it would be served as {shown}, as {other} is")
            continue
        disks.append(image)
    return disks
