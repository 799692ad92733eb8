"""Digests at real sizes (store format 2): a sparse 4 TiB image is indexed without reading
its holes, opens with only its chunk index fetched, and each read fetches the one chunk of
records it needs; a store written in format 1 still mounts."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

from backupfs.store import digestfile, manifest
from tests.support.mounting import mounted, read_stats, run_cli, sha256_file
from tests.support.nginx import Nginx

TiB, MiB = 1 << 40, 1 << 20
SIZE = 4 * TiB
DATA_AT = (0, 3 * TiB + 5 * MiB, SIZE - MiB)  # a MiB of random bytes at each
HOLE_AT = 2 * TiB
BLOCK = 64 << 10  # the store's default block size
RSS_LIMIT = 400 * MiB  # cache_size=256M and the interpreter; 2 GiB of digests would not fit


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _direct_read(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` with O_DIRECT: one read reaches the daemon, no readahead."""
    dd = subprocess.run(
        ["dd", f"if={path}", "of=/dev/stdout", f"bs={size}", "count=1", "iflag=direct,skip_bytes",
         f"skip={offset}"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert dd.returncode == 0, dd.stderr
    return dd.stdout


def test_a_sparse_4_tib_image_opens_and_fetches_only_the_digests_it_reads(
    tmp_path: Path,
) -> None:
    root, mnt = tmp_path / "store", tmp_path / "mnt"
    image = root / "big" / "2026-11-20T0300Z" / "disk0.img"
    image.parent.mkdir(parents=True)
    mnt.mkdir()
    written = {at: os.urandom(MiB) for at in DATA_AT}
    with open(image, "wb") as f:
        f.truncate(SIZE)
        for at, data in written.items():
            f.seek(at)
            f.write(data)
    indexed = run_cli("index", str(root), timeout=120)
    assert indexed.returncode == 0, indexed.stderr
    digest_file = root / manifest.digests_path("big", "2026-11-20T0300Z", "disk0.img")
    assert digest_file.stat().st_size == SIZE // BLOCK * 32  # 2 GiB of records...
    assert digest_file.stat().st_blocks * 512 <= 4 * MiB  # ...nearly all of them holes
    index_bytes = digestfile.index_size(SIZE // BLOCK * 32)
    assert index_bytes == MiB

    with Nginx(root, tmp_path / "nginx") as nginx, mounted(nginx.url, mnt) as proc:
        disk = mnt / "big" / "2026-11-20T0300Z" / "disk0.img"
        assert disk.stat().st_size == SIZE
        at = DATA_AT[1] + 3 * BLOCK
        assert _direct_read(disk, at, BLOCK) == written[DATA_AT[1]][3 * BLOCK : 4 * BLOCK]
        stats = read_stats(mnt)
        assert stats["digest_index_bytes"] == index_bytes
        assert stats["digest_bytes_fetched"] == digestfile.CHUNK_BYTES  # one chunk of records
        fetched = stats["bytes_fetched"]
        assert 0 < fetched <= 4 * MiB

        # A hole: zeros, and neither data nor digests fetched (the index says "all zeros").
        assert _direct_read(disk, HOLE_AT, MiB) == bytes(MiB)
        after = read_stats(mnt)
        assert after["bytes_fetched"] == fetched
        assert after["digest_bytes_fetched"] == digestfile.CHUNK_BYTES
        assert after["zero_bytes"] >= MiB

        # The end of the disk, and its first MiB; the daemon stays within its budget.
        assert _direct_read(disk, SIZE - MiB, MiB) == written[SIZE - MiB]
        assert _direct_read(disk, 0, MiB) == written[0]
        assert read_stats(mnt)["digest_bytes_fetched"] == 3 * digestfile.CHUNK_BYTES
        assert _rss(proc.pid) < RSS_LIMIT


def _format_1_store(root: Path, data: bytes, block_size: int) -> None:
    """A store as backupfs wrote it before format 2: whole-file digests, version 1."""
    snap = root / "old" / "2026-01-01"
    (snap / ".backupfs").mkdir(parents=True)
    (snap / "disk0.img").write_bytes(data)
    records = b"".join(
        hashlib.sha256(data[i : i + block_size]).digest() for i in range(0, len(data), block_size)
    )
    (snap / ".backupfs" / "disk0.img.sha256").write_bytes(records)
    disk = {
        "name": "disk0.img", "size_bytes": len(data), "mtime_ns": 0, "block_size": block_size,
        "digests_sha256": hashlib.sha256(records).hexdigest(),
    }  # fmt: skip
    entry = {"host": "old", "name": "2026-01-01", "time_ns": 0, "disks": [disk]}
    doc = {"format": "backupfs-store", "version": 1, "snapshots": [entry]}
    (root / manifest.CATALOGUE_NAME).write_text(json.dumps(doc))


def test_a_format_1_store_still_mounts(tmp_path: Path) -> None:
    root, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    data = os.urandom(5 * MiB + 333) + bytes(MiB)  # zeros too: format 1 has no zero records
    _format_1_store(root, data, BLOCK)
    with Nginx(root, tmp_path / "nginx") as nginx, mounted(nginx.url, mnt):
        assert (
            sha256_file(mnt / "old" / "2026-01-01" / "disk0.img")
            == hashlib.sha256(data).hexdigest()
        )
        stats = read_stats(mnt)
    assert stats["digest_bytes_fetched"] == 0 and stats["zero_bytes"] == 0
    assert stats["bytes_fetched"] >= len(data)
