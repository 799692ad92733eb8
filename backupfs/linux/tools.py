"""Running the system's tools (mount, losetup, blkid, sfdisk, fusermount3)."""

import subprocess


def failure_reason(proc: "subprocess.CompletedProcess[str]", prefix: str = "") -> str:
    """The last line a failed tool wrote to stderr (without its own `prefix`, such as
    "mount: "), or its exit status when it wrote nothing."""
    lines = proc.stderr.strip().splitlines()
    if not lines:
        return f"exit status {proc.returncode}"
    return lines[-1].removeprefix(prefix)
