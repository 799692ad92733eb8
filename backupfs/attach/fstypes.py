"""How each filesystem type is mounted from a backup, or why it is skipped."""

import os
from pathlib import Path

# Options that make a read-only mount of a possibly unclean filesystem safe, and that let
# several clones of one filesystem be mounted at once.
#
# The image must not choose what the kernel does on a metadata error: ext2/3/4 take it
# from the superblock (`tune2fs -e panic`, or `errors=panic` in its stored mount options),
# and one damaged block would then panic the host. `errors=continue` on the command line
# overrides both. xfs has no such setting in the image (its panic switch is the host's
# fs.xfs.panic_mask sysctl); btrfs reads no mount options from the image and its
# `fatal_errors=` default, `bug`, is the mildest it has; vfat and exfat default to
# remount-ro whatever the image says. See docs/design.md, Attach.
_EXT_ERRORS = "errors=continue"
_FS_OPTIONS = {
    "ext4": ["noload", _EXT_ERRORS],  # no journal replay
    "ext3": ["noload", _EXT_ERRORS],
    "ext2": [_EXT_ERRORS],
    "xfs": ["norecovery", "nouuid"],  # no log recovery; clones share a UUID
    "btrfs": ["rescue=nologreplay"],  # clones of one fs get a temporary fsid (Linux 6.7+)
    "vfat": [],
    "exfat": [],
    "iso9660": [],
    "ntfs": [],  # mounted by the kernel's ntfs3, else by ntfs-3g (FUSE): see mount_type
}
# Filesystems with a userspace driver to use when the kernel has none: blkid's type ->
# (kernel driver, mount -t type of the FUSE driver, its mount helper). vfat has none:
# Debian's fusefat shows 8.3 names upper-cased and one wrong date for every file, which a
# restore must not copy. ntfs-3g mounts
# read-only from the loop device (fuseblk), hides NTFS's system files, and shows
# alternate data streams not at all (its default streams_interface=none for ro mounts of
# this kind is what restore wants: file contents only).
_USERSPACE = {
    "ntfs": ("ntfs3", "ntfs-3g", "/sbin/mount.ntfs-3g"),
    "exfat": ("exfat", "exfat-fuse", "/sbin/mount.exfat-fuse"),  # names and times kept
}
_SKIP_REASONS = {
    "swap": "swap space, no files",
    "LVM2_member": "LVM physical volume (its logical volumes are listed as VG-LV)",
    "crypto_LUKS": "LUKS encrypted volume (needs the key and dm-crypt: not supported)",
    "linux_raid_member": "MD RAID member (not supported)",
    "zfs_member": "ZFS pool member (not supported)",
}
SAFE_OPTIONS = ["ro", "nosuid", "nodev", "noexec"]


def kernel_has(fstype: str) -> bool:
    """The running kernel has this filesystem built in, loaded, or as a module to load."""
    with open("/proc/filesystems") as f:
        if fstype in (line.split()[-1] for line in f if line.strip()):
            return True
    modules = Path("/lib/modules") / os.uname().release / "kernel" / "fs"
    return any(modules.glob(f"**/{fstype}.ko*")) if modules.is_dir() else False


def skip_reason(fstype: str | None) -> str | None:
    """Why a partition is not mounted, or None when it is mountable."""
    if fstype is None:
        return "no filesystem found"
    if fstype not in _FS_OPTIONS:
        return _SKIP_REASONS.get(fstype, f"filesystem type {fstype} is not supported")
    if fstype in _USERSPACE:
        kernel, fuse, helper = _USERSPACE[fstype]
        if kernel_has(kernel) or os.path.exists(helper):
            return None
        return f"neither the kernel ({kernel}) nor userspace ({fuse}: not installed) has a driver"
    if not kernel_has(fstype):
        return f"the running kernel has no {fstype} driver"
    return None


def is_userspace(mount_type: str) -> bool:
    """Whether this `mount -t` type is one of the userspace (FUSE) drivers."""
    return any(mount_type == fuse for _, fuse, _ in _USERSPACE.values())


def mount_type(fstype: str) -> str:
    """What `mount -t` gets for a mountable filesystem: the kernel's driver where it has
    one, else the userspace one (its mount helper runs it as a FUSE daemon)."""
    if fstype in _USERSPACE:
        kernel, fuse, _ = _USERSPACE[fstype]
        return kernel if kernel_has(kernel) else fuse
    return fstype


def mount_options(fstype: str, follow_symlinks: bool) -> str:
    options = [*SAFE_OPTIONS, *_FS_OPTIONS[fstype]]
    if not follow_symlinks:
        options.append("nosymfollow")
    return ",".join(options)
