"""contrib/backupfs.bash-completion: run in a real bash, and kept in step with the CLI.

Most tests call the completion function the way bash does (COMP_WORDS, COMP_CWORD,
COMP_LINE, COMP_POINT) and read COMPREPLY back, with `compopt` recorded instead of run.
One test types into an interactive bash on a pty, so readline itself does the
completing. The rest compare the lists in the completion file with the argparse parser
and MountOptions, so a new command, flag or option cannot be forgotten there.
"""

import argparse
import json
import os
import pty
import re
import select
import shlex
import subprocess
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from backupfs.cli.parser import build_parser
from backupfs.options import MountOptions

COMPLETION = Path(__file__).resolve().parents[2] / "contrib" / "backupfs.bash-completion"
# COMP_WORDBREAKS of bash 5.2 less whitespace: bash splits COMP_WORDS at these too.
BREAKS = "\"'@><=;|&(:"
_PART = re.compile(f"[^{re.escape(BREAKS)}]+|[{re.escape(BREAKS)}]+")


@dataclass
class Completion:
    replies: list[str]  # COMPREPLY
    compopt: list[str]  # the arguments of each compopt call


def comp_words(line: str) -> list[str]:
    """COMP_WORDS as bash builds them for `line`, with the cursor at its end."""
    words = [part for chunk in line.split() for part in _PART.findall(chunk)]
    return [*words, ""] if not line or line[-1].isspace() else words


def bash(script: str, env: dict[str, str] | None = None) -> bytes:
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f"source {shlex.quote(str(COMPLETION))}\n{script}"],
        capture_output=True,
        env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8", **(env or {})},
        timeout=30,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    return proc.stdout


def complete(line: str, setup: str = "", env: dict[str, str] | None = None) -> Completion:
    words = comp_words(line)
    out = bash(
        f"""
        compopt() {{ opts+=("$*"); }}
        opts=()
        {setup}
        COMP_LINE={shlex.quote(line)}
        COMP_POINT={len(line.encode())}
        COMP_WORDS=({" ".join(shlex.quote(w) for w in words)})
        COMP_CWORD={len(words) - 1}
        _backupfs backupfs {shlex.quote(words[-1])} {shlex.quote(words[-2])}
        for r in "${{COMPREPLY[@]}}"; do printf '%s\\0' "$r"; done
        printf '\\1'
        for o in "${{opts[@]}}"; do printf '%s\\0' "$o"; done
        """,
        env,
    )
    replies, opts = out.split(b"\1")
    return Completion(
        [r.decode() for r in replies.split(b"\0")[:-1]],
        [o.decode() for o in opts.split(b"\0")[:-1]],
    )


def shell_list(name: str) -> list[str]:
    """A space-separated list variable of the completion file, as bash reads it."""
    return bash(f'printf "%s\\n" ${name}').decode().split()


def test_comp_words_split_like_bash() -> None:
    assert comp_words("backupfs mount -o cache_size=1G,tok") == [
        "backupfs", "mount", "-o", "cache_size", "=", "1G,tok",
    ]  # fmt: skip
    assert comp_words("backupfs -o token_file=") == ["backupfs", "-o", "token_file", "="]
    assert comp_words("backupfs ") == ["backupfs", ""]


# --- subcommands and flags ---------------------------------------------------------------


def test_subcommand_prefix() -> None:
    assert complete("backupfs rest").replies == ["restore"]
    assert complete("backupfs st").replies == ["status", "stats"]
    assert complete("backupfs u").replies == ["umount"]


def test_all_subcommands_on_empty_word() -> None:
    assert complete("backupfs ").replies == shell_list("_backupfs_commands")


def test_global_flags() -> None:
    assert complete("backupfs --v").replies == ["--version"]


def test_flag_of_restore() -> None:
    assert complete("backupfs restore --jo").replies == ["--jobs"]
    assert complete("backupfs restore /mnt/a --sk").replies == ["--skip-existing"]
    restore_flags = shell_list("_backupfs_flags_restore")
    assert "--overwrite" in restore_flags
    assert complete("backupfs restore --").replies == [*restore_flags, "--help"]


def test_flags_belong_to_their_command() -> None:
    assert complete("backupfs attach --").replies == [
        *shell_list("_backupfs_flags_attach"), "--help",
    ]  # fmt: skip
    assert "--clones" in complete("backupfs attach --").replies
    assert complete("backupfs restore -o").replies == []  # restore has no -o
    assert complete("backupfs nosuch --").replies == []


def test_flags_offered_where_no_argument_is_expected() -> None:
    assert complete("backupfs status ").replies == ["--json", "--help"]
    assert complete("backupfs mount http://h/ /mnt ").replies == [
        "-f", "--foreground", "-o", "--no-index", "--help",
    ]  # fmt: skip


def test_value_of_a_numeric_flag_is_not_completed() -> None:
    for command in ("attach --clones", "restore --jobs", "index --block-size"):
        line = f"backupfs {command} "
        assert complete(line) == Completion([], []), line


def test_after_double_dash_everything_is_an_argument() -> None:
    assert complete("backupfs restore -- --jo").replies == []
    assert complete("backupfs restore -- -x").compopt == ["-o default"]


# --- -o mount options --------------------------------------------------------------------


def test_option_names() -> None:
    got = complete("backupfs mount -o ")
    assert set(got.replies) == set(shell_list("_backupfs_mount_options"))
    assert "-o nospace" in got.compopt


def test_option_with_value_gets_no_space() -> None:
    got = complete("backupfs mount -o tok")
    assert got.replies == ["token_file="]
    assert got.compopt == ["-o nospace"]


def test_flag_option_gets_a_space() -> None:
    got = complete("backupfs mount -o allow_o")
    assert got == Completion(["allow_other"], [])


def test_comma_list_completes_the_last_item() -> None:
    # bash replaces only the text after the last `=`, so the reply starts there.
    got = complete("backupfs mount -o cache_size=1G,tok")
    assert got.replies == ["1G,token_file="]
    assert got.compopt == ["-o nospace"]
    got = complete("backupfs mount -o debug,tim")
    assert got.replies == ["debug,timeout="]


def test_comma_list_leaves_out_names_already_given() -> None:
    replies = complete("backupfs mount -o debug,cache_size=1G,").replies
    assert "1G,timeout=" in replies and "1G,allow_other" in replies
    assert "1G,debug" not in replies and "1G,cache_size=" not in replies


def test_option_attached_to_dash_o() -> None:
    assert complete("backupfs mount -ocache_size=1G,re").replies == [
        "1G,readahead=", "1G,request_size=", "1G,retries=", "1G,region=",
    ]  # fmt: skip
    assert complete("backupfs mount -odeb").replies == ["-odebug"]


def test_option_of_ls() -> None:
    assert complete("backupfs ls -o ti").replies == ["timeout="]
    assert complete("backupfs ls https://h:8443/store/ -o ti").replies == ["timeout="]


def test_file_valued_option_completes_file_names() -> None:
    assert complete("backupfs mount -o debug,token_file=") == Completion([], ["-o default"])
    assert complete("backupfs mount -o log_file=/var/l") == Completion([], ["-o default"])


def test_other_option_values_are_not_completed() -> None:
    assert complete("backupfs mount -o cache_size=") == Completion([], [])


# --- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "action"),
    [
        ("backupfs index ", "-o dirnames"),
        ("backupfs mount https://h:8443/store/ /mn", "-o dirnames"),
        ("backupfs mount -f -o debug https://h/ ", "-o dirnames"),
        ("backupfs attach ", "-o default"),
        ("backupfs attach --clones 2 disk.img ", "-o dirnames"),
        ("backupfs restore --jobs 8 /mnt/r/p1/etc ", "-o default"),
        ("backupfs flush ", "-o default"),
    ],
)
def test_paths_left_to_readline(line: str, action: str) -> None:
    assert complete(line) == Completion([], [action])


def test_url_is_not_completed() -> None:
    assert complete("backupfs mount ") == Completion([], [])
    assert complete("backupfs ls http") == Completion([], [])


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
36 22 0:32 / /mnt/back\\040ups ro,nosuid,nodev shared:5 - fuse.backupfs https://h/ ro,user_id=0
37 22 0:33 / /mnt/other rw,relatime shared:6 - fuse.sshfs host: rw,user_id=0
38 22 0:34 / /srv/b2 ro,nosuid,nodev shared:7 - fuse.backupfs http://h/ ro,user_id=0
"""


@pytest.mark.parametrize("command", ["umount", "stats"])
def test_mountpoints_from_mountinfo(tmp_path: Path, command: str) -> None:
    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    setup = f"_backupfs_mountinfo={shlex.quote(str(tmp_path / 'mountinfo'))}"
    assert complete(f"backupfs {command} ", setup).replies == ["/mnt/back\\ ups", "/srv/b2"]
    assert complete(f"backupfs {command} /mnt/", setup).replies == ["/mnt/back\\ ups"]
    assert complete(f"backupfs {command} /mnt/o", setup) == Completion([], ["-o dirnames"])


def test_attach_targets_from_the_run_dir(tmp_path: Path) -> None:
    (tmp_path / "attach").mkdir()
    for name, target in [("a", "/mnt/restore/web01"), ("b", "/srv/x"), ("c", "/mnt/r\u00e9")]:
        record = {"target": target, "image": "/mnt/b/disk0.img", "clones": 4, "mounts": []}
        (tmp_path / "attach" / f"{name}.json").write_text(json.dumps(record, indent=1))
    env = {"BACKUPFS_RUN_DIR": str(tmp_path)}
    assert complete("backupfs detach /mnt/", env=env).replies == ["/mnt/restore/web01"]
    assert complete("backupfs detach /srv/x /", env=env).replies == [
        "/mnt/restore/web01", "/srv/x",
    ]  # fmt: skip
    assert complete("backupfs detach /home", env=env) == Completion([], ["-o dirnames"])


def test_no_mountinfo_falls_back_to_directories(tmp_path: Path) -> None:
    setup = f"_backupfs_mountinfo={shlex.quote(str(tmp_path / 'missing'))}"
    assert complete("backupfs umount ", setup) == Completion([], ["-o dirnames"])


# --- readline itself ---------------------------------------------------------------------


def _type_in_bash(cwd: Path, lines: list[str], expected: list[str]) -> str:
    """Type `lines` into an interactive bash on a pty; `backupfs` prints its arguments."""
    primary, secondary = pty.openpty()
    env = {
        "PATH": os.environ["PATH"], "HOME": str(cwd), "TERM": "dumb", "INPUTRC": "/dev/null",
        "HISTFILE": "/dev/null", "LC_ALL": "C.UTF-8", "PS1": "$ ",
    }  # fmt: skip
    proc = subprocess.Popen(
        ["bash", "--norc", "--noprofile", "-i"],
        stdin=secondary, stdout=secondary, stderr=secondary,
        cwd=cwd, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(secondary)
    out = b""
    try:
        setup = (
            f"source {shlex.quote(str(COMPLETION))}; backupfs() {{ printf '<%s>' \"$@\"; echo; }}"
        )
        os.write(primary, (setup + "\n" + "".join(lines) + "exit\n").encode())
        deadline = time.monotonic() + 20
        while not all(e.encode() in out for e in expected) and time.monotonic() < deadline:
            if select.select([primary], [], [], 0.1)[0]:
                try:
                    out += os.read(primary, 65536)
                except OSError:  # bash exited
                    break
    finally:
        os.close(primary)
        proc.kill()
        proc.wait(timeout=10)
    return out.decode(errors="replace")


def test_readline_completes_in_an_interactive_bash(tmp_path: Path) -> None:
    (tmp_path / "my dir").mkdir()
    (tmp_path / "token").write_text("x")
    cases = {
        "backupfs rest\t--jo\t4\n": "<restore><--jobs><4>",
        "backupfs mount -o cache_size=1G,tok\ttok\t\n": (
            "<mount><-o><cache_size=1G,token_file=token>"
        ),
        "backupfs mount -o allow_ot\tx\n": "<mount><-o><allow_other><x>",
        "backupfs mount http://h:80/ my\t\n": "<mount><http://h:80/><my dir/>",
    }
    out = _type_in_bash(tmp_path, list(cases), list(cases.values()))
    for line, expected in cases.items():
        assert expected in out, f"{line!r}: {expected} not in {out!r}"


# --- in step with the CLI ----------------------------------------------------------------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_subcommands_match_the_parser() -> None:
    assert sorted(shell_list("_backupfs_commands")) == sorted(_subcommands())


def test_flags_match_the_parser() -> None:
    for name, sub in _subcommands().items():
        flags = {s for a in sub._actions for s in a.option_strings} - {"-h"}
        assert set(shell_list(f"_backupfs_flags_{name}")) | {"--help"} == flags, name


def test_flags_taking_a_value_match_the_parser() -> None:
    valued = {
        s for sub in _subcommands().values() for a in sub._actions if a.nargs != 0
        for s in a.option_strings
    }  # fmt: skip
    assert set(shell_list("_backupfs_valued")) == valued


def test_arguments_are_described_for_every_subcommand() -> None:
    kinds = {"dir", "file", "url", "mount", "target", "none"}
    for name, sub in _subcommands().items():
        positionals = [a for a in sub._actions if not a.option_strings]
        described = shell_list(f"_backupfs_args_{name}")
        assert described and set(described) <= kinds, name
        # one kind per argument, or fewer when one repeats (nargs="+")
        repeats = any(a.nargs in ("+", "*") for a in positionals)
        assert len(described) >= len(positionals) or repeats, name


def _is_flag(type_: object) -> bool:
    return type_ in (bool, "bool")


def test_mount_options_match_mount_options_fields() -> None:
    expected = {f.name if _is_flag(f.type) else f"{f.name}=" for f in fields(MountOptions)}
    assert set(shell_list("_backupfs_mount_options")) == expected


def test_file_options_are_the_path_fields() -> None:
    expected = {f.name for f in fields(MountOptions) if "Path" in str(f.type)}
    assert set(shell_list("_backupfs_file_options")) == expected
