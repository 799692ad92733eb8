"""`backupfs diff`: what changed between two snapshots of a host, reading only what changed.

The store knows each 64 KiB block's SHA-256 in both snapshots. Where the two are equal
the bytes are equal, so the second snapshot is read through `SameBlocks`: a block whose
digest did not change is taken from the first snapshot (already fetched, or fetched
once for both), and only changed blocks are fetched from the second. Both trees are
then walked and compared path by path:

    +  added          -  removed         T  type changed
    M  content changed (size, or the bytes: compared only where a block changed)
    U  metadata only (mode, owner, mtime)

What it can miss: nothing the filesystem records. A file's content is compared through
its data runs: where both snapshots keep it in the same places, only the blocks whose
digests differ are read and compared (a neighbour's change in the same 64 KiB block does
not make it M); where it moved, both copies are read whole. A rename is a `-` and a `+`.
Directories are U only for mode or owner (their mtime follows their entries).
Virtual disks (qcow2, VMDK, VHD/X) have digests of their stored files, not of the guest's
disk: their second snapshot is read in full, the answer is the same.
"""

from dataclasses import dataclass

import trio

from backupfs.plan.fsmeta import DataRun, FileInfo, FsError, FsReader, Read
from backupfs.snapshots.files import file_bytes
from backupfs.snapshots.filesystems import Filesystem, filesystems
from backupfs.snapshots.queries import Report, kind_of
from backupfs.snapshots.session import Session, stored_image
from backupfs.snapshots.walk import walk
from backupfs.store.digestfile import DIGEST_SIZE
from backupfs.store.image import Served
from backupfs.store.manifest import SnapshotEntry


@dataclass
class SameBlocks:
    """Reads of the second snapshot that take unchanged blocks from the first."""

    read_a: Read
    read_b: Read
    changed: bytearray  # one byte per digest block: 1 = differs (or unknown)
    block: int

    def is_changed(self, start: int, end: int) -> bool:
        first, stop = start // self.block, -(-end // self.block)
        return any(self.changed[first:stop]) or stop > len(self.changed)

    def read(self, offset: int, length: int) -> bytes:
        out, pos, end = [], offset, offset + length
        while pos < end:
            stop = min(end, (pos // self.block + 1) * self.block)
            changed = self.is_changed(pos, stop)
            while stop < end and self.is_changed(stop, min(end, stop + self.block)) == changed:
                stop = min(end, stop + self.block)
            out.append((self.read_b if changed else self.read_a)(pos, stop - pos))
            pos = stop
        return b"".join(out)


async def _changed_blocks(a: Served, b: Served) -> tuple[bytearray, int] | None:
    """Which digest blocks of two raw disks differ; None when digests cannot tell."""
    ia, ib = stored_image(a), stored_image(b)
    if ia is None or ib is None or ia.digests is None or ib.digests is None:
        return None
    if ia.digest_block_size != ib.digest_block_size:
        return None
    block = ia.digest_block_size
    count = -(-max(ia.size_bytes, ib.size_bytes) // block)
    ra = await ia.digests.records(0, -(-ia.size_bytes // block))
    rb = await ib.digests.records(0, -(-ib.size_bytes // block))
    changed = bytearray(count)
    for n in range(count):
        rec = slice(n * DIGEST_SIZE, (n + 1) * DIGEST_SIZE)
        changed[n] = ra[rec] != rb[rec] or len(ra[rec]) != DIGEST_SIZE
    return changed, block


def _content_changed(
    fs_a: FsReader, fs_b: FsReader, same: SameBlocks | None, read_a: Read, read_b: Read,
    a: FileInfo, b: FileInfo,
) -> bool:  # fmt: skip
    if a.size != b.size:
        return True
    runs_a, runs_b = fs_a.data_runs(a), fs_b.data_runs(b)
    if same is not None and runs_a == runs_b:
        return any(_run_differs(run, same) for run in runs_a)
    return any(x != y for x, y in zip(file_bytes(fs_a, read_a, a),
                                      file_bytes(fs_b, read_b, b), strict=False))  # fmt: skip


def _run_differs(run: DataRun, same: SameBlocks) -> bool:
    """Compare the bytes of `run` in both snapshots where its blocks' digests differ."""
    start, end = run.image_offset, run.image_offset + run.length
    pos = start
    while pos < end:
        stop = min(end, (pos // same.block + 1) * same.block)
        changed = same.is_changed(pos, stop)
        if changed and same.read_a(pos, stop - pos) != same.read_b(pos, stop - pos):
            return True
        pos = stop
    return False


def _compare(
    fa: Filesystem, fb: Filesystem, same: SameBlocks | None, read_a: Read, read_b: Read,
    top: str, prefix: str,
) -> list[dict[str, object]]:  # fmt: skip
    tree_a = {f.path: f.info for f in walk(fa.fs, top)}
    tree_b = {f.path: f.info for f in walk(fb.fs, top)}
    rows: list[dict[str, object]] = []

    def add(change: str, path: str, info: FileInfo) -> None:
        rows.append({"change": change, "path": prefix + path, "type": kind_of(info)})

    for path in sorted(tree_a.keys() | tree_b.keys()):
        a, b = tree_a.get(path), tree_b.get(path)
        if a is None and b is not None:
            add("+", path, b)
        elif b is None and a is not None:
            add("-", path, a)
        elif a is not None and b is not None:
            if kind_of(a) != kind_of(b):
                add("T", path, b)
            elif (a.is_file or a.is_symlink) and _content_changed(
                fa.fs, fb.fs, same, read_a, read_b, a, b
            ):
                add("M", path, b)
            elif (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid) or (
                not a.is_dir and a.mtime_ns != b.mtime_ns
            ):
                add("U", path, b)
    return rows


async def diff(session: Session, a: SnapshotEntry, b: SnapshotEntry, top: str) -> Report:
    report = Report()
    names_b = {d.served_name for d in b.disks}
    for disk in [d.served_name for d in a.disks if d.served_name in names_b]:
        pa, pb = (f"{s.host}/{s.name}/{disk}" for s in (a, b))
        served_a, served_b = await session.open_disk(pa), await session.open_disk(pb)
        read_a, read_b = session.reader(served_a), session.reader(served_b)
        found = await _changed_blocks(served_a, served_b)
        same = None if found is None else SameBlocks(read_a, read_b, *found)
        read_b_same = read_b if same is None else same.read

        def say(line: str, where: str = pa) -> None:
            report.errors.append(f"{where}:{line}")

        fss_a = await trio.to_thread.run_sync(filesystems, read_a, served_a.size_bytes, say)
        fss_b = await trio.to_thread.run_sync(filesystems, read_b_same, served_b.size_bytes, say)
        several = len(fss_a) > 1 or len(a.disks) > 1
        by_name = {f.partition: f for f in fss_b}
        for fa in fss_a:
            fb = by_name.get(fa.partition)
            if fb is None or fb.kind != fa.kind:
                report.errors.append(f"{pb}:{fa.partition}: not the same filesystem in both")
                continue
            prefix = f"{disk}:{fa.partition}:" if several else ""
            try:
                report.rows += await trio.to_thread.run_sync(
                    _compare, fa, fb, same, read_a, read_b_same, top, prefix
                )
            except FsError as exc:
                report.errors.append(f"{pa}:{fa.partition}: {exc}")
    return report
