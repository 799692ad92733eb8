"""Running backupfs as an unprivileged user (nobody) from this interpreter.

The interpreter may live where nobody cannot go (pyenv under /root, mode 0700): its
prefix is then bind-mounted read-only at a temporary directory for the test, and run from
there (LD_LIBRARY_PATH for its libpython). Undone on exit, also on failure."""

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ROOT = str(Path(__file__).resolve().parents[2])


def _reachable_by_others(path: str) -> bool:
    here = Path(path).resolve()
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [here, *here.parents])


@contextlib.contextmanager
def nobody_backupfs() -> Iterator[list[str]]:
    """The argv prefix that runs `backupfs` as nobody."""
    prefix = sys.base_prefix
    exe = Path(sys.executable).resolve()
    env = ["env", f"PYTHONPATH={ROOT}", "HOME=/nonexistent"]
    if _reachable_by_others(prefix):
        yield [*NOBODY, *env, str(exe), "-m", "backupfs"]
        return
    with tempfile.TemporaryDirectory(prefix="pyprefix-") as where:
        os.chmod(where, 0o755)
        subprocess.run(["mount", "--bind", "-o", "ro", prefix, where], check=True, timeout=30)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", where], check=True, timeout=30)
            python = Path(where) / exe.relative_to(Path(prefix).resolve())
            yield [*NOBODY, *env, f"LD_LIBRARY_PATH={where}/lib", str(python), "-m", "backupfs"]
        finally:
            subprocess.run(["umount", where], check=True, timeout=30)
