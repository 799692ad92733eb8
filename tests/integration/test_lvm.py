"""LVM read in userspace: a GPT disk with an ext4 partition and an LVM physical volume made
by the real lvm2 tools (no device-mapper: --driverloaded n, volumes never activated),
attached through a real mount. A one-segment volume is mounted as VG-LV, a two-segment
one and a swap volume are listed with their reasons, and two snapshots whose volume groups
have the same name attach side by side."""

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.attachment import attach_env, attached, served_store
from tests.support.fsimages import PartSpec, make_fs_image, run_tool, sparse_copy
from tests.support.kernel import needs_filesystems
from tests.support.mounting import run_cli, sha256_file
from tests.support.system import mount_points_under
from tests.support.trees import make_tree

MiB, SECTOR = 1 << 20, 512
PV_START, PV_MIB = 17 * MiB, 78
LINUX, LVM_PV = "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "E6D6D379-F507-44C2-A23C-238F2A3DF928"
# No device-mapper here, and nothing of the host's LVM state touched: no backups, no archive.
LVM = ["--driverloaded", "n", "--config", "backup { backup = 0 archive = 0 }"]
pytestmark = pytest.mark.skipif(shutil.which("pvcreate") is None, reason="lvm2 is not installed")


@contextlib.contextmanager
def _loop(path: Path, offset: int, size: int) -> Iterator[str]:
    device = run_tool(["losetup", "-f", "--show", "--offset", str(offset), "--sizelimit",
                       str(size), str(path)]).strip()  # fmt: skip
    try:
        yield device
    finally:
        run_tool(["losetup", "-d", device])


def _lvm(*args: str) -> str:
    return run_tool([args[0], *LVM, *args[1:]])


def _layout(device: str) -> tuple[int, dict[str, list[tuple[int, int]]]]:
    """pe_start in bytes, and each volume's (first extent, last extent) ranges."""
    pe_start = int(_lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start",
                        device).strip())  # fmt: skip
    out = _lvm("lvs", "--noheadings", "-o", "lv_name,seg_pe_ranges", "vgdata")
    ranges: dict[str, list[tuple[int, int]]] = {}
    for line in out.splitlines():
        name, where = line.split()
        lo, hi = re.fullmatch(r".*:(\d+)-(\d+)", where).groups()  # type: ignore[union-attr]
        ranges.setdefault(name, []).append((int(lo), int(hi)))
    return pe_start, ranges


def _disk(path: Path, work: Path, sums: dict[str, dict[str, str]]) -> None:
    run_tool(["truncate", "-s", f"{PV_START // MiB + PV_MIB + 1}M", str(path)])
    pv = f"start={PV_START // SECTOR}, size={PV_MIB * MiB // SECTOR}, type={LVM_PV}"
    script = f"label: gpt\nstart=2048, size={16 * MiB // SECTOR}, type={LINUX}\n{pv}\n"
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never",
              str(path)], stdin=script)  # fmt: skip
    boot, home = work / "boot.ext4", work / "home.ext4"
    sums["p1"] = make_tree(work / "boot", seed=1, files=6, special=False)
    sums["vgdata-home"] = make_tree(work / "home", seed=2, files=12, special=False)
    make_fs_image(boot, PartSpec("ext4", 16, "boot", work / "boot"))
    make_fs_image(home, PartSpec("ext4", 16, "home", work / "home"))
    sparse_copy(boot, path, MiB)
    with _loop(path, PV_START, PV_MIB * MiB) as device:
        _lvm("pvcreate", "-q", device)
        _lvm("vgcreate", "-q", "vgdata", device)
        for name, size in (("root", "8M"), ("home", "16M"), ("swap", "4M")):
            _lvm("lvcreate", "-q", "-an", "-Zn", "-n", name, "-L", size, "vgdata")
        _lvm("lvextend", "-q", "-L", "+4M", "vgdata/root")  # now two segments (inactive)
        pe_start, ranges = _layout(device)  # the host keeps nothing once the loop is gone
    extent = 4 * MiB
    ((lo, _),) = ranges["home"]
    sparse_copy(home, path, PV_START + pe_start + lo * extent)
    swap = work / "swap"
    run_tool(["truncate", "-s", "4M", str(swap)])
    run_tool(["mkswap", "-q", str(swap)])
    ((lo, _),) = ranges["swap"]
    sparse_copy(swap, path, PV_START + pe_start + lo * extent)


@needs_filesystems("ext4")
def test_logical_volumes_attach_by_name_and_same_named_groups_side_by_side(
    tmp_path: Path,
) -> None:
    store, work = tmp_path / "store", tmp_path / "work"
    (work / "serve").mkdir(parents=True)
    sums: dict[str, dict[str, str]] = {}
    first = store / "db01" / "2026-11-19T0300Z" / "disk0.img"
    first.parent.mkdir(parents=True)
    _disk(first, work, sums)
    second = store / "db01" / "2026-11-20T0300Z" / "disk0.img"
    second.parent.mkdir(parents=True)
    run_tool(["cp", "--sparse=always", str(first), str(second)])  # same VG name, same ids
    with served_store(store, work / "serve") as served:
        env = attach_env(work / "run")
        old = served.image("db01/2026-11-19T0300Z/disk0.img")
        new = served.image("db01/2026-11-20T0300Z/disk0.img")
        with attached(old, work / "old", env) as a, attached(new, work / "new", env) as b:
            for att in (a, b):
                assert sorted(p.name for p in att.target.iterdir()) == ["p1", "vgdata-home"]
                for shown, tree in sums.items():
                    for rel, digest in tree.items():
                        assert sha256_file(att.target / shown / rel) == digest, (shown, rel)
            status = run_cli("status", env=env)
            assert status.returncode == 0, status.stderr
            lines = status.stdout.splitlines()
            assert any("vgdata-root" in x and "2 segments" in x for x in lines), lines
            assert any("vgdata-swap  swap" in x and "skipped: swap" in x for x in lines), lines
            assert any("p2  LVM2_member" in x and "listed as VG-LV" in x for x in lines), lines
        assert mount_points_under(work / "old") == mount_points_under(work / "new") == []
