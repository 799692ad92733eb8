"""An MBR disk with a primary partition and three logical ones in an extended partition
(the EBR chain sfdisk reads): each attaches through a real mount as pN with its number
(p1, p5, p6, p7), the extended container itself is not a partition, and every file is its
source's bytes."""

from pathlib import Path

from tests.support.attachment import attach_env, attached, served_store
from tests.support.fsimages import PartSpec, make_fs_image, run_tool, sparse_copy
from tests.support.kernel import needs_filesystems
from tests.support.mounting import sha256_file
from tests.support.system import mount_points_under
from tests.support.trees import make_tree

MiB, SECTOR = 1 << 20, 512
# (number, start MiB, size MiB): 1 primary, 2 the extended container, 5-7 logical ones
PRIMARY, LOGICAL = (1, 1, 16), [(5, 19, 12), (6, 33, 12), (7, 47, 12)]
EXTENDED = (2, 18, 42)


@needs_filesystems("ext4")
def test_logical_partitions_attach_by_number(tmp_path: Path) -> None:
    store, work = tmp_path / "store", tmp_path / "work"
    disk = store / "h" / "2026-11-20" / "disk0.img"
    disk.parent.mkdir(parents=True)
    work.mkdir()
    script = ["label: dos", "unit: sectors"]
    for number, start, size in [PRIMARY, EXTENDED]:
        kind = "5" if number == EXTENDED[0] else "83"
        script.append(f"start={start * MiB // SECTOR}, size={size * MiB // SECTOR}, type={kind}")
    for _, start, size in LOGICAL:
        script.append(f"start={start * MiB // SECTOR}, size={size * MiB // SECTOR}, type=83")
    run_tool(["truncate", "-s", "64M", str(disk)])
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never",
              str(disk)], stdin="\n".join(script) + "\n")  # fmt: skip
    trees = {}
    for number, start, size in [PRIMARY, *LOGICAL]:
        root = work / f"tree{number}"
        trees[number] = make_tree(root, seed=number, files=8, special=False)
        fs = work / f"p{number}.ext4"
        make_fs_image(fs, PartSpec("ext4", size, label=f"part{number}", tree=root))
        sparse_copy(fs, disk, start * MiB)
    (work / "serve").mkdir()
    with served_store(store, work / "serve") as served:
        env = attach_env(work / "run")
        image = served.image("h/2026-11-20/disk0.img")
        with attached(image, work / "target", env) as att:
            mounted = sorted(p.name for p in att.target.iterdir())
            assert mounted == ["p1", "p5", "p6", "p7"], (mounted, att.output)
            for number, sums in trees.items():
                for rel, digest in sums.items():
                    assert sha256_file(att.target / f"p{number}" / rel) == digest, (number, rel)
        assert mount_points_under(work / "target") == []
