"""The units in systemd/ pass systemd's own parsers; systemd need not be running (PID 1).

`systemd-analyze verify` exits 0 on unknown keys and most mistakes and only warns, so every
line it prints about our files counts as a failure. Lines about the host's units do not.
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
MOUNT, AUTOMOUNT = "mnt-backups.mount", "mnt-backups.automount"
TEMPLATE = "backupfs-attach@.service"
IMAGE = "web01/2026-11-20T0300Z/disk0.img"  # an instance: the image's path under the store
FSTAB_GENERATOR = "/usr/lib/systemd/system-generators/systemd-fstab-generator"


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    tool = argv[0] if argv[0].startswith("/") else shutil.which(argv[0])
    assert tool and os.access(tool, os.X_OK), (
        f"{argv[0]} not found: install Debian's systemd package (contrib/setup.sh does)"
    )
    return subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=60, env=env)


def _escape(image: str) -> str:
    proc = _run("systemd-escape", f"--template={TEMPLATE}", image)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout.strip()


def _verify(*units: Path) -> list[str]:
    """What `systemd-analyze verify` says about these files: [] when they are clean."""
    proc = _run("systemd-analyze", "verify", "--man=no", *map(str, units))
    output = (proc.stdout + proc.stderr).splitlines()
    complaints = [line for line in output if any(u.name in line for u in units)]
    if proc.returncode != 0 and not complaints:
        complaints = [f"exit status {proc.returncode}", *output]
    return complaints


def _settings(unit: Path) -> dict[str, str]:
    """`Section.Key` -> value, the last one winning; enough for these small files."""
    found, section = {}, ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found[f"{section}.{key.strip()}"] = value.strip()
    return found


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The mount pair as shipped, and the template under a real instance name."""
    for name in (MOUNT, AUTOMOUNT):
        shutil.copy(UNITS / name, tmp_path / name)
    shutil.copy(UNITS / TEMPLATE, tmp_path / _escape(IMAGE))
    return tmp_path


def test_units_verify_without_a_warning(unit_dir: Path) -> None:
    units = sorted(unit_dir.iterdir())
    assert [u.name for u in units] == [_escape(IMAGE), AUTOMOUNT, MOUNT]
    assert _verify(*units) == []


def test_verify_reports_a_misspelt_key(unit_dir: Path) -> None:
    unit = unit_dir / MOUNT
    unit.write_text(unit.read_text().replace("TimeoutSec=", "TimeoutSecs="))
    assert any("Unknown key 'TimeoutSecs'" in line for line in _verify(unit))


def test_mount_unit_name_must_match_where(unit_dir: Path) -> None:
    unit = unit_dir / "srv-backups.mount"
    shutil.copy(UNITS / MOUNT, unit)
    assert any("Where= setting doesn't match unit name" in line for line in _verify(unit))


def test_pair_agrees_on_where() -> None:
    where = _settings(UNITS / MOUNT)["Mount.Where"]
    assert _settings(UNITS / AUTOMOUNT)["Automount.Where"] == where
    proc = _run("systemd-escape", "--path", "--suffix=mount", where)
    assert proc.stdout.strip() == MOUNT


def test_documented_instance_name_is_what_systemd_escape_prints() -> None:
    lines = (UNITS / TEMPLATE).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("#   $ systemd-escape"))
    argv = shlex.split(lines[at].removeprefix("#   $ "))
    documented = lines[at + 1].removeprefix("#   ")
    assert argv[-1] == IMAGE
    assert _run(*argv).stdout.strip() == documented == _escape(IMAGE)
    back = _run("systemd-escape", "--unescape", "--instance", documented)
    assert back.stdout.strip() == IMAGE  # what %I expands to


def test_attach_and_detach_use_the_same_target_under_the_store() -> None:
    service = _settings(UNITS / TEMPLATE)
    where = _settings(UNITS / MOUNT)["Mount.Where"]

    def command(key: str) -> list[str]:  # specifiers are expanded before words are split
        return shlex.split(service[f"Service.{key}"].replace("%I", IMAGE))

    target = f"/mnt/restore/{IMAGE}"
    assert command("ExecStart") == ["backupfs", "attach", f"{where}/{IMAGE}", target]
    assert command("ExecStopPost") == ["backupfs", "detach", target]
    assert where in service["Unit.RequiresMountsFor"].split()
    assert service["Service.Type"] == "oneshot" and service["Service.RemainAfterExit"] == "yes"


def test_fstab_example_generates_the_same_pair(tmp_path: Path) -> None:
    env = {**os.environ, "SYSTEMD_FSTAB": str(UNITS / "fstab.example")}
    proc = _run(FSTAB_GENERATOR, str(tmp_path), str(tmp_path), str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    generated, shipped = _settings(tmp_path / MOUNT), _settings(UNITS / MOUNT)
    for key in ("Mount.What", "Mount.Where", "Mount.Type", "Mount.TimeoutSec"):
        assert generated[key] == shipped[key]
    options = [o for o in generated["Mount.Options"].split(",") if not o.startswith("x-systemd.")]
    assert options == shipped["Mount.Options"].split(",")
    idle = "Automount.TimeoutIdleSec"
    assert _settings(tmp_path / AUTOMOUNT)[idle] == _settings(UNITS / AUTOMOUNT)[idle]
    assert (tmp_path / "remote-fs.target.requires" / AUTOMOUNT).exists()
    assert _verify(tmp_path / MOUNT, tmp_path / AUTOMOUNT) == []


def test_tmpfiles_snippet_creates_the_run_directory(tmp_path: Path) -> None:
    proc = _run("systemd-tmpfiles", "--create", f"--root={tmp_path}", str(UNITS / "backupfs.conf"))
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    st = (tmp_path / "run" / "backupfs").stat()
    assert (oct(st.st_mode), st.st_uid, st.st_gid) == (oct(0o40700), 0, 0)
