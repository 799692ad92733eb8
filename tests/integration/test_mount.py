"""A real backupfs mount of a store served by a real nginx."""

import errno
import json
import os
import random
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from backupfs.errors import EXIT_ERROR, EXIT_STORE, EXIT_USAGE
from tests.integration.conftest import BIG, BIG_SIZE, SMALL, TOKEN, Store
from tests.support.mounting import (
    daemon_pids,
    kill_daemons,
    mounted,
    run_cli,
    sha256_file,
    start_foreground,
    stop,
)
from tests.support.system import is_mounted, unmount


def test_ls_lists_every_disk(store: Store) -> None:
    result = run_cli("ls", "--json", store.url)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    got = {f"{r['host']}/{r['snapshot']}/{r['disk']}": r["size_bytes"] for r in rows}
    assert got == {BIG: BIG_SIZE, **SMALL}
    assert {r["time"] for r in rows if r["host"] == "web02"} == {"2026-11-19T00:00:00Z"}
    table = run_cli("ls", store.url)
    assert table.returncode == 0
    assert "web01" in table.stdout and "2026-11-20T0300Z" in table.stdout


def test_whole_images_read_back_identical(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt):
        for rel, digest in store.sha256.items():
            assert sha256_file(mnt / rel) == digest, rel


def test_tree_shows_sizes_times_and_modes(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt):
        assert sorted(os.listdir(mnt)) == ["web01", "web02"]
        assert sorted(os.listdir(mnt / "web01")) == ["2026-11-20T0300Z", "2026-11-21T0300Z"]
        st = os.stat(mnt / BIG)
        assert st.st_size == BIG_SIZE
        assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_uid == os.getuid()
        assert time.strftime("%Y-%m-%dT%H%MZ", time.gmtime(st.st_mtime)) == "2026-11-20T0300Z"
        assert stat.S_IMODE(os.stat(mnt / "web01").st_mode) == 0o500


def test_random_ranges_match_the_source(store: Store, mnt: Path) -> None:
    rng = random.Random(1234)
    with mounted(store.url, mnt), open(store.path(BIG), "rb") as src, open(mnt / BIG, "rb") as f:
        for _ in range(1000):
            size = rng.choice([1, 512, 4096, 65536, 300_000, 1 << 20])
            offset = rng.randrange(0, BIG_SIZE + 10)
            assert os.pread(f.fileno(), size, offset) == os.pread(src.fileno(), size, offset)


def test_concurrent_readers_get_correct_bytes(store: Store, mnt: Path) -> None:
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        with open(store.path(BIG), "rb") as src, open(mnt / BIG, "rb") as f:
            base = rng.randrange(0, BIG_SIZE - (64 << 20))
            for i in range(64):  # a sequential stream with some shared regions
                offset = base + i * (1 << 20)
                if os.pread(f.fileno(), 1 << 20, offset) != os.pread(src.fileno(), 1 << 20, offset):
                    errors.append(f"reader {seed} offset {offset}")

    with mounted(store.url, mnt):
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors


def test_everything_is_read_only(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt):
        image = mnt / BIG
        for attempt in (
            lambda: os.open(image, os.O_RDWR),
            lambda: os.open(mnt / "web01" / "new", os.O_WRONLY | os.O_CREAT),
            lambda: os.chmod(image, 0o644),
            lambda: os.setxattr(image, "user.x", b"1"),
            lambda: os.mkdir(mnt / "d"),
            lambda: os.unlink(image),
        ):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS


def test_background_mount_is_ready_on_return_and_umount_stops_it(store: Store, mnt: Path) -> None:
    try:
        result = run_cli("mount", store.url, str(mnt))
        assert result.returncode == 0, result.stderr
        assert result.stdout == result.stderr == ""
        rel = "web02/2026-11-19/data.img"
        assert sha256_file(mnt / rel) == store.sha256[rel]  # usable on the very next line
        assert len(daemon_pids(mnt)) == 1
        assert run_cli("umount", str(mnt)).returncode == 0
        deadline = time.monotonic() + 10
        while daemon_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemon_pids(mnt) and not is_mounted(mnt)
    finally:
        unmount(mnt, fuse=True)
        kill_daemons(mnt)


def test_sigterm_unmounts_cleanly(store: Store, mnt: Path) -> None:
    proc = start_foreground(store.url, mnt)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not is_mounted(mnt)
    finally:
        stop(proc, mnt)


def test_killed_daemon_leaves_a_dead_mount_not_an_empty_dir(store: Store, mnt: Path) -> None:
    proc = start_foreground(store.url, mnt)
    try:
        proc.kill()
        proc.wait(timeout=15)
        assert is_mounted(mnt)
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)
        assert exc.value.errno == errno.ENOTCONN
    finally:
        stop(proc, mnt)


def test_bearer_token_from_file(store: Store, mnt: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    url = store.url + "private/"
    with mounted(url, mnt, f"token_file={token_file}") as proc:
        rel = "web02/2026-11-19/data.img"
        assert sha256_file(mnt / rel) == store.sha256[rel]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline
    denied = run_cli("mount", url, str(mnt))
    assert denied.returncode == EXIT_STORE
    assert (
        denied.stderr
        == (
            f"backupfs: cannot read {url}backupfs-store.json: "
            f"{url}backupfs-store.json: HTTP 401 (check -o token_file=)\n"
        )
        or "HTTP 401 (check -o token_file=)" in denied.stderr
    )
    assert not is_mounted(mnt)


def _mount_error(url: str, mnt: Path, *extra: str, rc: int = EXIT_STORE) -> str:
    result = run_cli("mount", *extra, url, str(mnt))
    assert result.returncode == rc, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not is_mounted(mnt)
    return result.stderr.removeprefix("backupfs: ").rstrip("\n")


def test_store_errors_are_one_line(store: Store, mnt: Path) -> None:
    url = store.url
    assert _mount_error(url + "empty/", mnt) == (
        f"cannot read {url}empty/backupfs-store.json: HTTP 404 "
        "(is this a backupfs store? run `backupfs index` on it)"
    )
    assert _mount_error(url + "forbidden/", mnt) == (
        f"cannot read {url}forbidden/backupfs-store.json: HTTP 403 (check -o token_file=)"
    )
    assert _mount_error(url + "badjson/", mnt).startswith(
        f"{url}badjson/backupfs-store.json: malformed store metadata: not valid JSON"
    )
    assert _mount_error(url + "hostile/", mnt) == (
        f"{url}hostile/backupfs-store.json: unsafe host name in store metadata: '..'"
    )
    assert _mount_error(url + "newer/", mnt) == (
        f"{url}newer/backupfs-store.json: "
        "store format version 99 is not supported (this backupfs reads 1, 2 and 3)"
    )
    assert _mount_error(url + "html/", mnt) == (
        f"{url}html/backupfs-store.json: got text/html, not a store catalogue "
        "(is this the store's URL?)"
    )
    assert _mount_error(url + "norange/", mnt) == (
        f"{url}norange/: the server ignores Range requests (answered 200 to a ranged GET); "
        "backupfs needs a server that honours Range"
    )


def test_unreachable_store(mnt: Path) -> None:
    from tests.support.nginx import free_port

    url = f"http://127.0.0.1:{free_port()}/"
    message = _mount_error(url, mnt, "-o", "retries=1")
    assert message.startswith(f"cannot read {url}backupfs-store.json: ")
    assert "connect" in message.lower() or "refused" in message.lower()


def test_argument_errors(store: Store, mnt: Path, tmp_path: Path) -> None:
    assert _mount_error(store.url, tmp_path / "nope", rc=EXIT_ERROR) == (
        f"mountpoint {tmp_path / 'nope'} does not exist"
    )
    assert _mount_error(store.url, mnt, "-o", "bogus=1", rc=EXIT_USAGE) == (
        "unknown mount option 'bogus'"
    )
    assert _mount_error("http://u:pw@127.0.0.1:1/", mnt, rc=EXIT_USAGE) == (
        "credentials in the URL are refused; use -o token_file= or -o netrc="
    )
    assert _mount_error("ftp://example/", mnt, rc=EXIT_USAGE) == (
        "not an http(s) URL: ftp://example/"
    )
    with mounted(store.url, mnt):
        result = run_cli("mount", store.url, str(mnt))
        assert result.returncode == 1
        assert result.stderr == (
            f"backupfs: mountpoint {mnt} is busy (something is already mounted there)\n"
        )


def test_block_size_option(store: Store, mnt: Path) -> None:
    rng = random.Random(7)
    with (
        mounted(store.url, mnt, "block_size=1M", "cache_size=64M"),
        open(store.path(BIG), "rb") as src,
        open(mnt / BIG, "rb") as f,
    ):
        for _ in range(50):
            offset, size = rng.randrange(0, BIG_SIZE), rng.choice([100, 70_000, 3 << 20])
            assert os.pread(f.fileno(), size, offset) == os.pread(src.fileno(), size, offset)
    assert _mount_error(store.url, mnt, "-o", "block_size=100K", rc=EXIT_USAGE) == (
        "block_size=102400 is not a multiple of the store's block size (65536) for host web01"
    )


def test_allow_other_makes_images_world_readable(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt, "allow_other"):
        assert stat.S_IMODE(os.stat(mnt / BIG).st_mode) == 0o444
        assert stat.S_IMODE(os.stat(mnt / "web01").st_mode) == 0o555
        assert "allow_other" in Path("/proc/self/mountinfo").read_text()
