"""A hostile catalogue (store.manifest) is refused at mount time with one line, and what it
lets through never breaks the daemon (getattr, readdir, statfs) or `backupfs ls` later.

Ends with a fuzz test: random mutations of a valid catalogue either parse, into values
the rest of backupfs takes, or raise ManifestError, within a time bound per example.
"""

import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pyfuse3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.cli.main import main
from backupfs.errors import EXIT_STORE, ManifestError, StoreError
from backupfs.mount.control import StatsSources
from backupfs.mount.fuse_ops import BackupFsOps
from backupfs.mount.tree import build_tree
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.readahead import ReadaheadConfig
from backupfs.remote import metadata
from backupfs.remote.client import ClientConfig, StoreClient
from backupfs.stats import Stats
from backupfs.store import manifest
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
HEX = "ab" * 32
CTX: Any = pyfuse3.RequestContext()


def _doc() -> dict[str, Any]:
    disk = DiskEntry("sda.img", 10_000, 1_700_000_000_123_456_789, 4096, digest_index_sha256=HEX)
    cat = Catalogue((SnapshotEntry("web1", "2026-11-20T0300Z", 1_795_143_600 * 10**9, (disk,)),))
    return json.loads(manifest.dump_catalogue(cat))


def _with(path: tuple[str | int, ...], value: object) -> bytes:
    doc = _doc()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode()


def _doc_text() -> bytes:
    return json.dumps(_doc()).encode()


DISK = ("snapshots", 0, "disks", 0)
SNAP = ("snapshots", 0)
OUT_OF_RANGE = f"out of range ({INT64_MIN} to {INT64_MAX})"
REFUSED = {
    "size 2**63": (_with((*DISK, "size_bytes"), 1 << 63), "size_bytes of sda.img is out of "
                   f"range (0 to {INT64_MAX})"),
    "size 10**100": (_with((*DISK, "size_bytes"), 10**100), "size_bytes of sda.img is out of"),
    "negative size": (_with((*DISK, "size_bytes"), -1), "size_bytes of sda.img must be an "
                      "integer >= 0"),
    "time 2**63": (_with((*SNAP, "time_ns"), 1 << 63), f"time_ns is {OUT_OF_RANGE}"),
    "time -2**63-1": (_with((*SNAP, "time_ns"), INT64_MIN - 1), f"time_ns is {OUT_OF_RANGE}"),
    "time 2**100": (_with((*SNAP, "time_ns"), 1 << 100), "time_ns is out of range"),
    "mtime 2**64": (_with((*DISK, "mtime_ns"), 1 << 64), f"mtime_ns of sda.img is {OUT_OF_RANGE}"),
    "block size 3 KiB": (_with((*DISK, "block_size"), 3 << 10), "block_size of sda.img must be"),
    "block size 2**100": (_with((*DISK, "block_size"), 1 << 100), "block_size of sda.img is out"),
    "block size 1 GiB": (_with((*DISK, "block_size"), 1 << 30), "block_size of sda.img is not a"),
    "block size 12 KiB": (_with((*DISK, "block_size"), 12 << 10), "block_size of sda.img is not"),
    "lone surrogate host": (_with((*SNAP, "host"), "web\ud800"), "unsafe host name in store "
                            "metadata: 'web\\ud800' (not UTF-8)"),
    "lone surrogate disk": (_with((*DISK, "name"), "\udcff.img"), "unsafe disk name in store "
                            "metadata: '\\udcff.img' (not UTF-8)"),
    "nesting bomb": (b'{"format": "backupfs-store", "x": ' + b"[" * 200_000 + b"]" * 200_000
                     + b"}", "not valid JSON (nested too deeply)"),
    "NaN": (_doc_text().replace(b'"time_ns": ', b'"time_ns": NaN, "t": ', 1),
            "not valid JSON (NaN is not JSON)"),
    "Infinity": (_doc_text().replace(b'"size_bytes": 10000', b'"size_bytes": Infinity'),
                 "not valid JSON (Infinity is not JSON)"),
    "5000 digits": (_doc_text().replace(b'"size_bytes": 10000', b'"size_bytes": ' + b"9" * 5000),
                    "not valid JSON (Exceeds the limit (4300 digits)"),
    "over the size cap": (_doc_text() + b" " * manifest.MAX_CATALOGUE_BYTES, "larger than 64 MiB"),
}  # fmt: skip


@pytest.mark.parametrize(("data", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_a_hostile_catalogue_is_refused_with_one_line(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        manifest.parse_catalogue(data)
    text = str(info.value)
    assert text.startswith("malformed store metadata: " if "unsafe" not in message else "unsafe")
    assert message in text and "\n" not in text


def _extreme() -> bytes:
    """The largest values the catalogue takes, and names with control characters."""
    disks = [DiskEntry(f"d{n}\x1b[31m.img", INT64_MAX, INT64_MIN, 64 << 20, digest_index_sha256=HEX)
             for n in range(9000)]  # fmt: skip
    snaps = (
        SnapshotEntry("h\n\u202eost", "new", INT64_MAX, tuple(disks)),
        SnapshotEntry("h\n\u202eost", "old", INT64_MIN, (disks[0],)),
    )
    return manifest.dump_catalogue(Catalogue(snaps))


def _ops(catalogue: Catalogue) -> BackupFsOps:
    stats = Stats()
    sources = StatsSources("http://x/", stats, BlockCache(1 << 20, stats), 1 << 20, 1 << 20, 0.0)
    anything: Any = None
    tree = build_tree(catalogue, "http://x/", 0)
    return BackupFsOps(tree, anything, anything, ReadaheadConfig(), False, sources)


async def test_what_the_catalogue_lets_through_the_daemon_serves() -> None:
    ops = _ops(manifest.parse_catalogue(_extreme()))
    for inode, node in ops.view.tree.nodes.items():
        attrs = await ops.getattr(inode, CTX)
        assert attrs.st_size == node.size_bytes
        for name in node.children:
            await ops.lookup(inode, name.encode(), CTX)
    assert (await ops.statfs(CTX)).f_blocks == (1 << 64) - 1


def _ls(monkeypatch: pytest.MonkeyPatch, data: bytes, *args: str) -> int:
    async def load(store: object, host: str | None = None) -> metadata.Listing:
        return metadata.Listing(manifest.parse_catalogue(data))

    monkeypatch.setattr(metadata, "load_listing", load)
    return main(["ls", *args, "https://store.invalid/"])


def test_ls_escapes_control_characters_and_takes_the_extreme_times(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _ls(monkeypatch, _extreme()) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1 + 9001  # the header, a line a disk: no name broke a line
    assert "\x1b" not in out and "\u202e" not in out
    assert lines[1].startswith("h\\n\\u202eost ") and " new " in lines[1]
    assert " 2262-04-11T23:47:16Z d0\\x1b[31m.img " in lines[1]
    assert " 1677-09-21T00:12:43Z " in lines[-1]
    assert _ls(monkeypatch, _extreme(), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["host"] == "h\n\u202eost" and rows[0]["disk"] == "d0\x1b[31m.img"


@pytest.mark.parametrize("case", ["time 2**100", "lone surrogate host", "nesting bomb"])
def test_ls_of_a_hostile_catalogue_is_one_line(
    case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, message = REFUSED[case]
    assert _ls(monkeypatch, data) == EXIT_STORE
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and message in out.err


async def test_a_catalogue_over_the_cap_is_refused_before_it_is_all_read() -> None:
    """The store may send gigabytes as its catalogue: the GET stops past 64 MiB, and is
    not retried (the file will not shrink)."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(512):  # 512 MiB, if it were all taken
            sent += 1 << 20
            yield b" " * (1 << 20)

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body()))
    stats = Stats()
    async with httpx.AsyncClient(transport=transport) as client:
        store = StoreClient([client], "https://store.invalid/", ClientConfig(1, 10.0, 3), stats)
        with pytest.raises(StoreError) as info:
            await metadata.load_catalogue(store)
    assert str(info.value) == (
        "cannot read https://store.invalid/backupfs-store.json: larger than 67108864 bytes"
    )
    assert stats.requests == 1 and sent <= manifest.MAX_CATALOGUE_BYTES + (2 << 20)


# --- fuzz ---

_VALID = manifest.dump_catalogue(
    Catalogue(
        (
            SnapshotEntry("web1", "2026-11-20T0300Z", 1_795_143_600 * 10**9, (
                DiskEntry("sda.img", 10_000, 1_700_000_000_123_456_789, 4096,
                          digest_index_sha256=HEX),
                DiskEntry("sdb.img", 0, 0, 1 << 20, digest_index_sha256="0" * 64),
            )),
            SnapshotEntry("db", "weekly", 5, ()),
        )
    )
)  # fmt: skip

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([1 << 63, (1 << 63) - 1, -(1 << 63), -(1 << 63) - 1, 1 << 64, 10**30, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(
        ["\ud800", "a\udcffb", "..", ".", "a/b", "x\0y", ".hidden", "é" * 200, "\x1b[2J", "ok"]
    ),  # fmt: skip
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)  # fmt: skip


def _paths(doc: object, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [here]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*here, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _paths(value, (*here, i))
    return out


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """The valid catalogue with a value replaced, a key dropped, or its bytes cut, spliced
    or flipped."""
    kind = draw(st.sampled_from(["replace", "drop", "bytes", "nest"]))
    if kind in ("replace", "drop"):
        doc = json.loads(_VALID)
        path = draw(st.sampled_from(_paths(doc)[1:]))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        if kind == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_VALUES)
        return json.dumps(doc).encode()
    data = bytearray(_VALID)
    if kind == "nest":
        at = draw(st.integers(0, len(data)))
        depth = draw(st.integers(1, 100_000))
        return bytes(data[:at] + b"[" * depth + data[at:])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        if not data:
            break
    return bytes(data)


@settings(max_examples=400, deadline=timedelta(milliseconds=500),
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(_mutated())
def test_a_mutated_catalogue_parses_into_takeable_values_or_is_refused(data: bytes) -> None:
    try:
        catalogue = manifest.parse_catalogue(data)
    except ManifestError as exc:
        assert "\n" not in str(exc)
        return
    for snap in catalogue.snapshots:
        assert INT64_MIN <= snap.time_ns <= INT64_MAX
        time.gmtime(snap.time_ns // 10**9)
        for name in (snap.host, snap.name, *(d.name for d in snap.disks)):
            assert 0 < len(name.encode()) <= 255 and "/" not in name and name[0] != "."
        for disk in snap.disks:
            assert 0 <= disk.size_bytes <= INT64_MAX and INT64_MIN <= disk.mtime_ns <= INT64_MAX
            assert disk.block_size & (disk.block_size - 1) == 0
    ops = _ops(catalogue)
    for inode in ops.view.tree.nodes:
        attrs = ops.view.attributes(inode)
        entry = pyfuse3.EntryAttributes()
        entry.st_size, entry.st_mtime_ns, entry.st_blocks = attrs.size, attrs.mtime_ns, attrs.blocks
