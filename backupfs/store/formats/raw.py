"""A raw image as a layer: the virtual disk is the file (the bottom of a qcow2 chain made
with `-F raw`, and every plain `.img` of the store)."""

from collections.abc import Mapping

from backupfs.errors import FormatError
from backupfs.store.formats.base import Extent, Kind, ParentRef, TableRead

FORMAT = "raw"


class RawLayer:
    format = FORMAT

    def __init__(self, name: str, file_size: int) -> None:
        self.name = name
        self.virtual_size = file_size
        self.parent: ParentRef | None = None
        self.files: list[str] = []

    def open_reads(self) -> list[TableRead]:
        return []

    def load(self, read: TableRead, data: bytes) -> None:
        raise FormatError(f"{self.name}: a raw image has no tables")

    def table_reads(self, start: int, end: int) -> list[TableRead]:
        return []

    def map(self, start: int, end: int, tables: Mapping[TableRead, bytes]) -> list[Extent]:
        return [Extent(start, end - start, Kind.DATA, 0, start)] if end > start else []

    def decompress(self, extent: Extent, data: bytes) -> bytes:
        raise FormatError(f"{self.name}: a raw image has no compressed units")
