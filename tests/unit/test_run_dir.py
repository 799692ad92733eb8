"""The attach run directory and its journal (backupfs.attach.state) are trusted only once
checked: owned by root or the running user, private, and naming only their own paths.

No loop device or mount is made: records are written by hand, as a tampering user would.
"""

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from backupfs.attach import lifecycle
from backupfs.attach import state as attach_state
from backupfs.attach.state import Attachment, LoopRecord, MountRecord, PartitionRecord
from backupfs.errors import UserError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to another user")
OTHER_UID = 65534


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(attach_state.RUN_DIR_ENV, str(tmp_path / "run"))
    return tmp_path / "run"


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _attachment(target: Path) -> Attachment:
    """Partition 1 on two clones, as attach records it (the loop devices are not set up)."""
    att = Attachment(str(target), "/srv/disk.img", 2, created_target=True, complete=True)
    att.partitions.append(PartitionRecord(1, 1 << 20, 8 << 20, "ext4", None, None))
    paths = [target / "p1", att.private_dir / "c1" / "p1"]
    devices = ["/dev/loop250", "/dev/loop251"]  # not set up: detach finds nothing to free
    for clone, (device, path) in enumerate(zip(devices, paths, strict=True)):
        att.loops.append(LoopRecord(device, 1, clone, 1 << 20))
        att.mounts.append(MountRecord(str(path), device, 1, clone, "ext4", "ro"))
    return att


def _write_record(target: Path, doc: dict[str, object]) -> Path:
    """A record as someone with write access to the journal would plant it."""
    path = attach_state.state_path(str(target))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _refusal(call: object) -> str:
    assert callable(call)
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_run_dir_and_records_are_private_whatever_the_umask(
    run: Path, tmp_path: Path, open_umask: None
) -> None:
    att = _attachment(tmp_path / "t")
    attach_state.save(att)
    assert _mode(run) == _mode(run / "attach") == 0o700
    assert _mode(attach_state.state_path(att.target)) == 0o600
    assert attach_state.load(att.target) == att


def test_a_run_dir_readable_by_others_is_made_private(run: Path, tmp_path: Path) -> None:
    (run / "attach").mkdir(parents=True)
    run.chmod(0o755)
    (run / "attach").chmod(0o755)
    assert attach_state.load_all() == []
    assert _mode(run) == _mode(run / "attach") == 0o700


@needs_root
@pytest.mark.parametrize("where", ["run", "attach"])
def test_a_run_dir_of_another_user_is_refused(run: Path, tmp_path: Path, where: str) -> None:
    att = _attachment(tmp_path / "t")
    attach_state.save(att)
    path = run if where == "run" else run / "attach"
    os.chown(path, OTHER_UID, OTHER_UID)
    expected = (
        f"run directory {path} is owned by uid {OTHER_UID}, not by root or you: not trusting it"
    )
    assert _refusal(lambda: attach_state.load(att.target)) == expected
    assert _refusal(attach_state.load_all) == expected
    assert _refusal(lambda: attach_state.save(att)) == expected
    assert _refusal(lambda: lifecycle.detach(att.target)) == expected


def test_a_run_dir_writable_by_others_is_refused(run: Path, tmp_path: Path) -> None:
    att = _attachment(tmp_path / "t")
    attach_state.save(att)
    (run / "attach").chmod(0o777)
    assert _refusal(lambda: attach_state.load(att.target)) == (
        f"run directory {run / 'attach'} is writable by group or others (mode 0777): "
        "not trusting it"
    )
    (run / "attach").chmod(0o700)
    run.chmod(0o770)
    assert "is writable by group or others (mode 0770)" in _refusal(attach_state.load_all)


def test_a_symlinked_journal_directory_is_refused(run: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    run.mkdir(mode=0o700)
    (run / "attach").symlink_to(elsewhere)
    assert _refusal(attach_state.load_all) == (
        f"run directory {run / 'attach'} is not a directory: not trusting it"
    )


@needs_root
def test_a_record_of_another_user_is_refused(run: Path, tmp_path: Path) -> None:
    att = _attachment(tmp_path / "t")
    attach_state.save(att)
    record = attach_state.state_path(att.target)
    os.chown(record, OTHER_UID, OTHER_UID)
    assert _refusal(lambda: attach_state.load(att.target)) == (
        f"attachment record {record} is owned by uid {OTHER_UID}, not by root or you: "
        "not trusting it"
    )
    assert "not trusting it" in _refusal(attach_state.load_all)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666], ids=oct)
def test_a_record_writable_by_others_is_refused(run: Path, tmp_path: Path, mode: int) -> None:
    att = _attachment(tmp_path / "t")
    attach_state.save(att)
    record = attach_state.state_path(att.target)
    record.chmod(mode)
    assert _refusal(lambda: attach_state.load(att.target)) == (
        f"attachment record {record} is writable by group or others (mode {mode:04o}): "
        "not trusting it"
    )


def test_a_symlinked_or_huge_record_is_refused(run: Path, tmp_path: Path) -> None:
    att = _attachment(tmp_path / "t")
    attach_state.save(att)
    record = attach_state.state_path(att.target)
    planted = tmp_path / "planted.json"
    record.rename(planted)
    record.symlink_to(planted)
    assert _refusal(lambda: attach_state.load(att.target)) == (
        f"attachment record {record} is a symbolic link: not trusting it"
    )
    record.unlink()
    with open(record, "wb") as f:
        f.truncate(4 << 20)
    record.chmod(0o600)
    assert _refusal(lambda: attach_state.load(att.target)) == (
        f"attachment record {record} is over {1 << 20} bytes: not trusting it"
    )


def _tampered(target: Path, victim: Path) -> list[tuple[dict[str, object], str]]:
    """(record, what the refusal says) for records naming paths not their own."""
    honest = asdict(_attachment(target))
    mount = honest["mounts"][0]
    cases: list[tuple[dict[str, object], str]] = []
    for path in (str(victim), f"{target}/p1/../../victim", f"{target}/p1/x"):
        cases.append(
            (
                {**honest, "mounts": [{**mount, "path": path}]},
                f"names {path!r}, outside {target}/p<K>",
            )
        )
    cases.append(({**honest, "mounts": [{**mount, "partition": "1/../../x"}]}, "is malformed"))
    cases.append(({**honest, "mounts": [{**mount, "device": "/dev/sda"}]}, "is malformed"))
    loop = honest["loops"][0]
    cases.append(
        (
            {**honest, "loops": [{**loop, "device": "/dev/sda"}]},
            "names '/dev/sda', which is not a loop device",
        )
    )
    cases.append(({**honest, "target": str(victim)}, f"is not the record of {victim}"))
    cases.append(({**honest, "target": f"{target}/../victim"}, "has an unusable TARGET"))
    return cases


def test_detach_refuses_a_record_naming_paths_outside_its_target(run: Path, tmp_path: Path) -> None:
    """A tampered journal must not make root unmount or remove arbitrary directories."""
    target, victim = tmp_path / "t", tmp_path / "victim"
    target.mkdir()
    for doc, why in _tampered(target, victim):
        victim.mkdir()
        record = _write_record(target, doc)
        message = _refusal(lambda: lifecycle.detach(str(target)))
        assert message.startswith(f"attachment record {record} "), message
        assert why in message and message.endswith(": not trusting it"), message
        assert "not trusting it" in _refusal(attach_state.load_all)
        assert victim.is_dir() and target.is_dir()  # neither removed
        assert record.exists()  # kept for the admin to look at
        victim.rmdir()


def test_an_honest_record_is_detached(run: Path, tmp_path: Path) -> None:
    """The same path, with nothing mounted and no loop device: detach tidies up."""
    target = tmp_path / "t"
    att = _attachment(target)
    for mount in att.mounts:
        Path(mount.path).mkdir(parents=True)
    attach_state.save(att)
    assert lifecycle.detach(str(target))
    assert not target.exists() and not att.private_dir.exists()
    assert attach_state.load_all() == []
