"""LVM read in userspace, through a real mount: a snapshot of two disks made by the real
lvm2 tools (no device-mapper: --driverloaded n, volumes never activated). disk0.img is a
GPT disk with an ext4 /boot and two physical volumes, disk1.img a physical volume with
no table; one volume group spans all three (ext4 volumes, and xfs in the striped one). A
one-segment volume is loop-mounted as VG-LV straight from its disk; a two-segment one, a
striped one and one spread over both disks are joined by the mount daemon
(MNT/.backupfs/volumes/) and mounted the same way; a swap volume is listed with its
reason; two snapshots whose groups have the same name attach side by side (the second
one's disks in qcow2, so its volumes lie on virtual disks); files are compared by
SHA-256, warmed through a read plan and restored, and nothing is left behind.
"""

import shutil
from pathlib import Path

import pytest

from tests.support.attachment import attach_env, attached, served_store
from tests.support.fsimages import PartSpec, make_fs_image, run_tool, sparse_copy
from tests.support.kernel import needs_filesystems
from tests.support.lvm_images import loop, lvm, pe_start, segments, write_volume
from tests.support.mounting import read_stats, run_cli, sha256_file
from tests.support.system import mount_points_under
from tests.support.trees import make_tree

MiB, SECTOR = 1 << 20, 512
EXTENT = MiB  # vgcreate -s 1M
P2_START, P2_MIB, P3_START, P3_MIB, DISK1_MIB = 17 * MiB, 200, 217 * MiB, 200, 24
LINUX, LVM_PV = "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "E6D6D379-F507-44C2-A23C-238F2A3DF928"
FILESYSTEMS = {"home": ("ext4", 12), "root": ("ext4", 12), "data": ("xfs", 300),
               "far": ("ext4", 16)}  # fmt: skip
pytestmark = [
    pytest.mark.skipif(shutil.which("pvcreate") is None, reason="lvm2 is not installed"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]


def _snapshot(snap: Path, work: Path, sums: dict[str, dict[str, str]]) -> None:
    disk0, disk1 = snap / "disk0.img", snap / "disk1.img"
    run_tool(["truncate", "-s", f"{P3_START // MiB + P3_MIB + 1}M", str(disk0)])
    run_tool(["truncate", "-s", f"{DISK1_MIB}M", str(disk1)])
    script = (
        f"label: gpt\nstart=2048, size={16 * MiB // SECTOR}, type={LINUX}\n"
        f"start={P2_START // SECTOR}, size={P2_MIB * MiB // SECTOR}, type={LVM_PV}\n"
        f"start={P3_START // SECTOR}, size={P3_MIB * MiB // SECTOR}, type={LVM_PV}\n"
    )
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never",
              str(disk0)], stdin=script)  # fmt: skip
    sums["p1"] = make_tree(work / "boot", seed=1, files=6, special=False)
    make_fs_image(work / "boot.ext4", PartSpec("ext4", 16, "boot", work / "boot"))
    sparse_copy(work / "boot.ext4", disk0, MiB)
    with (
        loop(disk0, P2_START, P2_MIB * MiB) as p2,
        loop(disk0, P3_START, P3_MIB * MiB) as p3,
        loop(disk1, 0, DISK1_MIB * MiB) as d1,
    ):
        for device in (p2, p3, d1):
            lvm("pvcreate", "-q", device)
        lvm("vgcreate", "-q", "-s", "1M", "vgdata", p2, p3, d1)
        new = ["lvcreate", "-q", "-an", "-Zn", "-n"]
        lvm(*new, "home", "-L", "12M", "vgdata", p2)
        lvm(*new, "root", "-L", "8M", "vgdata", p2)
        lvm(*new, "swap", "-L", "4M", "vgdata", p2)
        lvm("lvextend", "-q", "-L", "+4M", "vgdata/root", p2)  # two segments, swap between
        lvm(*new, "data", "-L", "300M", "-i", "2", "-I", "64k", "vgdata", p2, p3)
        lvm(*new, "far", "-L", "8M", "vgdata", d1)
        lvm("lvextend", "-q", "-L", "+8M", "vgdata/far", p3)  # over both disks
        layout = segments("vgdata")
        places = {p2: (disk0, P2_START + pe_start(p2)), p3: (disk0, P3_START + pe_start(p3)),
                  d1: (disk1, pe_start(d1))}  # fmt: skip
    assert [len(layout[v]) for v in ("home", "root", "data", "far")] == [1, 2, 1, 2], layout
    for seed, (name, (fstype, mib)) in enumerate(FILESYSTEMS.items(), 2):
        sums[f"vgdata-{name}"] = make_tree(work / name, seed=seed, files=10, special=False)
        make_fs_image(work / f"{name}.fs", PartSpec(fstype, mib, name, work / name))
        write_volume(work / f"{name}.fs", layout[name], EXTENT, places)
    swap = work / "swap"
    run_tool(["truncate", "-s", "4M", str(swap)])
    run_tool(["mkswap", "-q", str(swap)])
    write_volume(swap, layout["swap"], EXTENT, places)


@needs_filesystems("ext4", "xfs")
def test_volumes_of_segments_stripes_and_two_disks_attach_side_by_side(tmp_path: Path) -> None:
    store, work = tmp_path / "store", tmp_path / "work"
    old_snap, new_snap = store / "db01" / "2026-11-19T0300Z", store / "db01" / "2026-11-20T0300Z"
    old_snap.mkdir(parents=True)
    (work / "serve").mkdir(parents=True)
    sums: dict[str, dict[str, str]] = {}
    _snapshot(old_snap, work, sums)
    new_snap.mkdir()  # same group name, same ids; qcow2, so volumes lie on virtual disks
    for disk in ("disk0", "disk1"):
        run_tool(["qemu-img", "convert", "-O", "qcow2", str(old_snap / f"{disk}.img"),
                  str(new_snap / f"{disk}.qcow2")])  # fmt: skip
    expected = ["p1", "vgdata-data", "vgdata-far", "vgdata-home", "vgdata-root"]
    with served_store(store, work / "serve") as served:
        env = attach_env(work / "run")
        old = served.image("db01/2026-11-19T0300Z/disk0.img")
        new = served.image("db01/2026-11-20T0300Z/disk0.img")
        with attached(old, work / "old", env) as a, attached(new, work / "new", env) as b:
            for att in (a, b):
                assert sorted(p.name for p in att.target.iterdir()) == expected
                for shown, tree in sums.items():
                    for rel, digest in tree.items():
                        assert sha256_file(att.target / shown / rel) == digest, (shown, rel)
            status = run_cli("status", env=env)
            assert status.returncode == 0, status.stderr
            lines = status.stdout.splitlines()
            joined = [x for x in lines if "joined by the mount daemon" in x]
            assert len(joined) == 6, lines  # root, data, far of each snapshot
            assert not any("vgdata-home" in x for x in joined), lines
            assert any("vgdata-swap  swap" in x and "skipped: swap" in x for x in lines), lines
            volumes = sorted(p.name for p in (served.mnt / ".backupfs/volumes").iterdir())
            assert len(volumes) == 6 and all(v.startswith("vgdata-") for v in volumes), volumes
            before = read_stats(served.mnt)["plan_bytes"]
            warmed = run_cli("warm", str(b.target / "vgdata-far"), env=env)
            assert warmed.returncode == 0, warmed.stderr
            assert read_stats(served.mnt)["plan_bytes"] > before  # planned through the volume
            dest = work / "restored"
            done = run_cli("restore", str(b.target / "vgdata-far"), str(dest), env=env)
            assert done.returncode == 0, done.stderr
            for rel, digest in sums["vgdata-far"].items():
                assert sha256_file(dest / rel) == digest, rel
        assert mount_points_under(work / "old") == mount_points_under(work / "new") == []
    leftover = run_tool(["losetup", "-j", str(old)]) + run_tool(["losetup", "-a"])
    assert ".backupfs/volumes" not in leftover and str(store) not in leftover, leftover
