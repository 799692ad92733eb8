"""Every disk format backupfs reads: how each is recognised from a file's first and last
bytes, and its layer class. Formats are told apart by their headers, never by names."""

from collections.abc import Callable

from backupfs.store.formats import qcow2, raw, vhd, vhdx, vmdk
from backupfs.store.formats.base import Layer

HEAD_BYTES = TAIL_BYTES = 64 << 10

LayerFactory = Callable[[str, int], Layer]
LAYERS: dict[str, LayerFactory] = {
    raw.FORMAT: raw.RawLayer,
    qcow2.FORMAT: qcow2.Qcow2Layer,
    vmdk.FORMAT: vmdk.VmdkLayer,
    vhd.FORMAT: vhd.VhdLayer,
    vhdx.FORMAT: vhdx.VhdxLayer,
}
# In this order: a VHD is known by a footer at the end of the file, which the last sector
# of any other image could hold; every other format has a magic at offset 0.
_PROBES = [(m.FORMAT, m.probe) for m in (qcow2, vhdx, vmdk, vhd)]


def detect(head: bytes, tail: bytes, file_size: int) -> str | None:
    """The format whose header these bytes are, None when none is (a raw image, or not an
    image at all)."""
    for name, probe in _PROBES:
        if probe(head, tail, file_size):
            return name
    return None
