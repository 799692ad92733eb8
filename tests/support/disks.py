"""Build disk images for tests: file trees, filesystem images and partitioned disks.

Needs root (mknod, setuid files, loop mounts for xfs) and the usual tools: sfdisk, mke2fs,
mkfs.xfs, mkfs.btrfs, mkfs.vfat + mtools, mkswap, losetup, mount. Nothing here relies on the
kernel parsing partition tables: filesystems are built as separate files and copied into the
disk image at their partition's offset.

Every loop device and mount made here is undone before the function returns, also on failure.
Mount points are made next to the image being built, so a pytest leftover guard that watches
its base temp directory sees them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.system import unmount

MIB = 1 << 20
SECTOR = 512
ALIGN = MIB  # partitions start on 1 MiB boundaries
FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "swap", "none")
XFS_MIN_MIB = 300  # xfsprogs >= 5.19 refuses anything smaller
BTRFS_MIXED_BELOW_MIB = 256  # below ~109 MiB mkfs.btrfs silently grows the file unless --mixed
_TIMEOUT_S = 120

# sfdisk type shortcuts, valid for both gpt and dos tables
_LINUX, _SWAP, _EFI = "L", "S", "U"
# MBR ids for FAT by what mkfs.vfat chose (blkid VERSION)
_DOS_FAT_IDS = {"FAT12": "1", "FAT16": "e", "FAT32": "c"}


@dataclass(frozen=True)
class PartSpec:
    fstype: str  # "ext2" "ext3" "ext4" "xfs" "btrfs" "vfat" "swap" or "none" (left unformatted)
    size_mib: int
    label: str = ""
    tree: Path | None = None  # directory whose contents are copied into the filesystem


# --------------------------------------------------------------------------------------------
# helpers


def _run(cmd: list[str], *, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
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


def _blank(path: Path, size: int) -> None:
    """A fresh, fully sparse file of `size` bytes (an old file at `path` is replaced)."""
    path.unlink(missing_ok=True)
    with open(path, "xb") as f:
        f.truncate(size)


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


def _sparse_copy(src: Path, dst: Path, dst_offset: int) -> None:
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
        _sparse_copy(path, tmp, 0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _loop_mounted(image: Path, fstype: str) -> Iterator[Path]:
    """Mount a filesystem image read-write through a loop device; undo both afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix=f".{image.name}.mnt-", dir=image.parent))
    try:
        loop = _run(["losetup", "--find", "--show", str(image)]).strip()
        try:
            _run(["mount", "-t", fstype, loop, str(mnt)])
            try:
                yield mnt
            finally:
                unmount(mnt, attempts=5, timeout_s=_TIMEOUT_S)
        finally:
            _run(["losetup", "-d", loop])
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# file trees


def _write_random(path: Path, size: int, rng: random.Random) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.randbytes(min(left, MIB))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def make_tree(root: Path, seed: int, files: int = 40, *, special: bool = True) -> dict[str, str]:
    """Make a small file tree (nested dirs, files of sizes 0 B .. 2 MiB of random bytes, a few
    larger ones up to 8 MiB, a relative symlink, an absolute symlink to /etc/hostname).
    With special=True also: a setuid-root executable copy of /usr/bin/id (mode 4755) at
    bin/suid-id and a character device node dev/null-copy (mknod c 1 3).
    Returns {relative path: sha256 hex} for regular files only.

    The same seed gives the same names, sizes and contents. Names are lower-case ASCII and
    distinct ignoring case, so the tree also fits on vfat.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    dirs = ["", "docs", "docs/old", "data", "data/a", "data/a/deep", "data/b", "var/log/app"]
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "empty-dir").mkdir(exist_ok=True)

    edge_sizes = [0, 1, 4095, 4096, 4097, 65537, 2 * MIB]
    n_large = max(1, files // 16) if files >= 4 else 0
    sizes: list[int] = []
    for i in range(files):
        if i < len(edge_sizes) and i < files - n_large:
            sizes.append(edge_sizes[i])
        elif i >= files - n_large:
            sizes.append(rng.randint(2 * MIB + 1, 8 * MIB))
        else:  # log-uniform: mostly small, some up to 2 MiB
            sizes.append(int(math.exp(rng.uniform(0, math.log(2 * MIB)))))

    out: dict[str, str] = {}
    for i, size in enumerate(sizes):
        name = "with space.txt" if i == 2 else f"file-{i:03d}.{rng.choice(['bin', 'dat', 'log'])}"
        rel = str(Path(rng.choice(dirs)) / name)
        out[rel] = _write_random(root / rel, size, rng)

    links = root / "links"
    links.mkdir(exist_ok=True)
    target = next((rel for rel, size in zip(out, sizes, strict=True) if size), next(iter(out), ""))
    if target:
        (links / "rel-link").symlink_to(os.path.relpath(root / target, links))
    (links / "abs-link").symlink_to("/etc/hostname")

    if special:
        (root / "bin").mkdir(exist_ok=True)
        suid = root / "bin" / "suid-id"
        shutil.copyfile("/usr/bin/id", suid)
        os.chown(suid, 0, 0)
        os.chmod(suid, 0o4755)
        out["bin/suid-id"] = _sha256(suid)
        (root / "dev").mkdir(exist_ok=True)
        os.mknod(root / "dev" / "null-copy", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# filesystem images


def _mkfs_ext(path: Path, spec: PartSpec) -> None:
    cmd = ["mke2fs", "-q", "-F", "-t", spec.fstype]
    if spec.label:
        cmd += ["-L", spec.label]
    if spec.tree is not None:
        cmd += ["-d", str(spec.tree)]
    _run([*cmd, str(path)])


def _mkfs_xfs(path: Path, spec: PartSpec) -> None:
    if spec.size_mib < XFS_MIN_MIB:
        raise ValueError(f"xfs needs at least {XFS_MIN_MIB} MiB, not {spec.size_mib}")
    _run(["mkfs.xfs", "-q", "-f", *(["-L", spec.label] if spec.label else []), str(path)])
    if spec.tree is not None:
        with _loop_mounted(path, "xfs") as mnt:
            _run(["cp", "-a", "--", f"{spec.tree}/.", f"{mnt}/"])
    _resparsify(path)


def _mkfs_btrfs(path: Path, spec: PartSpec) -> None:
    cmd = ["mkfs.btrfs", "-q", "-f"]
    if spec.size_mib < BTRFS_MIXED_BELOW_MIB:
        cmd.append("--mixed")
    if spec.label:
        cmd += ["-L", spec.label]
    if spec.tree is not None:
        cmd += ["--rootdir", str(spec.tree)]
    _run([*cmd, str(path)])
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
    _run(["mkfs.vfat", *(["-n", spec.label] if spec.label else []), str(path)])
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
            _run(
                ["mcopy", "-s", "-p", "-m", "-Q", "-D", "o", "-i", str(path), *entries, "::/"],
                env=env,
            )


def _mkswap(path: Path, spec: PartSpec) -> None:
    if spec.tree is not None:
        raise ValueError("a swap area cannot hold a tree")
    _run(["mkswap", *(["-L", spec.label] if spec.label else []), str(path)])


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
    _blank(path, size)
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


# --------------------------------------------------------------------------------------------
# partitioned disks


def _part_type(table: str, spec: PartSpec, image: Path) -> str:
    if spec.fstype == "swap":
        return _SWAP
    if spec.fstype == "vfat":
        if table == "gpt":
            return _EFI
        version = _run(["blkid", "-p", "-s", "VERSION", "-o", "value", str(image)]).strip()
        return _DOS_FAT_IDS.get(version, "c")
    return _LINUX


def _sfdisk_layout(path: Path) -> list[tuple[int, int]]:
    table = json.loads(_run(["sfdisk", "--json", str(path)]))["partitiontable"]
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
        _blank(path, total)
        _run(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", str(path)],
            stdin="\n".join(script) + "\n",
        )
        reported = _sfdisk_layout(path)
        if reported != layout:
            raise RuntimeError(f"sfdisk made {reported}, expected {layout}")
        for (start, _), image in zip(layout, images, strict=True):
            _sparse_copy(image, path, start)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        for image in images:
            image.unlink(missing_ok=True)
    return layout
