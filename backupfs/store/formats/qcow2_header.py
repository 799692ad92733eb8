"""The qcow2 header: its fixed fields, its extensions and the backing file name, parsed and
checked from the image's first cluster (layouts: qemu's docs/interop/qcow2.txt).

Everything here is pure: bytes in, a `Header` / `Extensions` / name out, or a FormatError
(one line starting with the image's name) for what backupfs does not read or must not trust.
"""

import struct
from dataclasses import dataclass, field

from backupfs.errors import FormatError

MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS = 9  # 512-byte clusters
MAX_CLUSTER_BITS = 21  # 2 MiB: qemu's limit too
MIN_EXTENDED_L2_CLUSTER_BITS = 14  # extended L2 entries need clusters of 16 KiB or more
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
COMPRESSION_TYPE_AT = 104  # the v3 additional field, present when header_length > 104
MAX_BACKING_NAME = 1023  # bytes, as qemu
MAX_BACKING_FORMAT = 15  # bytes: qemu refuses longer backing format names

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
KNOWN_INCOMPAT = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
) | INCOMPAT_EXTENDED_L2

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
FEATURE_ENTRY = 48  # type (1), bit (1), name (46)

_FIXED = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes of a version 2 header
_V3 = struct.Struct(">QQQII")  # bytes 72 - 103


@dataclass(frozen=True)
class Header:
    version: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    backing_offset: int
    backing_size: int
    incompatible: int
    header_length: int
    compression_type: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTENDED_L2)

    @property
    def extensions_end(self) -> int:
        """Where the extension area ends: at the backing file name, else with the first
        cluster (as qemu reads it)."""
        return self.backing_offset if self.backing_offset else self.cluster_size


@dataclass
class Extensions:
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)  # (type, bit)


def parse_header(name: str, head: bytes) -> Header:
    """The fixed header fields from the file's first bytes (the v3 part needs
    `header_length` bytes: check `len(head) >= header.header_length` after)."""
    if len(head) < V2_HEADER_LENGTH:
        raise FormatError(f"{name}: qcow2 header is truncated ({len(head)} bytes)")
    fields = _FIXED.unpack_from(head)
    magic, version, backing_offset, backing_size, cluster_bits, size = fields[:6]
    crypt, l1_size, l1_offset = fields[6:9]  # then refcount table, snapshots: not needed
    if magic != MAGIC:
        raise FormatError(f"{name}: not a qcow2 image (bad magic {magic!r})")
    if version not in (2, 3):
        raise FormatError(f"{name}: qcow2 version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(
            f"{name}: qcow2 cluster_bits {cluster_bits} is outside "
            f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        )
    incompatible, header_length, compression = 0, V2_HEADER_LENGTH, COMPRESSION_ZLIB
    if version == 3:
        if len(head) < V3_MIN_HEADER_LENGTH:
            raise FormatError(f"{name}: qcow2 v3 header is truncated ({len(head)} bytes)")
        incompatible, _compat, _autoclear, _refcount_order, header_length = _V3.unpack_from(
            head, V2_HEADER_LENGTH
        )
        if not V3_MIN_HEADER_LENGTH <= header_length <= 1 << cluster_bits:
            raise FormatError(
                f"{name}: qcow2 header_length {header_length} is outside "
                f"{V3_MIN_HEADER_LENGTH}..{1 << cluster_bits}"
            )
        if header_length > COMPRESSION_TYPE_AT and len(head) > COMPRESSION_TYPE_AT:
            compression = head[COMPRESSION_TYPE_AT]
    if backing_offset:
        _check_backing_place(name, backing_offset, backing_size, header_length, cluster_bits)
    return Header(
        version=version,
        cluster_bits=cluster_bits,
        virtual_size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_offset=l1_offset,
        backing_offset=backing_offset,
        backing_size=backing_size,
        incompatible=incompatible,
        header_length=header_length,
        compression_type=compression,
    )


def _check_backing_place(
    name: str, offset: int, size: int, header_length: int, cluster_bits: int
) -> None:
    """The backing file name: at most 1023 bytes, after the header, in the first cluster."""
    if size > MAX_BACKING_NAME:
        raise FormatError(f"{name}: qcow2 backing file name of {size} bytes is too long")
    if offset < header_length or offset + size > 1 << cluster_bits:
        raise FormatError(
            f"{name}: qcow2 backing file name at {offset} ({size} bytes) is outside the "
            "first cluster's free space"
        )


def parse_extensions(name: str, header: Header, buf: bytes, file_size: int) -> Extensions | None:
    """The header extensions, from `buf` (the file's first bytes); None when `buf` ends
    before the extension area does and the file has more."""
    ext = Extensions()
    offset, end = header.header_length, min(header.extensions_end, file_size)
    while offset < header.extensions_end:
        if offset + 8 > len(buf):
            if len(buf) < end:
                return None
            raise FormatError(f"{name}: qcow2 header extensions run past the end of the file")
        kind, length = struct.unpack_from(">II", buf, offset)
        if kind == EXT_END:
            break
        data_at = offset + 8
        if data_at + length > header.extensions_end:
            raise FormatError(
                f"{name}: qcow2 header extension {kind:#010x} of {length} bytes runs past "
                "the extension area"
            )
        if data_at + length > len(buf):
            if len(buf) < end:
                return None
            raise FormatError(f"{name}: qcow2 header extensions run past the end of the file")
        _take_extension(name, ext, kind, buf[data_at : data_at + length])
        offset = data_at + (length + 7) // 8 * 8
    return ext


def _take_extension(name: str, ext: Extensions, kind: int, data: bytes) -> None:
    if kind == EXT_BACKING_FORMAT:
        if len(data) > MAX_BACKING_FORMAT:
            raise FormatError(f"{name}: qcow2 backing format name of {len(data)} bytes is too long")
        ext.backing_format = _text(name, data, "backing format name")
    elif kind == EXT_FEATURE_NAMES:
        for at in range(0, len(data) - FEATURE_ENTRY + 1, FEATURE_ENTRY):
            raw = data[at + 2 : at + FEATURE_ENTRY].split(b"\0", 1)[0]
            text = raw.decode("ascii", "replace")
            ext.feature_names[(data[at], data[at + 1])] = "".join(
                c if c.isprintable() else "?" for c in text
            )
    elif kind == EXT_DATA_FILE:
        raise FormatError(f"{name}: qcow2 images with an external data file are not supported")
    elif kind == EXT_CRYPTO:
        raise FormatError(f"{name}: qcow2 encrypted images are not supported")
    # others (bitmaps, unknown ones) do not change what the guest reads: ignored


def check_features(name: str, header: Header, ext: Extensions) -> None:
    """Refuse what backupfs cannot read faithfully: encryption, unknown or unsupported
    incompatible features, a compression type other than zlib and zstd."""
    if header.crypt_method != 0:
        kind = {1: "AES", 2: "LUKS"}.get(header.crypt_method, str(header.crypt_method))
        raise FormatError(f"{name}: qcow2 encrypted images ({kind}) are not supported")
    unknown = header.incompatible & ~KNOWN_INCOMPAT
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        label = ext.feature_names.get((0, bit))
        named = f" ({label})" if label else ""
        raise FormatError(f"{name}: qcow2 incompatible feature bit {bit}{named} is not supported")
    if header.incompatible & INCOMPAT_CORRUPT:
        raise FormatError(f"{name}: qcow2 image is marked corrupt (incompatible feature bit 1)")
    if header.incompatible & INCOMPAT_DATA_FILE:
        raise FormatError(f"{name}: qcow2 images with an external data file are not supported")
    flagged = bool(header.incompatible & INCOMPAT_COMPRESSION)
    if header.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise FormatError(
            f"{name}: qcow2 compression type {header.compression_type} is not supported"
        )
    if flagged != (header.compression_type != COMPRESSION_ZLIB):
        raise FormatError(
            f"{name}: qcow2 compression type {header.compression_type} does not match the "
            "compression type feature bit"
        )
    if header.extended_l2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise FormatError(
            f"{name}: qcow2 extended L2 entries with clusters of {header.cluster_size} bytes "
            "(less than 16 KiB)"
        )


def backing_name_end(header: Header) -> int:
    """Where the backing file name ends in the file (0: no backing file)."""
    return header.backing_offset + header.backing_size if header.backing_offset else 0


def backing_name(name: str, header: Header, buf: bytes, file_size: int) -> str | None:
    """The backing file name as written (None: no backing file), checked to lie in the
    file and to be UTF-8 without NUL bytes."""
    if not header.backing_offset or not header.backing_size:
        return None
    end = backing_name_end(header)  # in the first cluster (parse_header checked)
    if end > file_size or end > len(buf):
        raise FormatError(f"{name}: qcow2 backing file name is past the end of the file")
    return _text(name, buf[header.backing_offset : end], "backing file name")


def _text(name: str, data: bytes, what: str) -> str:
    if b"\0" in data:
        raise FormatError(f"{name}: qcow2 {what} holds a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{name}: qcow2 {what} is not UTF-8") from None
