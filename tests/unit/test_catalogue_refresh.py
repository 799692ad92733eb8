"""A mount of a store reads its catalogue again, at most every catalogue_refresh= seconds,
when a directory is listed or misses a name, and adds what is new without changing what it
serves; whole catalogues (versions 1, 2) too. And `backupfs ls`'s listing of every part."""

import errno
import logging

import pytest
import trio

from backupfs.errors import ManifestError
from backupfs.mount.opening import open_store
from backupfs.mount.tree import ROOT_INODE
from backupfs.remote import metadata
from backupfs.store import manifest
from backupfs.store.manifest import Catalogue
from tests.support.httpstore import (
    BASE,
    CTX,
    FakeStore,
    catalogue_of,
    client_of,
    disk,
    errno_of,
    fake_store,
    http_of,
    images_of,
    names_in,
    ops_of,
    quiet_readdir,
    snapshot_of,
    tamper,
)


@pytest.fixture(autouse=True)
def _no_readdir_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_readdir(monkeypatch)


async def test_a_part_replaced_since_the_mount_is_found_through_the_new_top_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`backupfs index` ran again after the mount read the top level: the part no longer
    matches the top level the mount has, but does the new one."""
    cat = catalogue_of()
    fake = fake_store(cat)
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0, refresh_s=3600)
        fake.publish(Catalogue((*cat.snapshots, snapshot_of("h1", "s9", t=9))))
        fake.clear()
        ops = ops_of(tree)
        with caplog.at_level(logging.ERROR):
            await ops.lookup(tree.hosts["h1"], b"s9", CTX)
        assert not caplog.records
        part = ".backupfs/hosts/h1.json"
        assert fake.log == [(part, 200), (part, 200), ("backupfs-store.json", 200), (part, 200)]
        assert await names_in(ops, tree.hosts["h1"]) == ["s0", "s1", "s9"]


async def test_new_snapshots_and_hosts_appear_after_the_refresh_interval() -> None:
    cat = catalogue_of(hosts=2)
    fake = fake_store(cat)
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0, refresh_s=0.5)
        ops = ops_of(tree)
        h0 = tree.hosts["h0"]
        assert await names_in(ops, h0) == ["s0", "s1"]
        s0 = tree.find("h0/s0/sda.img")
        assert s0 is not None
        changed = disk(size=20_000)  # an entry that changed: still served as first seen
        newer = Catalogue(
            (
                snapshot_of("h0", "s0", changed, disk("sdb.img")),
                *cat.snapshots[1:],
                snapshot_of("h0", "s2", t=7),
                snapshot_of("h9", "x", t=8),
            )
        )
        fake.files.update(images_of(newer))
        fake.publish(newer)
        fake.clear()
        assert await names_in(ops, ROOT_INODE) == ["h0", "h1"]  # within the interval: not read
        assert fake.log == []
        await trio.sleep(0.5)
        assert await names_in(ops, ROOT_INODE) == ["h0", "h1", "h9"]
        assert fake.paths() == ["backupfs-store.json"]
        assert await names_in(ops, h0) == ["s0", "s1", "s2"]
        assert await names_in(ops, tree.hosts["h9"]) == ["x"]
        assert tree.find("h0/s0/sdb.img") is not None  # a new disk of a snapshot: added
        same = tree.find("h0/s0/sda.img")
        assert same is s0 and same.image is not None and same.image.size_bytes == 10_000
        # Unchanged since: a 304, nothing fetched.
        await trio.sleep(0.5)
        fake.clear()
        assert await names_in(ops, ROOT_INODE) == ["h0", "h1", "h9"]
        assert fake.log == [("backupfs-store.json", 304)]


async def test_a_lookup_of_a_name_not_there_reads_the_catalogue_again() -> None:
    cat = catalogue_of(hosts=1)
    fake = fake_store(cat)
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0, refresh_s=0.0)
        ops = ops_of(tree)
        fake.publish(Catalogue((*cat.snapshots, snapshot_of("h0", "s5"), snapshot_of("new", "a"))))
        new = await ops.lookup(ROOT_INODE, b"new", CTX)
        assert (await ops.lookup(new.st_ino, b"a", CTX)).st_ino
        assert (await ops.lookup(tree.hosts["h0"], b"s5", CTX)).st_ino
        fake.clear()
        assert await errno_of(ops.lookup(tree.hosts["h0"], b"nothing", CTX)) == errno.ENOENT
        assert fake.log == [("backupfs-store.json", 304)]


async def test_a_whole_catalogue_is_mounted_whole_and_refreshed_the_same_way() -> None:
    cat = catalogue_of(hosts=2)
    fake = FakeStore(images_of(cat) | {manifest.CATALOGUE_NAME: manifest.dump_catalogue(cat)})
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0, refresh_s=0.0)
        assert fake.paths() == ["backupfs-store.json", "h0/s0/sda.img"]
        assert tree.find("h1/s1/sda.img") is not None
        newer = Catalogue((*cat.snapshots, snapshot_of("h1", "s2")))
        fake.files[manifest.CATALOGUE_NAME] = manifest.dump_catalogue(newer)
        ops = ops_of(tree)
        fake.clear()
        assert await names_in(ops, tree.hosts["h1"]) == ["s0", "s1", "s2"]
        assert fake.paths() == ["backupfs-store.json"]
        # Then indexed again by this version: the split catalogue takes over.
        newest = Catalogue((*newer.snapshots, snapshot_of("h1", "s3")))
        fake.publish(newest)
        fake.clear()
        assert await names_in(ops, tree.hosts["h1"]) == ["s0", "s1", "s2", "s3"]
        assert fake.paths() == ["backupfs-store.json", ".backupfs/hosts/h1.json"]


async def test_a_failed_refresh_keeps_what_the_mount_has(caplog: pytest.LogCaptureFixture) -> None:
    fake = fake_store(catalogue_of(hosts=2))
    async with http_of(fake) as http:
        tree = await open_store(client_of(fake, http), 0, refresh_s=0.0)
        ops = ops_of(tree)
        del fake.files[manifest.CATALOGUE_NAME]
        with caplog.at_level(logging.WARNING):
            assert await names_in(ops, ROOT_INODE) == ["h0", "h1"]
        assert "catalogue refresh: cannot read" in caplog.text


async def test_the_listing_reads_every_part_and_names_the_refused_ones() -> None:
    cat = catalogue_of(hosts=5)
    fake = fake_store(cat)
    tamper(fake, "h3", b"[]", fix_top=False)
    async with http_of(fake) as http:
        listing = await metadata.load_listing(client_of(fake, http))
        assert {s.host for s in listing.catalogue.snapshots} == {"h0", "h1", "h2", "h4"}
        assert len(listing.errors) == 1 and listing.errors[0].startswith(
            f"{BASE}.backupfs/hosts/h3.json: the catalogue of host h3 is 2 bytes"
        )
        fake.clear()
        one = await metadata.load_listing(client_of(fake, http), "h2")
        assert one.catalogue == Catalogue(cat.snapshots[4:6]) and not one.errors
        assert fake.paths() == ["backupfs-store.json", ".backupfs/hosts/h2.json"]
        with pytest.raises(ManifestError, match="host h3"):
            await metadata.load_catalogue(client_of(fake, http))
