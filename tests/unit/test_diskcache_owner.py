"""`cache_dir=` against other local users (backupfs.readpath.diskcache): root uses only a
directory of its own that no one else can write, and never reads a planted file whole."""

import hashlib
import os
from pathlib import Path

import pytest

from backupfs.errors import UserError
from backupfs.readpath.diskcache import DiskCache
from backupfs.store.manifest import MAX_BLOCK_SIZE

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="root's rules, and chown")
OTHER_UID = 65534


def _refusal(root: Path) -> str:
    with pytest.raises(UserError) as info:
        DiskCache(root, 1 << 30)
    return str(info.value)


def _entry(root: Path, digest: bytes) -> Path:
    return root / "v1" / digest.hex()[:2] / digest.hex()


@needs_root
@pytest.mark.parametrize("mode", [0o700, 0o755], ids=oct)
def test_root_refuses_a_cache_dir_owned_by_another_user(tmp_path: Path, mode: int) -> None:
    """Its owner could swap v1/ or its subdirectories for symlinks to steer root's
    writes and evictions, even where only the owner can write."""
    root = tmp_path / "theirs"
    root.mkdir()
    os.chown(root, OTHER_UID, OTHER_UID)
    root.chmod(mode)
    assert _refusal(root) == f"cache_dir {root} is owned by uid {OTHER_UID}: root uses only its own"
    assert not (root / "v1").exists()


@needs_root
@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777], ids=oct)
def test_root_refuses_its_own_cache_dir_writable_by_others(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(mode)
    assert _refusal(root) == f"cache_dir {root} is writable by group or others; chmod go-w it"


def test_a_v1_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    DiskCache(tmp_path, 1 << 30)
    (tmp_path / "v1").chmod(0o777)
    assert _refusal(tmp_path) == f"cache_dir {tmp_path / 'v1'} is writable by group or others"


def test_a_symlinked_v1_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    root.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    (root / "v1").symlink_to(elsewhere)
    assert _refusal(root) == f"cache_dir {root / 'v1'} is not a directory"


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_planted_huge_entry_is_dropped_unread(tmp_path: Path) -> None:
    """Entries are store blocks, at most MAX_BLOCK_SIZE: a bigger file (sparse here, so
    reading it would be quick but still count) is dropped without being read."""
    cache = DiskCache(tmp_path, 1 << 40)
    digest = hashlib.sha256(b"the block that was asked for").digest()
    path = _entry(tmp_path, digest)
    path.parent.mkdir(mode=0o700)
    with open(path, "wb") as f:
        f.truncate(4 * MAX_BLOCK_SIZE)
    before = _bytes_read()
    assert cache.get(digest) is None
    assert _bytes_read() - before < 1 << 20
    assert not path.exists() and cache.stats.corrupt == 1


def test_entries_are_read_only_up_to_max_entry_bytes(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 30, max_entry_bytes=4096)
    small = os.urandom(4096)
    digest = hashlib.sha256(small).digest()
    cache.put(digest, small)
    assert cache.get(digest) == small
    big = os.urandom(4097)
    cache.put(hashlib.sha256(big).digest(), big)  # not stored: it could not be read back
    assert not _entry(tmp_path, hashlib.sha256(big).digest()).exists()
    _entry(tmp_path, digest).write_bytes(small + b"x")  # grown on disk
    before = _bytes_read()
    assert cache.get(digest) is None
    assert _bytes_read() - before < 4096
