"""Build filesystem images for tests: one sparse image file per PartSpec, holding a file tree.

Needs root (setuid files and device nodes survive only so, loop mounts for xfs and btrfs) and
mke2fs, mkfs.xfs, mkfs.btrfs, mkfs.vfat + mtools, mkswap, losetup, mount. Also the sparse-file
helpers the partitioned disks of `tests/support/disks.py` are assembled with.

Every loop device and mount made here is undone before the function returns, also on failure.
Mount points are made next to the image being built, so a pytest leftover guard that watches
its base temp directory sees them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.system import unmount

MIB = 1 << 20
FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "swap", "none")
XFS_MIN_MIB = 300  # xfsprogs >= 5.19 refuses anything smaller
BTRFS_MIXED_BELOW_MIB = 256  # below ~109 MiB mkfs.btrfs silently grows the file unless --mixed
_TIMEOUT_S = 120


@dataclass(frozen=True)
class PartSpec:
    fstype: str  # "ext2" "ext3" "ext4" "xfs" "btrfs" "vfat" "swap" or "none" (left unformatted)
    size_mib: int
    label: str = ""
    tree: Path | None = None  # directory whose contents are copied into the filesystem


# --------------------------------------------------------------------------------------------
# running tools, sparse files, loop mounts


def run_tool(cmd: list[str], *, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; raise RuntimeError with its stderr on failure."""
    proc = subprocess.run(
        cmd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with status {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def blank_file(path: Path, size: int) -> None:
    """A fresh, fully sparse file of `size` bytes (an old file at `path` is replaced)."""
    path.unlink(missing_ok=True)
    with open(path, "xb") as f:
        f.truncate(size)


def flip_byte_of_file(image: Path, path: str, block: int) -> None:
    """Invert the first byte of 4 KiB block `block` of file `path` in the ext4 image file
    `image` (found with debugfs), keeping the image's times: the store's ETag stays the
    same and only the block's digest tells the damage."""
    out = run_tool(["debugfs", "-R", f"bmap {path} {block}", str(image)])
    offset = int(out.split()[-1]) * 4096
    st = image.stat()
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent of an open file, by SEEK_DATA / SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole - data
        pos = hole


def sparse_copy(src: Path, dst: Path, dst_offset: int) -> None:
    """Copy all of `src` into `dst` at `dst_offset`, like dd conv=notrunc,sparse.

    Holes and all-zero 1 MiB chunks of the source are skipped, so the target region must
    already read as zeros (a freshly truncated file does).
    """
    zeros = bytes(MIB)
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        size = os.fstat(fi.fileno()).st_size
        if os.fstat(fo.fileno()).st_size < dst_offset + size:
            raise ValueError(f"{dst} is too small for {src} at offset {dst_offset}")
        for start, length in _data_extents(fi.fileno(), size):
            pos, end = start, start + length
            while pos < end:
                chunk = os.pread(fi.fileno(), min(MIB - pos % MIB, end - pos), pos)
                if not chunk:
                    raise RuntimeError(f"{src} shrank while being copied")
                if chunk != zeros[: len(chunk)]:
                    written = 0
                    while written < len(chunk):
                        written += os.pwrite(
                            fo.fileno(), chunk[written:], dst_offset + pos + written
                        )
                pos += len(chunk)


def _resparsify(path: Path) -> None:
    """Rewrite `path` keeping only its non-zero data (frees e.g. xfs' preallocated log)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.ftruncate(fd, path.stat().st_size)
        os.close(fd)
        sparse_copy(path, tmp, 0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _loop_mounted(image: Path, fstype: str) -> Iterator[Path]:
    """Mount a filesystem image read-write through a loop device; undo both afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix=f".{image.name}.mnt-", dir=image.parent))
    try:
        loop = run_tool(["losetup", "--find", "--show", str(image)]).strip()
        try:
            run_tool(["mount", "-t", fstype, loop, str(mnt)])
            try:
                yield mnt
            finally:
                unmount(mnt, attempts=5, timeout_s=_TIMEOUT_S)
        finally:
            run_tool(["losetup", "-d", loop])
    finally:
        with contextlib.suppress(OSError):
            mnt.rmdir()


def _walk(tree: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) for everything below `tree`, parents before children."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            yield str(full.relative_to(tree)), full.lstat()


# --------------------------------------------------------------------------------------------
# filesystem images


def _mkfs_ext(path: Path, spec: PartSpec) -> None:
    cmd = ["mke2fs", "-q", "-F", "-t", spec.fstype]
    if spec.label:
        cmd += ["-L", spec.label]
    if spec.tree is not None:
        cmd += ["-d", str(spec.tree)]
    run_tool([*cmd, str(path)])


def _mkfs_xfs(path: Path, spec: PartSpec) -> None:
    if spec.size_mib < XFS_MIN_MIB:
        raise ValueError(f"xfs needs at least {XFS_MIN_MIB} MiB, not {spec.size_mib}")
    run_tool(["mkfs.xfs", "-q", "-f", *(["-L", spec.label] if spec.label else []), str(path)])
    if spec.tree is not None:
        with _loop_mounted(path, "xfs") as mnt:
            run_tool(["cp", "-a", "--", f"{spec.tree}/.", f"{mnt}/"])
    _resparsify(path)


def _mkfs_btrfs(path: Path, spec: PartSpec) -> None:
    cmd = ["mkfs.btrfs", "-q", "-f"]
    if spec.size_mib < BTRFS_MIXED_BELOW_MIB:
        cmd.append("--mixed")
    if spec.label:
        cmd += ["-L", spec.label]
    if spec.tree is not None:
        cmd += ["--rootdir", str(spec.tree)]
    run_tool([*cmd, str(path)])
    if spec.tree is None:
        return
    # btrfs-progs 6.2 --rootdir writes device nodes with rdev 0:0: make them again.
    devices = [
        (rel, st)
        for rel, st in _walk(spec.tree)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    ]
    if devices:
        with _loop_mounted(path, "btrfs") as mnt:
            for rel, st in devices:
                node = mnt / rel
                node.unlink()
                os.mknod(node, st.st_mode, st.st_rdev)
                os.chown(node, st.st_uid, st.st_gid)
                os.chmod(node, stat.S_IMODE(st.st_mode))
                os.utime(node, ns=(st.st_atime_ns, st.st_mtime_ns))
                parent = (spec.tree / rel).parent.stat()
                os.utime(node.parent, ns=(parent.st_atime_ns, parent.st_mtime_ns))


def _mkfs_vfat(path: Path, spec: PartSpec) -> None:
    run_tool(["mkfs.vfat", *(["-n", spec.label] if spec.label else []), str(path)])
    if spec.tree is None:
        return
    # Only regular files and directories: stage them (hard links where possible) and copy the
    # whole staging tree with one mcopy.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.vfat-", dir=path.parent) as tmp:
        stage = Path(tmp)
        for rel, st in _walk(spec.tree):
            if stat.S_ISDIR(st.st_mode):
                (stage / rel).mkdir()
            elif stat.S_ISREG(st.st_mode):
                try:
                    os.link(spec.tree / rel, stage / rel)
                except OSError:
                    shutil.copy2(spec.tree / rel, stage / rel)
        entries = sorted(str(p) for p in stage.iterdir())
        if entries:
            env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
            run_tool(
                ["mcopy", "-s", "-p", "-m", "-Q", "-D", "o", "-i", str(path), *entries, "::/"],
                env=env,
            )


def _mkswap(path: Path, spec: PartSpec) -> None:
    if spec.tree is not None:
        raise ValueError("a swap area cannot hold a tree")
    run_tool(["mkswap", *(["-L", spec.label] if spec.label else []), str(path)])


def make_fs_image(path: Path, spec: PartSpec) -> None:
    """A filesystem image file of spec.size_mib holding spec.tree. ext*: mke2fs -d;
    btrfs: mkfs.btrfs --rootdir; vfat: mkfs.vfat then mcopy -s (vfat cannot hold symlinks,
    device nodes or setuid bits: copy regular files and dirs only); xfs: mkfs.xfs then mount it
    read-write through a loop device in a temp dir, cp -a the tree, umount, free the loop
    (all in try/finally); swap: mkswap; none: zeros.

    The file is sparse and exactly spec.size_mib MiB. btrfs below 256 MiB is made with
    --mixed (without it mkfs.btrfs needs ~109 MiB and silently grows the file); device nodes
    in the tree are recreated through a loop mount afterwards, as mkfs.btrfs --rootdir loses
    their numbers.
    """
    if spec.fstype not in FSTYPES:
        raise ValueError(f"unknown fstype {spec.fstype!r}; expected one of {FSTYPES}")
    if spec.size_mib <= 0:
        raise ValueError(f"size_mib must be positive, not {spec.size_mib}")
    if spec.tree is not None and not spec.tree.is_dir():
        raise ValueError(f"tree {spec.tree} is not a directory")
    size = spec.size_mib * MIB
    blank_file(path, size)
    try:
        if spec.fstype in ("ext2", "ext3", "ext4"):
            _mkfs_ext(path, spec)
        elif spec.fstype == "xfs":
            _mkfs_xfs(path, spec)
        elif spec.fstype == "btrfs":
            _mkfs_btrfs(path, spec)
        elif spec.fstype == "vfat":
            _mkfs_vfat(path, spec)
        elif spec.fstype == "swap":
            _mkswap(path, spec)
        elif spec.tree is not None:
            raise ValueError("an unformatted ('none') partition cannot hold a tree")
        if (actual := path.stat().st_size) != size:
            raise RuntimeError(
                f"{spec.fstype} image {path} grew to {actual} bytes instead of {size}: "
                "size_mib is too small for the filesystem or its tree"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
