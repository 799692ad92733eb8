"""The command line's own decisions, without a mount: commands, mistypes, exit codes."""

import pytest

from backupfs.cli.main import main
from backupfs.errors import EXIT_USAGE


@pytest.mark.parametrize(
    ("typed", "meant"),
    [("detatch", "detach"), ("stauts", "status"), ("restroe", "restore"), ("umonut", "umount")],
)
def test_a_mistyped_command_is_named_not_taken_for_a_url(
    typed: str, meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([typed, "/mnt/x"]) == EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"backupfs: unknown command '{typed}' (did you mean '{meant}'?)\n"


def test_an_unknown_word_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("backupfs: unknown command 'frobnicate'; commands: index, ls, mount,")
    assert err.count("\n") == 1


def test_a_url_first_is_the_mount_helper_form(capsys: pytest.CaptureFixture[str]) -> None:
    # mount.fuse3 runs `backupfs SOURCE DIR -o OPTS`: that is `backupfs mount`, whose
    # argument parser then asks for the mountpoint.
    with pytest.raises(SystemExit) as exit_info:
        main(["https://backups.example/store/"])
    assert exit_info.value.code == EXIT_USAGE
    assert "backupfs mount: error: the following arguments are required: MOUNTPOINT" in (
        capsys.readouterr().err
    )
