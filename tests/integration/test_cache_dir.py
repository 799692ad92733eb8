"""The persistent block cache (`-o cache_dir=`) across real mounts."""

from pathlib import Path

from backupfs.store.indexer import DEFAULT_BLOCK_SIZE
from tests.integration.conftest import SMALL, Store
from tests.support.mounting import mounted, read_stats, run_cli, sha256_file

DISK = next(iter(SMALL))  # 3 MiB + 1 byte: the last block is 1 byte
BLOCK = DEFAULT_BLOCK_SIZE


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "v1").glob("*/*") if p.is_file())


def test_blocks_survive_a_remount(store: Store, mnt: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    option = f"cache_dir={cache_dir}"
    with mounted(store.url, mnt, option):
        assert sha256_file(mnt / DISK) == store.sha256[DISK]
        first = read_stats(mnt)
    assert first["bytes_fetched"] >= SMALL[DISK] and first["disk_cache_hits"] == 0
    assert len(_entries(cache_dir)) == -(-SMALL[DISK] // BLOCK)
    with mounted(store.url, mnt, option):
        assert sha256_file(mnt / DISK) == store.sha256[DISK]
        second = read_stats(mnt)
    assert second["bytes_fetched"] == 0
    assert second["disk_cache_hits"] == len(_entries(cache_dir))


def test_a_corrupt_entry_is_fetched_again(store: Store, mnt: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    option = f"cache_dir={cache_dir}"
    with mounted(store.url, mnt, option):
        assert sha256_file(mnt / DISK) == store.sha256[DISK]
    victim = _entries(cache_dir)[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with mounted(store.url, mnt, option):
        assert sha256_file(mnt / DISK) == store.sha256[DISK]
        stats = read_stats(mnt)
    assert stats["bytes_fetched"] == len(data)  # that block, and nothing else
    assert stats["disk_cache_hits"] == len(_entries(cache_dir)) - 1
    assert victim.read_bytes() != bytes(data)  # replaced by the good block


def test_an_unusable_cache_dir_fails_the_mount_in_one_line(
    store: Store, mnt: Path, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run_cli("mount", "-o", f"cache_dir={not_a_dir}", store.url, str(mnt))
    assert result.returncode == 1
    assert result.stderr == f"backupfs: cache_dir {not_a_dir} is not a directory\n"
