"""A fleet's store in format 3 (2,000 hosts × 60 snapshots), mounted for real through nginx
behind a proxy that logs every request: mounting reads the top level of the catalogue and
probes one image, nothing else; listing a host reads that host's part, nothing else; a new
snapshot shows up after catalogue_refresh= without a remount; a host whose part was
tampered with answers EIO with one log line while the others are served."""

import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.store import manifest
from tests.integration.conftest import Store
from tests.support.fleet import fleet_catalogue, host_name, probe_path, snapshot_name, write_fleet
from tests.support.mounting import mounted, run_cli
from tests.support.proxy import FaultProxy

HOSTS, SNAPSHOTS = 2000, 60
PREFIX = "fleet"


@pytest.fixture(scope="module")
def fleet(store: Store) -> Iterator[Path]:
    """The fleet's store, in a directory the session's nginx serves."""
    root = store.root / PREFIX
    root.mkdir()
    try:
        write_fleet(root, fleet_catalogue(HOSTS, SNAPSHOTS))
        yield root
    finally:
        shutil.rmtree(root)


def _requests(proxy: FaultProxy) -> list[tuple[str, str | None]]:
    got = list(proxy.log)
    proxy.log.clear()
    return got


def _part(host: str) -> str:
    return f"/{PREFIX}/{manifest.host_catalogue_path(host)}"


TOP = f"/{PREFIX}/{manifest.CATALOGUE_NAME}"
SNAPSHOT_NAMES = sorted(snapshot_name(s) for s in range(SNAPSHOTS))


def test_mounting_reads_the_top_level_only_and_a_listing_one_part(
    fleet: Path, fault_proxy: FaultProxy, mnt: Path
) -> None:
    url = f"{fault_proxy.url}{PREFIX}/"
    with mounted(url, mnt):
        probe = f"/{PREFIX}/{probe_path(fleet_catalogue(1, 1))}"  # the fleet's first image
        assert _requests(fault_proxy) == [(TOP, None), (probe, "bytes=0-0")]
        assert sorted(os.listdir(mnt / "host0042")) == SNAPSHOT_NAMES
        assert _requests(fault_proxy) == [(_part("host0042"), None)]
        hosts = os.listdir(mnt)
        assert len(hosts) == HOSTS and "host1999" in hosts
        st = (mnt / "host1234").stat()  # from the top level: no part read
        assert st.st_nlink == 2 + SNAPSHOTS
        snap = mnt / "host0042" / snapshot_name(7)
        assert os.listdir(snap) == ["disk0.img"] and (snap / "disk0.img").stat().st_size == 4096
        assert _requests(fault_proxy) == []
        # `backupfs ls URL HOST` reads that host's part alone, too.
        listed = run_cli("ls", url, "host0007", "--json")
        assert listed.returncode == 0, listed.stderr
        assert _requests(fault_proxy) == [(TOP, None), (_part("host0007"), None)]
        assert listed.stdout.count('"host": "host0007"') == SNAPSHOTS


def test_a_new_snapshot_appears_after_the_refresh_interval(
    fleet: Path, fault_proxy: FaultProxy, mnt: Path
) -> None:
    url = f"{fault_proxy.url}{PREFIX}/"
    host, new_host = host_name(42), host_name(HOSTS)
    try:
        with mounted(url, mnt, "catalogue_refresh=0.5"):
            assert sorted(os.listdir(mnt / host)) == SNAPSHOT_NAMES
            write_fleet(fleet, fleet_catalogue(HOSTS, SNAPSHOTS, {host: 61, new_host: 1}))
            time.sleep(0.6)
            _requests(fault_proxy)
            assert sorted(os.listdir(mnt / host)) == sorted([*SNAPSHOT_NAMES, snapshot_name(60)])
            assert _requests(fault_proxy) == [(TOP, None), (_part(host), None)]
            assert os.listdir(mnt / new_host) == [snapshot_name(0)]
            assert new_host in os.listdir(mnt)
            # Nothing changed since: the top level is asked for again, and not sent (304).
            time.sleep(0.6)
            _requests(fault_proxy)
            assert len(os.listdir(mnt)) == HOSTS + 1
            assert _requests(fault_proxy) == [(TOP, None)]
    finally:
        write_fleet(fleet, fleet_catalogue(HOSTS, SNAPSHOTS))


def test_a_tampered_host_part_is_eio_with_one_line_and_the_others_are_served(
    fleet: Path, store: Store, mnt: Path, tmp_path: Path
) -> None:
    part = fleet / manifest.host_catalogue_path(host_name(7))
    good = part.read_bytes()
    log = tmp_path / "daemon.log"
    try:
        part.write_bytes(good.replace(b'"disk0.img"', b'"disk1.img"', 1))  # same size
        with mounted(f"{store.url}{PREFIX}/", mnt, f"log_file={log}"):
            with pytest.raises(OSError) as info:
                os.listdir(mnt / host_name(7))
            assert info.value.errno == errno.EIO
            with pytest.raises(OSError) as info:
                (mnt / host_name(7) / snapshot_name(0)).stat()
            assert info.value.errno == errno.EIO
            assert sorted(os.listdir(mnt / host_name(8))) == SNAPSHOT_NAMES
            assert host_name(7) in os.listdir(mnt)
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors
        assert errors[0].endswith(
            f"{store.url}{PREFIX}/.backupfs/hosts/host0007.json: the catalogue of host host0007 "
            "does not match the store catalogue (SHA-256)"
        )
    finally:
        part.write_bytes(good)
