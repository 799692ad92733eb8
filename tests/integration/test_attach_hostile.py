"""`backupfs attach` of images that a partition table parser trips on: a disk whose file
name ends in a digit (sfdisk names its partitions disk0p1) and a GPT that lists more
partitions than attach sets up. Served by nginx, read through a real backupfs mount."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.attachment import ServedStore, attached, served_store
from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec
from tests.support.kernel import needs_filesystems
from tests.support.mounting import run_cli
from tests.support.system import remove_tree

pytestmark = needs_filesystems("ext4")

SNAP = "web04/2026-11-20T0300Z"
MANY = 200  # partitions in many.img


def _many_partitions(path: Path) -> None:
    """A GPT with room for 256 entries, 200 of them used (8 sectors each), by sfdisk."""
    lines = ["label: gpt", "table-length: 256", "unit: sectors"]
    lines += [f"start={2048 + 8 * i}, size=8" for i in range(MANY)]
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    cmd = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", str(path)]
    subprocess.run(cmd, input="\n".join(lines) + "\n", text=True, check=True,
                   capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedStore]:
    work = tmp_path_factory.mktemp("hostile")
    try:
        snap = work / "store" / SNAP
        snap.mkdir(parents=True)
        for name in ("one", "two"):
            (work / "trees" / name).mkdir(parents=True)
            (work / "trees" / name / f"{name}.txt").write_text(f"partition {name}\n")
        specs = [PartSpec("ext4", 16, label=n, tree=work / "trees" / n) for n in ("one", "two")]
        make_disk(snap / "disk.img", "gpt", specs)
        _many_partitions(snap / "many.img")
        with served_store(work / "store", work) as store:
            yield store
    finally:
        remove_tree(work)


def _loops_on(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


@pytest.mark.parametrize("name", ["disk0", "sda1"])
def test_an_image_named_with_a_final_digit_attaches(
    served: ServedStore, tmp_path: Path, run_env: dict[str, str], name: str
) -> None:
    """The served disk.img, bind-mounted as a file named `name` (a symlink would be
    resolved away by attach): reads go through the backupfs mount under that name."""
    image = tmp_path / name
    image.write_bytes(b"")
    subprocess.run(["mount", "--bind", str(served.image(f"{SNAP}/disk.img")), str(image)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    try:
        target = tmp_path / "t"
        with attached(image, target, run_env, "--clones", "1") as att:
            assert sorted(os.listdir(target)) == ["p1", "p2"]
            for number, tree in ((1, "one"), (2, "two")):
                assert (target / f"p{number}" / f"{tree}.txt").read_text() == f"partition {tree}\n"
            assert "p1  ext4 [one]" in att.output and "p2  ext4 [two]" in att.output
            assert len(_loops_on(image)) == 2
        assert _loops_on(image) == [] and not target.exists()
    finally:
        subprocess.run(["umount", str(image)], capture_output=True, timeout=30)


def test_a_table_of_too_many_partitions_is_refused_in_one_line(
    served: ServedStore, tmp_path: Path, run_env: dict[str, str]
) -> None:
    image = served.image(f"{SNAP}/many.img")
    target = tmp_path / "t"
    result = run_cli("attach", str(image), str(target), env=run_env)
    assert result.returncode == 1, result
    assert result.stderr == (
        f"backupfs: {os.path.realpath(image)}: the partition table lists {MANY} partitions; "
        "backupfs attaches disks of at most 128\n"
    )
    assert _loops_on(image) == [] and not target.exists()
