"""Filesystem calls of the kernel: statfs(2) f_type and names, syncfs(2)."""

import ctypes
import os

from backupfs.linux.libc import check, libc

# statfs f_type of filesystems where syncfs does not mean durable on the server
NO_SYNCFS = {
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
    0x6165676C: "pstorefs",
}
_FS_NAMES = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs",
             0x4D44: "vfat", 0x2FC12FC1: "zfs", 0x794C7630: "overlay"}  # fmt: skip


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def fs_type(path: str) -> int:
    buf = _Statfs()
    check(libc.statfs(os.fsencode(path), ctypes.byref(buf)), "statfs", path)
    return buf.f_type & 0xFFFFFFFF


def fs_name(f_type: int) -> str:
    return NO_SYNCFS.get(f_type) or _FS_NAMES.get(f_type) or f"0x{f_type:x}"


def syncfs(fd: int) -> None:
    """Flush the whole filesystem that `fd` is on; reports writeback errors seen since
    `fd` was opened (Linux 5.8+)."""
    check(libc.syncfs(fd), "syncfs")
