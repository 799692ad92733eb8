"""Replacing a small file so that a reader or a crash sees the old or the new one, whole."""

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
