"""Which processes hold files under a mountpoint open (what `fuser -m` tells), from /proc."""

import contextlib
import errno
import os


def _under(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def processes_using(mountpoint: str) -> list[tuple[int, str]]:
    """(pid, command name) of every process with an open file, working directory or root
    under `mountpoint`; processes that cannot be inspected are passed over."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = f"/proc/{entry}"
        links = [f"{base}/cwd", f"{base}/root"]
        with contextlib.suppress(OSError):
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        targets = []
        for link in links:
            with contextlib.suppress(OSError):
                targets.append(os.readlink(link))
        if any(_under(t, mountpoint) for t in targets):
            try:
                with open(f"{base}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = "?"
            found.append((int(entry), name))
    return found


def is_dead_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone: every request fails with ENOTCONN. statfs, not
    stat: the kernel may answer stat from attributes it cached while the daemon lived."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
    return False
