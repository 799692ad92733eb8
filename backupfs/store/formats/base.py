"""What every disk format's table reader offers (`Layer`) and what it answers with.

A *layer* is one stored image file (or, for a VMDK descriptor, a descriptor and its
extent files) of a chain. Mapping a virtual range is two-phase so that the table reader
never does I/O itself:

    layer = open_layer(...)                       # from the file's first bytes
    while reads := layer.open_reads():            # header, L1 / grain directory / BAT ...
        for r in reads: layer.load(r, bytes_of(r))
    need = layer.table_reads(start, end)          # L2 / grain tables / sector bitmaps
    extents = layer.map(start, end, {r: bytes_of(r) for r in need})

Every offset read from a table is checked against the file's size and the format's rules
before it is used; a violation raises FormatError (one line naming the file); a layer
never returns an extent outside its file or the virtual disk. Table reads are bounded
(MAX_TABLE_READ each), and what a layer keeps after open is bounded by MAX_OPEN_BYTES.
"""

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from backupfs.errors import FormatError

MAX_TABLE_READ = 64 << 20  # the largest single TableRead a layer may ask for
MAX_OPEN_BYTES = 64 << 20  # the most a layer reads and keeps at open (L1, BAT, GD ...)
MAX_OPEN_ROUNDS = 16  # open_reads() rounds before a layer is taken for looping


class Kind(enum.Enum):
    DATA = "data"  # bytes at `offset` of stored file `file`, as they are
    ZERO = "zero"  # zeros, nothing to fetch
    PARENT = "parent"  # not in this layer: the parent's bytes at the same virtual offset
    COMPRESSED = "compressed"  # a compressed unit (cluster, grain): fetch, then decompress


@dataclass(frozen=True)
class TableRead:
    """Bytes `[offset, offset + length)` of the layer's stored file number `file` (0: the
    image file itself; 1, 2, ...: a VMDK descriptor's extent files, `Layer.files`)."""

    file: int
    offset: int
    length: int


@dataclass(frozen=True)
class Extent:
    """Virtual bytes `[start, start + length)` and where they come from.

    DATA: stored file `file`, from byte `offset`. COMPRESSED: the unit that decompresses
    to virtual bytes `[unit_start, unit_start + unit_length)` is `stored_length` bytes at
    `offset` of file `file`; this extent is the part of it in `[start, start + length)`.
    """

    start: int
    length: int
    kind: Kind
    file: int = 0
    offset: int = 0
    stored_length: int = 0
    unit_start: int = 0
    unit_length: int = 0


@dataclass(frozen=True)
class ParentRef:
    """How a layer names its parent, as written in the file; the index resolves it to
    another image of the store (chain.py)."""

    path: str  # qcow2 backing file, VMDK parentFileNameHint, VHD(X) parent locator
    format_hint: str | None = None  # qcow2's backing format, when given
    uuid: str | None = None  # VHD/VHDX parent's unique id, VMDK parentCID (as text)


class Layer(Protocol):
    format: str  # "qcow2", "vmdk", "vhd", "vhdx"
    virtual_size: int  # bytes of the guest's disk (known after open)
    parent: ParentRef | None  # known after open; None: the bottom of a chain
    files: list[str]  # stored files beyond the image itself (VMDK extents), as named

    def open_reads(self) -> list[TableRead]:
        """What the layer still needs before it can map; [] once open is complete."""
        ...

    def load(self, read: TableRead, data: bytes) -> None:
        """Take the bytes of an open read (fewer than asked: the file ended)."""
        ...

    def table_reads(self, start: int, end: int) -> list[TableRead]:
        """The second-level tables that mapping virtual `[start, end)` needs."""
        ...

    def map(self, start: int, end: int, tables: Mapping[TableRead, bytes]) -> list[Extent]:
        """`[start, end)` (within the virtual size) as contiguous extents, in order."""
        ...

    def decompress(self, extent: Extent, data: bytes) -> bytes:
        """The `unit_length` bytes of a COMPRESSED extent's unit from its stored bytes;
        FormatError when they do not inflate to exactly that (never more is produced)."""
        ...


def check_read(layer: Layer, read: TableRead, sizes: list[int], name: str) -> None:
    """A layer's TableRead is within its files and the bounds (a layer bug otherwise)."""
    if not 0 <= read.file < len(sizes) or read.length <= 0 or read.length > MAX_TABLE_READ:
        raise FormatError(f"{name}: {layer.format} table read {read} out of bounds")
    if read.offset < 0 or read.offset >= sizes[read.file]:
        raise FormatError(f"{name}: {layer.format} table at offset {read.offset} is past the end")


def open_reads_checked(
    layer: Layer, sizes: Callable[[], list[int]], name: str
) -> Iterator[TableRead]:
    """The reads `layer` asks for until it is open, each checked (check_read); the caller
    loads each before taking the next. Bounded in rounds and in bytes (MAX_OPEN_BYTES).
    `sizes()`: the sizes of the image and of the extra files the layer named so far.
    Every driver opens layers through this: the index over local files, the mount over
    verified blocks."""
    total = 0
    for _ in range(MAX_OPEN_ROUNDS):
        reads = layer.open_reads()
        if not reads:
            return
        for read in reads:
            check_read(layer, read, sizes(), name)
            total += read.length
            if total > MAX_OPEN_BYTES:
                raise FormatError(
                    f"{name}: {layer.format} tables larger than {MAX_OPEN_BYTES >> 20} MiB"
                )
            yield read
    raise FormatError(
        f"{name}: {layer.format} header does not end (more than {MAX_OPEN_ROUNDS} rounds)"
    )


def check_extents(extents: list[Extent], start: int, end: int, sizes: list[int], name: str) -> None:
    """A layer's answer covers `[start, end)` exactly, in order, within its files."""
    pos = start
    for e in extents:
        if e.start != pos or e.length <= 0:
            raise FormatError(f"{name}: extents do not cover the read")
        if e.kind in (Kind.DATA, Kind.COMPRESSED):
            stored = e.length if e.kind is Kind.DATA else e.stored_length
            if not 0 <= e.file < len(sizes) or e.offset < 0 or e.offset + stored > sizes[e.file]:
                raise FormatError(f"{name}: data at offset {e.offset} is past the end of the file")
        pos += e.length
    if pos != end:
        raise FormatError(f"{name}: extents do not cover the read")
