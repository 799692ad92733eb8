"""A real mount survives what a hostile local client sends to its read-plan socket, and a
hostile catalogue is refused at mount time with one line."""

import contextlib
import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest

from backupfs.errors import EXIT_STORE
from backupfs.plan.channel import socket_address
from backupfs.store import manifest
from tests.integration.conftest import SMALL, Store
from tests.support.catalogue import read_store_catalogue
from tests.support.mounting import mounted, run_cli, sha256_file
from tests.support.system import is_mounted, unmount

IMAGE = "web02/2026-11-19/data.img"
HOSTILE = [
    b'{"ranges": 5}\n',
    b'{"ranges": [[null, 1]]}\n',
    b'{"ranges": [[0, Infinity]]}\n',
    b'{"ranges": [[NaN, 1]]}\n',
    b"[" * 100_000 + b"\n",
    b'"not an object"\n',
    b'{"ranges": [[0, 1000000000000000000]]}\n',
]


SIZE = SMALL[IMAGE]
HOSTILE_VOLUMES = [  # (request, what the daemon's error says)
    ({"volume": "vg-lv", "runs": [[4096, 0, [["web02/nothing.img", 0]]]]}, "no disk"),
    ({"volume": "vg-lv", "runs": [[8192, 0, [[IMAGE, SIZE - 4096]]]]}, "past the end"),
    ({"volume": "vg-lv", "runs": [[8192, 0, [["..", 0]]]]}, "no disk"),
    ({"volume": "vg-lv", "runs": [[8192, 0, [["web02", 0]]]]}, "no disk"),
    ({"volume": "../x", "runs": [[4096, 0, [[IMAGE, 0]]]]}, "name"),
    ({"volume": "vg-lv", "runs": [[8192, 512, [[IMAGE, 0], [IMAGE, 4096]]]]}, "stripes"),
    ({"volume": "vg-lv", "runs": [[4096, 0, [[IMAGE, 0]]]] * 5000}, "runs"),
    ({"volume": "vg-lv", "runs": [[1 << 61, 0, [[IMAGE, 0]]]] * 3}, "large"),
]


def _line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _plan(address: bytes, *lines: bytes) -> list[dict[str, object]]:
    """Send `lines` as a raw client would, then read the replies until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(address)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for line in lines:
                sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_hostile_plan_messages_leave_the_mount_serving(
    store: Store, mnt: Path, tmp_path: Path
) -> None:
    log = tmp_path / "daemon.log"
    with mounted(store.url, mnt, f"log_file={log}") as proc:
        address = socket_address(str(mnt))
        for message in HOSTILE:
            for mode in ("restore", "warm"):
                replies = _plan(address, _line({"image": IMAGE, "mode": mode}), message)
                assert len(replies) == 1 and replies[0]["done"] is True, (message[:40], replies)
                assert isinstance(replies[0]["error"], str), replies
        assert proc.poll() is None
        for rel in SMALL:
            assert sha256_file(mnt / rel) == store.sha256[rel], rel
        warm = _plan(
            address,
            _line({"image": IMAGE, "mode": "warm"}),
            _line({"ranges": [[0, SMALL[IMAGE]]], "end": True}),
        )
        assert warm[-1] == {"fetched": SMALL[IMAGE], "total": SMALL[IMAGE], "done": True,
                            "error": None}  # fmt: skip
    text = log.read_text()
    assert text.count("read plan refused") == 2 * len(HOSTILE)
    assert "Traceback" not in text


def _hostile_catalogue(store: Store, case: str) -> bytes:
    """The store's own catalogue of web02 (whose image is there to probe), made hostile."""
    doc = json.loads(manifest.dump_catalogue(read_store_catalogue(store.root)))  # as version 2
    doc["snapshots"] = [s for s in doc["snapshots"] if s["host"] == "web02"]
    disks = doc["snapshots"][0]["disks"]
    if case == "size":
        disks.append(dict(disks[0], name="huge.img", size_bytes=1 << 63))
    elif case == "surrogate":
        disks.append(dict(disks[0], name="\ud800.img"))
    else:
        return json.dumps(doc).encode().replace(b'"disks": ', b'"x": ' + b"[" * 100_000, 1)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "size",
            "malformed store metadata: size_bytes of huge.img is out of range (0 to "
            "9223372036854775807)",
        ),
        ("surrogate", "unsafe disk name in store metadata: '\\ud800.img' (not UTF-8)"),
        ("nesting", "malformed store metadata: not valid JSON (nested too deeply)"),
    ],
)
def test_a_hostile_catalogue_is_refused_at_mount_time_and_by_ls(
    store: Store, mnt: Path, case: str, message: str
) -> None:
    bad = store.root / f"hostile-{case}"
    (bad / "web02").mkdir(parents=True)
    try:
        (bad / "web02" / "2026-11-19").symlink_to(store.root / "web02" / "2026-11-19")
        (bad / "backupfs-store.json").write_bytes(_hostile_catalogue(store, case))
        url = f"{store.url}hostile-{case}/"
        catalogue_url = f"{url}backupfs-store.json"
        expected = f"backupfs: {catalogue_url}: {message}"
        result = run_cli("mount", url, str(mnt))
        assert (result.returncode, result.stderr.splitlines()) == (EXIT_STORE, [expected])
        assert not is_mounted(mnt)
        listing = run_cli("ls", url)
        assert listing.returncode == EXIT_STORE
        assert [line for line in listing.stderr.splitlines() if "warning" not in line] == [expected]
    finally:
        if is_mounted(mnt):  # the old code mounted it
            unmount(mnt, fuse=True)
        shutil.rmtree(bad)


def test_hostile_volume_requests_are_refused_and_a_good_one_reads_right(
    store: Store, mnt: Path, tmp_path: Path
) -> None:
    log = tmp_path / "daemon.log"
    with mounted(store.url, mnt, f"log_file={log}") as proc:
        address = socket_address(str(mnt))
        for request, error in HOSTILE_VOLUMES:
            (reply,) = _plan(address, _line(request))
            assert reply["done"] is True and error in str(reply["error"]), (request, reply)
        assert proc.poll() is None
        assert list((mnt / ".backupfs" / "volumes").iterdir()) == []
        # The image's two halves swapped, in stripes of 4 KiB over two areas: read back
        # against the same bytes rearranged here.
        half = SIZE // 2 // 8192 * 8192
        request = {"volume": "vg-swapped", "runs": [[half, 0, [[IMAGE, half]]],
                   [2 * half, 4096, [[IMAGE, 0], [IMAGE, half]]]]}  # fmt: skip
        (reply,) = _plan(address, _line(request))
        assert reply["error"] is None and str(reply["path"]).startswith(".backupfs/volumes/")
        data = (store.root / IMAGE).read_bytes()
        expected = data[half : 2 * half] + b"".join(
            data[i : i + 4096] + data[half + i : half + i + 4096] for i in range(0, half, 4096)
        )
        served = (mnt / str(reply["path"])).read_bytes()
        assert hashlib.sha256(served).hexdigest() == hashlib.sha256(expected).hexdigest()
        again = _plan(address, _line(request))
        assert again[0]["path"] == reply["path"]
        assert len(list((mnt / ".backupfs" / "volumes").iterdir())) == 1
    assert "Traceback" not in log.read_text()
