"""Make file trees for tests: nested directories of random files, symlinks and special files.

The same seed gives the same tree; `make_tree` returns the SHA-256 of every regular file, so a
test can check what a restore or a mount gives back. Needs root for the setuid file and the
device node (special=True).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import stat
from pathlib import Path

MIB = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


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
