"""Read-only loop devices over a range of an image file (losetup)."""

import subprocess
from pathlib import Path

from backupfs.errors import UserError
from backupfs.linux.tools import failure_reason

TIMEOUT_S = 60


def attach(image: str, start_bytes: int, size_bytes: int, direct_io: bool) -> str:
    argv = [
        "losetup", "--find", "--show", "--read-only",
        "--offset", str(start_bytes), "--sizelimit", str(size_bytes),
        f"--direct-io={'on' if direct_io else 'off'}", image,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        reason = failure_reason(proc)
        if "free loop" in reason:
            raise UserError("no free loop device (see `losetup -a`)")
        raise UserError(f"cannot set up a loop device on {image}: {reason}")
    return proc.stdout.strip()


def backing(device: str) -> tuple[str, int] | None:
    """The file and offset behind a loop device, or None if it is not set up."""
    sys_dir = Path("/sys/block") / Path(device).name / "loop"
    try:
        name = (sys_dir / "backing_file").read_text().strip()
        offset = int((sys_dir / "offset").read_text())
    except (OSError, ValueError):
        return None
    return name, offset


def detach(device: str, image: str, start_bytes: int) -> None:
    """Free the device if it still is ours (same backing file and offset); idempotent."""
    if backing(device) != (image, start_bytes):
        return
    proc = subprocess.run(["losetup", "-d", device], capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    if proc.returncode != 0 and backing(device) is not None:
        raise UserError(f"cannot free {device}: {failure_reason(proc, 'losetup: ')}")
