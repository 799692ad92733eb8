"""Resolving the parent an image names (a qcow2 backing file, a VMDK parentFileNameHint,
a VHD/VHDX parent locator) to another image of the store, and checking each chain ends.

An image names its parent as its writer saw it: a path relative to the image's own
directory (`qemu-img create -b ../2026-11-01T0300Z/disk0.qcow2`), an absolute path on the
machine that wrote it (`/var/lib/libvirt/images/base.qcow2`), or a Windows path (VHD,
VHDX: `..\\base.vhdx`, `C:\\VMs\\base.vhdx`). `--map-parent FROM=TO` rewrites a path that
starts with FROM to start with TO (a directory of the store) before it is looked up.
Parents must be images of the store; anything else is refused, with one line naming the
image.
"""

import ntpath
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from backupfs.errors import UsageError

MAX_CHAIN_DEPTH = 256  # images below the top one: qemu itself stops at 16


@dataclass(frozen=True)
class ParentMap:
    prefix: str  # as written in images, e.g. /var/lib/libvirt/images/ or C:\VMs\
    target: str  # store-relative directory, e.g. web01/2026-11-01T0300Z

    @classmethod
    def parse(cls, text: str) -> "ParentMap":
        prefix, sep, target = text.partition("=")
        if not sep or not prefix:
            raise UsageError(f"--map-parent {text}: expected FROM=TO (TO relative to the store)")
        if target.startswith("/") or ".." in PurePosixPath(target).parts:
            raise UsageError(f"--map-parent {text}: TO must be a directory inside the store")
        return cls(prefix, target.strip("/"))


def _as_posix(written: str) -> tuple[str, bool]:
    """The path as POSIX text and whether it is absolute; Windows paths turned around."""
    if "\\" in written or (len(written) > 1 and written[1] == ":"):
        drive, rest = ntpath.splitdrive(written)
        posix = rest.replace("\\", "/")
        return posix, bool(drive) or posix.startswith("/")
    return written, written.startswith("/")


def resolve_parent(
    written: str, image_dir: str, known: Mapping[str, object], maps: list[ParentMap]
) -> str:
    """The store path ("host/snapshot/file") of the parent that the image in store
    directory `image_dir` ("host/snapshot") names as `written`; ValueError (with the reason)
    when it is not an image of the store in `known`."""
    for m in maps:
        if written.startswith(m.prefix):
            tail, _ = _as_posix(written[len(m.prefix) :])
            return _known(posixpath.join(m.target, tail.lstrip("/")), written, known)
    path, absolute = _as_posix(written)
    if absolute:
        raise ValueError(f"parent {written!r} is an absolute path (map it with --map-parent)")
    return _known(posixpath.join(image_dir, path), written, known)


def _known(joined: str, written: str, known: Mapping[str, object]) -> str:
    normal = posixpath.normpath(joined)
    if normal.startswith("../") or normal == ".." or normal.startswith("/"):
        raise ValueError(f"parent {written!r} is outside the store")
    if normal not in known:
        raise ValueError(f"parent {written!r} ({normal}) is not an image of the store")
    return normal


def broken_chains(parents: Mapping[str, str | None]) -> dict[str, str]:
    """Images whose chain loops, is deeper than MAX_CHAIN_DEPTH, or stands on an image
    missing from `parents` (a refused one), with the reason; the rest are good."""
    bad: dict[str, str] = {}
    for top in parents:
        seen, here = [top], parents[top]
        while here is not None:
            if here not in parents:
                bad[top] = f"its parent {here} was not indexed"
                break
            if here in seen:
                bad[top] = f"its chain loops through {here}"
                break
            seen.append(here)
            if len(seen) > MAX_CHAIN_DEPTH + 1:
                bad[top] = f"its chain is deeper than {MAX_CHAIN_DEPTH} images"
                break
            here = parents[here]
    return bad
