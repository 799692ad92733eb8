"""Driving a layer over local files: opening it (the index, tests) and reading a chain of
layers (the tests' reference reader; the mount drives the same layers over HTTP)."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backupfs.errors import FormatError
from backupfs.store.formats.base import (
    Extent,
    Kind,
    Layer,
    TableRead,
    check_extents,
    check_read,
    open_reads_checked,
)


def drive_open(
    layer: Layer,
    read_bytes: Callable[[TableRead], bytes],
    sizes: Callable[[], list[int]],
    name: str,
) -> Layer:
    """Give `layer` the bytes it asks for until it is open (base.open_reads_checked)."""
    for read in open_reads_checked(layer, sizes, name):
        layer.load(read, read_bytes(read))
    return layer


@dataclass
class LocalLayer:
    """A layer and its local files: [the image, then the layer's extra files]."""

    layer: Layer
    paths: list[Path]

    def pread(self, read: TableRead) -> bytes:
        with open(self.paths[read.file], "rb") as f:
            return os.pread(f.fileno(), read.length, read.offset)

    @property
    def sizes(self) -> list[int]:
        return [p.stat().st_size for p in self.paths]


def open_local(factory: Callable[[str, int], Layer], path: Path) -> LocalLayer:
    """Open the image at `path` with its format's layer class; extent files are looked
    for beside it."""
    layer = factory(path.name, path.stat().st_size)
    local = LocalLayer(layer, [path])

    def sizes() -> list[int]:
        _extend(local, path.parent)  # extent files become known while opening (VMDK)
        return local.sizes

    drive_open(layer, local.pread, sizes, path.name)
    _extend(local, path.parent)
    return local


def _extend(local: LocalLayer, directory: Path) -> None:
    for name in local.layer.files[len(local.paths) - 1 :]:
        if "/" in name or name in ("", ".", ".."):
            raise FormatError(
                f"{local.paths[0].name}: extent file {name!r} is not in its directory"
            )
        local.paths.append(directory / name)


def read_chain(chain: list[LocalLayer], start: int, size: int) -> bytes:
    """Virtual bytes `[start, start + size)` of the top of `chain` (top first)."""
    top = chain[0]
    end = min(start + size, top.layer.virtual_size)
    if start >= end:
        return b""
    need = top.layer.table_reads(start, end)
    for read in need:
        check_read(top.layer, read, top.sizes, top.paths[0].name)
    tables = {read: top.pread(read) for read in need}
    extents = top.layer.map(start, end, tables)
    check_extents(extents, start, end, top.sizes, top.paths[0].name)
    return b"".join(_extent_bytes(chain, extent) for extent in extents)


def _extent_bytes(chain: list[LocalLayer], extent: Extent) -> bytes:
    top = chain[0]
    if extent.kind is Kind.ZERO:
        return bytes(extent.length)
    if extent.kind is Kind.DATA:
        data = top.pread(TableRead(extent.file, extent.offset, extent.length))
        if len(data) != extent.length:
            raise FormatError(f"{top.paths[0].name}: data past the end of the file")
        return data
    if extent.kind is Kind.COMPRESSED:
        stored = top.pread(TableRead(extent.file, extent.offset, extent.stored_length))
        unit = top.layer.decompress(extent, stored)
        lo = extent.start - extent.unit_start
        return unit[lo : lo + extent.length]
    if len(chain) == 1:  # PARENT at the bottom: nothing below, zeros
        return bytes(extent.length)
    below = read_chain(chain[1:], extent.start, extent.length)
    return below + bytes(extent.length - len(below))  # past a smaller parent: zeros
