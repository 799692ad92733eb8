"""Store format 3 (a catalogue split by host): its files, and a mount that reads a host's part
on first use, refuses a hostile part with one line (the other hosts still served), and adds
new snapshots when the catalogue changes. The store is served by an in-process HTTP fake
(httpx.MockTransport) that counts requests and honours If-None-Match and Range."""

import errno
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from backupfs.errors import ManifestError, UsageError
from backupfs.mount.opening import open_store
from backupfs.mount.tree import ROOT_INODE
from backupfs.remote import metadata
from backupfs.stats import Stats
from backupfs.store import manifest
from backupfs.store.image import VirtualDisk
from backupfs.store.manifest import Catalogue, HostIndex
from tests.support.httpstore import (
    BASE,
    CTX,
    T0,
    FakeStore,
    catalogue_of,
    client_of,
    disk,
    errno_of,
    fake_store,
    http_of,
    names_in,
    ops_of,
    quiet_readdir,
    snapshot_of,
    tamper,
)


@pytest.fixture(autouse=True)
def _no_readdir_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_readdir(monkeypatch)


# --- the files ---


def test_catalogue_files_round_trip() -> None:
    cat = Catalogue(
        (
            snapshot_of("web1", "a", disk(), disk("sdb.img", block_size=1 << 20)),
            snapshot_of("db", "weekly", t=9),
            snapshot_of("web1", "b", t=5),
        )
    )
    files = manifest.catalogue_files(cat)
    assert [p for p, _ in files] == [
        ".backupfs/hosts/web1.json",
        ".backupfs/hosts/db.json",
        "backupfs-store.json",
    ]
    top = manifest.parse_store_catalogue(files[-1][1])
    assert isinstance(top, HostIndex) and top.refused == ()
    assert top.probe == manifest.ProbeEntry("web1/a/sda.img", 10_000)
    web1, db = top.hosts
    assert (web1.name, web1.snapshots, web1.time_ns, web1.block_sizes) == (
        "web1", 2, T0 + 5, (4096, 1 << 20),
    )  # fmt: skip
    assert (db.catalogue_size, db.catalogue_sha256) == (
        len(files[1][1]), hashlib.sha256(files[1][1]).hexdigest(),
    )  # fmt: skip
    parts = [manifest.parse_host_catalogue(files[i][1], h) for i, h in enumerate(top.hosts)]
    assert parts[0] + parts[1] == (cat.snapshots[0], cat.snapshots[2], cat.snapshots[1])
    doc = json.loads(files[0][1])
    assert (doc["format"], doc["version"], doc["host"]) == ("backupfs-store", 3, "web1")
    assert doc["snapshots"][0] == json.loads(manifest.dump_catalogue(cat))["snapshots"][0]
    empty = manifest.catalogue_files(Catalogue(()))
    assert empty == [(manifest.CATALOGUE_NAME, empty[0][1])]
    assert manifest.parse_store_catalogue(empty[0][1]) == HostIndex(())


def test_a_whole_catalogue_reader_refuses_a_split_one() -> None:
    top = manifest.catalogue_files(catalogue_of())[-1][1]
    with pytest.raises(ManifestError, match="a version 3 catalogue lists hosts, not snapshots"):
        manifest.parse_catalogue(top)


def _top_doc(cat: Catalogue) -> dict[str, Any]:
    return json.loads(manifest.catalogue_files(cat)[-1][1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.update(name=".."), "unsafe host name in store metadata: '..'"),
        (lambda h: h.update(catalogue_sha256="x"), "catalogue_sha256 of host h0 is not SHA-256"),
        (lambda h: h.update(catalogue_size=-1), "catalogue_size of host h0 must be an integer"),
        (lambda h: h.update(catalogue_size=1 << 40), "catalogue_size of host h0 is out of range"),
        (lambda h: h.update(block_sizes=[4096, 4096]), "are not distinct powers of two"),
        (lambda h: h.update(block_sizes=[3 << 10]), "block_sizes of host h0 must be an integer"),
        (lambda h: h.pop("time_ns"), "time_ns of host h0 must be an integer"),
    ],
)
def test_a_malformed_top_level_is_refused_whole(change: Any, message: str) -> None:
    doc = _top_doc(catalogue_of())
    change(doc["hosts"][0])
    with pytest.raises(ManifestError) as info:
        manifest.parse_store_catalogue(json.dumps(doc).encode())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_host_listed_twice_is_refused_and_the_others_kept() -> None:
    doc = _top_doc(catalogue_of())
    doc["hosts"].append(dict(doc["hosts"][1]))
    top = manifest.parse_store_catalogue(json.dumps(doc).encode())
    assert isinstance(top, HostIndex)
    assert [h.name for h in top.hosts] == ["h0", "h2"]
    assert top.refused == (("h1", "malformed store metadata: host h1 is listed more than once"),)


# --- the mount ---


async def test_mounting_fetches_the_top_level_and_a_probe_and_a_lookup_one_part() -> None:
    cat = catalogue_of(hosts=50)
    fake = fake_store(cat)
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0)
        assert fake.log == [("backupfs-store.json", 200), ("h0/s0/sda.img", 206)]
        assert sorted(tree.hosts) == sorted(f"h{n}" for n in range(50))
        ops = ops_of(tree)
        host = tree.hosts["h42"]
        attrs = ops.view.attributes(host)
        assert (attrs.nlink, attrs.mtime_ns) == (2 + 2, T0 + 1)  # from the top level alone
        fake.clear()
        snap = await ops.lookup(host, b"s1", CTX)
        assert fake.log == [(".backupfs/hosts/h42.json", 200)]
        assert await names_in(ops, host) == ["s0", "s1"]
        assert await names_in(ops, snap.st_ino) == ["sda.img"]
        assert ops.view.attributes(host).nlink == 4
        assert fake.log == [(".backupfs/hosts/h42.json", 200)]  # nothing more
        node = tree.find("h42/s1/sda.img")
        assert node is not None and node.image is not None
        assert node.image.size_bytes == 10_000 and tree.path_of(node.inode) == "h42/s1/sda.img"


async def test_concurrent_lookups_of_a_host_wait_for_one_fetch() -> None:
    fake = fake_store(catalogue_of())
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0)
        ops = ops_of(tree)
        fake.clear()
        found: list[int] = []

        async def look(name: bytes) -> None:
            found.append((await ops.lookup(tree.hosts["h1"], name, CTX)).st_ino)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(look, b"s0")
                nursery.start_soon(look, b"s1")
        assert fake.log == [(".backupfs/hosts/h1.json", 200)]
        assert len(set(found)) == 2


async def test_a_given_catalogue_is_built_whole_without_fetching_one() -> None:
    fake = fake_store(catalogue_of())
    async with http_of(fake) as http:
        cat = catalogue_of(hosts=2)
        tree = await open_store(client_of(fake, http), 0, catalogue=cat)
        assert tree.loader is None and fake.paths() == ["h0/s0/sda.img"]  # the probe
        assert tree.find("h1/s1/sda.img") is not None


async def test_a_block_size_the_store_cannot_take_is_refused_at_mount() -> None:
    fake = fake_store(catalogue_of())
    async with http_of(fake) as http:
        with pytest.raises(UsageError, match=r"block_size=6144 .* \(4096\) for host h0"):
            await open_store(client_of(fake, http), 6144)
        assert fake.paths() == ["backupfs-store.json"]


def _part(fake: FakeStore, host: str) -> bytes:
    return fake.files[manifest.host_catalogue_path(host)]


def _other_hosts_part(fake: FakeStore, host: str) -> bytes:
    return _part(fake, "h2")


def _snapshot_of_another_host(fake: FakeStore, host: str) -> bytes:
    doc = json.loads(_part(fake, host))
    doc["snapshots"][1]["host"] = "h2"
    return json.dumps(doc).encode()


def _one_snapshot_less(fake: FakeStore, host: str) -> bytes:
    doc = json.loads(_part(fake, host))
    del doc["snapshots"][1]
    return json.dumps(doc).encode()


def _flipped(fake: FakeStore, host: str) -> bytes:
    data = bytearray(_part(fake, host))
    data[len(data) // 2] ^= 1
    return bytes(data)


URL = f"{BASE}.backupfs/hosts/h1.json: "
HOSTILE = {
    "wrong sha": (_flipped, False, 2, "the catalogue of host h1 does not match the store "
                  "catalogue (SHA-256)"),
    "wrong size": (lambda f, h: _part(f, h)[:-1], False, 2, "the catalogue of host h1 is "),
    "malformed JSON": (lambda f, h: b"{not json", True, 1, "malformed store metadata: not "
                       "valid JSON"),
    "another host's part": (_other_hosts_part, True, 1, "malformed store metadata: the "
                            "catalogue of host h1 is not a version 3 host part of that host"),
    "a snapshot of another host": (_snapshot_of_another_host, True, 1, "malformed store "
                                   "metadata: the catalogue of host "
                                   "h1 lists a snapshot of another host ('h2')"),
    "a snapshot less": (_one_snapshot_less, True, 1, "malformed store metadata: the catalogue "
                        "of host h1 lists 1 "
                        "snapshots, the store catalogue 2"),
    "nesting bomb": (lambda f, h: b"[" * 200_000, True, 1, "malformed store metadata: not valid "
                     "JSON (nested too deeply)"),
}  # fmt: skip


@pytest.mark.parametrize(("make", "fix_top", "fetches", "message"), HOSTILE.values(),
                         ids=HOSTILE.keys())  # fmt: skip
async def test_a_hostile_host_part_is_refused_with_one_line_and_the_rest_served(
    make: Callable[[FakeStore, str], bytes],
    fix_top: bool,
    fetches: int,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = fake_store(catalogue_of())
    tamper(fake, "h1", make(fake, "h1"), fix_top)
    async with http_of(fake) as http:
        stats = Stats()
        tree = await open_store(client_of(fake, http, stats), 0)
        ops = ops_of(tree)
        fake.clear()
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert await errno_of(ops.lookup(tree.hosts["h1"], b"s0", CTX)) == errno.EIO
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith(URL + message) and "\n" not in errors[0]
        # Fetched again once when it does not match (as a transfer error); then the top level
        # read again, in case the store was indexed since (here it was not: 304).
        part = ".backupfs/hosts/h1.json"
        assert fake.log == [(part, 200)] * fetches + [("backupfs-store.json", 304)]
        assert stats.verify_failures == (2 if fetches == 2 else 0)
        # Refused until the store lists another part for it: no fetch, no more log lines.
        fake.clear()
        caplog.clear()
        assert await errno_of(ops.readdir(tree.hosts["h1"], 0, None)) == errno.EIO  # type: ignore[arg-type]
        assert await errno_of(ops.lookup(tree.hosts["h1"], b"s1", CTX)) == errno.EIO
        assert fake.log == [] and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        # The root still lists it (its directory answers EIO), and the other hosts are served.
        assert (await ops.getattr(tree.hosts["h1"], CTX)).st_nlink == 4
        assert await names_in(ops, ROOT_INODE) == ["h0", "h1", "h2"]
        assert await names_in(ops, tree.hosts["h2"]) == ["s0", "s1"]
        assert await names_in(ops, tree.hosts["h0"]) == ["s0", "s1"]


async def test_an_oversized_part_is_cut_at_its_size_and_refused() -> None:
    fake = fake_store(catalogue_of())
    part = manifest.host_catalogue_path("h1")
    sent = 0

    async def huge() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(256):  # 256 MiB, were it all read
            sent += 1 << 20
            yield b" " * (1 << 20)

    fake.streamed[part] = huge
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0)
        ops = ops_of(tree)
        assert await errno_of(ops.lookup(tree.hosts["h1"], b"s0", CTX)) == errno.EIO
        assert await names_in(ops, tree.hosts["h0"]) == ["s0", "s1"]
        with pytest.raises(ManifestError) as info:
            await metadata.load_host(client_of(fake, http), _host_entry(fake, "h1"))
    assert str(info.value) == (
        f"{BASE}{part}: the catalogue of host h1 is larger than the "
        f"{_host_entry(fake, 'h1').catalogue_size} bytes the store catalogue says"
    )
    assert sent <= 8 * (1 << 20)  # two attempts of each a few chunks, not 256 MiB


def _host_entry(fake: FakeStore, host: str) -> manifest.HostEntry:
    top = manifest.parse_store_catalogue(fake.files[manifest.CATALOGUE_NAME])
    assert isinstance(top, HostIndex)
    return next(h for h in top.hosts if h.name == host)


async def test_a_host_listed_twice_answers_eio_and_the_others_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = fake_store(catalogue_of())
    doc = json.loads(fake.files[manifest.CATALOGUE_NAME])
    doc["hosts"].append(dict(doc["hosts"][1]))
    fake.files[manifest.CATALOGUE_NAME] = json.dumps(doc).encode()
    async with http_of(fake) as http:
        with caplog.at_level(logging.ERROR):
            tree = await open_store(client_of(fake, http), 0)
        assert [r.getMessage() for r in caplog.records] == [
            f"{BASE}: malformed store metadata: host h1 is listed more than once"
        ]
        ops = ops_of(tree)
        assert await errno_of(ops.lookup(tree.hosts["h1"], b"s0", CTX)) == errno.EIO
        assert await names_in(ops, tree.hosts["h2"]) == ["s0", "s1"]
        assert await names_in(ops, ROOT_INODE) == ["h0", "h1", "h2"]


async def test_a_chain_into_another_host_loads_that_hosts_part_too() -> None:
    base = disk("base.qcow2", format="qcow2", virtual_size=1 << 20)
    top = disk("disk.qcow2", format="qcow2", virtual_size=1 << 20, parent="gold/v1/base.qcow2")
    cat = Catalogue(
        (snapshot_of("gold", "v1", base), snapshot_of("web", "s1", top), snapshot_of("other", "x"))
    )
    fake = fake_store(cat)
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0)
        fake.clear()
        ops = ops_of(tree)
        assert await names_in(ops, tree.hosts["web"]) == ["s1"]
        assert fake.paths() == [".backupfs/hosts/web.json", ".backupfs/hosts/gold.json"]
        node = tree.find("web/s1/disk.img")
        assert node is not None and isinstance(node.image, VirtualDisk)
        assert [link.images[0].url for link in node.image.links] == [
            f"{BASE}web/s1/disk.qcow2",
            f"{BASE}gold/v1/base.qcow2",
        ]
        # gold's part is not fetched again when gold is listed; its base is the same Image.
        fake.clear()
        assert await names_in(ops, tree.hosts["gold"]) == ["v1"]
        assert fake.log == []
        gold = tree.find("gold/v1/base.img")
        assert gold is not None and isinstance(gold.image, VirtualDisk)
        assert gold.image.links[0].images[0] is node.image.links[1].images[0]


async def test_a_chain_into_a_refused_host_leaves_the_disk_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = disk("base.qcow2", format="qcow2", virtual_size=1 << 20)
    top = disk("disk.qcow2", format="qcow2", virtual_size=1 << 20, parent="gold/v1/base.qcow2")
    cat = Catalogue(
        (snapshot_of("gold", "v1", base), snapshot_of("web", "s1", top, disk("raw.img")))
    )
    fake = fake_store(cat)
    tamper(fake, "gold", b"{}", fix_top=True)
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0)
        ops = ops_of(tree)
        with caplog.at_level(logging.ERROR):
            assert await names_in(ops, tree.hosts["web"]) == ["s1"]
        snap = tree.find("web/s1")
        assert snap is not None and sorted(snap.children) == ["raw.img"]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2 and "gold" in lines[0]
        assert lines[1] == "web/s1/disk.qcow2: its chain is broken at gold/v1/base.qcow2"
