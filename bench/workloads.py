"""The contender suite's workloads W1–W7: what each one runs through a contender, and how its
result is checked against the source (dataset.py holds the source's SHA-256 list, grep
output, `ls -lR` line count and regular file count, and makes `du -s`'s baseline).

W2 is the `cp -a` of the whole tree for every contender that copies with cp (all but the
`backupfs` attach rows, which run `backupfs restore` there). W4-W7 run the same commands
everywhere; W5-W7 read metadata only.

A workload runs its commands and returns a Check: called after the contender is torn
down, it says None when the result is right, or why it is not.
"""

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contender import Cmd, Contender, Opened
from dataset import (
    BIG_IMAGE,
    BIG_NAME,
    NEEDLE,
    TREE_IMAGE,
    Dataset,
    check_files,
    check_tree,
    du_baseline,
    first_number,
    grep_lines,
    ls_line_count,
    run_du,
    run_find,
    run_grep,
    run_ls,
)

Check = Callable[[], str | None]  # None: the result is right; else why it is not


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    image: str
    run: Callable[[Contender, Opened, Path, Dataset, float], Check]
    payload: Callable[[Dataset], int]  # bytes the workload is about (0: MB/s not meaningful)


class CommandFailed(Exception):
    pass


def run_cmds(cmds: list[Cmd], env: dict[str, str], timeout_s: float) -> bytes:
    """Run commands in order; the last one's stdout. A non-zero exit raises CommandFailed."""
    out = b""
    for argv, cwd in cmds:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s
        )
        if proc.returncode:
            error = proc.stderr.decode(errors="replace").strip()[-300:]
            raise CommandFailed(
                f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} "
                f"exited with {proc.returncode}: {error}"
            )
        out = proc.stdout
    return out


def w1_copy_big(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    run_cmds(c.copy_file(o.root / BIG_NAME, dest), o.env, timeout_s)
    return lambda: check_files({BIG_NAME: ds.big_sha256}, {BIG_NAME: dest / BIG_NAME})


def w2_restore_tree(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    run_cmds(c.copy_tree(o.root, dest / "tree"), o.env, timeout_s)
    return lambda: check_tree(ds.tree, dest / "tree")


def w3_restore_sample(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    cmds, where = c.copy_files(o.root, ds.sample, dest)
    run_cmds(cmds, o.env, timeout_s)
    return lambda: check_files({rel: ds.tree.files[rel] for rel in ds.sample}, where())


def w4_grep(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    run_cmds(c.before_scan(o.root, metadata_only=False), o.env, timeout_s)
    proc = run_grep(o.root, timeout_s)

    def check() -> str | None:
        if proc.returncode != ds.grep_status:
            error = proc.stderr.decode(errors="replace").strip()[-200:]
            return f"grep exited with {proc.returncode}, {ds.grep_status} on the source: {error}"
        lines = grep_lines(proc)
        if lines != ds.grep_lines:
            return f"grep printed {len(lines)} lines, {len(ds.grep_lines)} on the source"
        return None

    return check


def _metadata_scan(
    c: Contender,
    o: Opened,
    timeout_s: float,
    run: Callable[[Path, float], subprocess.CompletedProcess[bytes]],
    name: str,
    judge: Callable[[subprocess.CompletedProcess[bytes]], str | None],
) -> Check:
    """W5-W7: the contender's warm-up for metadata, the command, and a check that it
    exited 0 and that `judge` finds its output right."""
    run_cmds(c.before_scan(o.root, metadata_only=True), o.env, timeout_s)
    proc = run(o.root, timeout_s)

    def check() -> str | None:
        if proc.returncode:
            error = proc.stderr.decode(errors="replace").strip()[-200:]
            return f"{name} exited with {proc.returncode}: {error}"
        return judge(proc)

    return check


def w5_ls(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    def judge(proc: subprocess.CompletedProcess[bytes]) -> str | None:
        count = ls_line_count(proc)
        return None if count == ds.ls_lines else f"{count} lines, {ds.ls_lines} on the source"

    return _metadata_scan(c, o, timeout_s, run_ls, "ls", judge)


def w6_find(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    def judge(proc: subprocess.CompletedProcess[bytes]) -> str | None:
        count, expected = first_number(proc), len(ds.tree.files)
        return None if count == expected else f"{count} files, {expected} in the source"

    return _metadata_scan(c, o, timeout_s, run_find, "find | wc -l", judge)


def w7_du(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    def judge(proc: subprocess.CompletedProcess[bytes]) -> str | None:
        kib, expected = first_number(proc), du_baseline(ds)
        return None if kib == expected else f"{kib} KiB, {expected} on the image's own mount"

    return _metadata_scan(c, o, timeout_s, run_du, "du -s", judge)


WORKLOADS = {
    w.key: w
    for w in [
        Workload("W1", "copy the big file", BIG_IMAGE, w1_copy_big, lambda ds: ds.big_bytes),
        Workload(
            "W2",
            "restore the tree (cp -a + sync -f, or backupfs restore: see Contenders)",
            TREE_IMAGE,
            w2_restore_tree,
            lambda ds: ds.tree.total_bytes,
        ),
        Workload(
            "W3",
            "restore 1% of the files",
            TREE_IMAGE,
            w3_restore_sample,
            lambda ds: ds.sample_bytes,
        ),
        Workload("W4", f"grep -rF '{NEEDLE}'", TREE_IMAGE, w4_grep, lambda ds: ds.tree.total_bytes),
        Workload("W5", "ls -lR", TREE_IMAGE, w5_ls, lambda ds: 0),
        Workload("W6", "find . -type f | wc -l", TREE_IMAGE, w6_find, lambda ds: 0),
        Workload("W7", "du -s", TREE_IMAGE, w7_du, lambda ds: 0),
    ]
}
