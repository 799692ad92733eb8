"""Side-by-side contender suite: backupfs next to the other ways of getting files out of a
disk image on an HTTP server, on the same data, links and workloads; prints one table.

    bash bench/setup-contenders.sh     # once: debootstrap rclone httpdirfs nbdkit libnbd-bin
    python3 bench/suite.py --quick     # smoke run, ~5 min: /usr/share/perl, 64 MiB file, link 20
    python3 bench/suite.py             # everything: ~5 h, ~3.5 h of it httpdirfs (~1 MB/s)
    python3 bench/suite.py --links 20@400 --contenders backupfs,rclone --workloads W2,W3

Data: a Debian root filesystem from debootstrap (22k files, 750 MB; the tarball is cached
in /var/cache/backupfs-bench) in ext4 in a GPT image, and an image holding one random
1 GiB file, in a store (STORE/HOST/SNAPSHOT/disk0.img, `backupfs index`) served by nginx.
Built once under bench/out/suite[-quick]/ and reused while the parameters stay the same.
Links: direct (nginx on loopback), 20 (DelayProxy, RTT 20 ms), 20@400 (and 400 Mbit/s).
Workloads, each cold (sync, drop caches, fresh mount/attach/download per run):
  W1 copy the big file          W2 restore the whole tree     W3 restore a 1% sample of files
  W4 grep -rF a string (tree)   W5 ls -lR (tree)
Contenders (contenders.py): backupfs (mount + attach, `backupfs restore`), curl+loop (whole
download, then a loop device), rclone, httpdirfs, nbdkit (nbdfuse + nbdkit curl); the
last three with a loop device on the image file in their FUSE mount.
Every result is checked against the source (SHA-256 of every file, grep output, ls line
count); a wrong result shows FAILED instead of a number, a run that could not be made
ERROR, with the reason under the table. The table is also written as markdown and JSON to
bench/out/suite[-quick].{md,json}. Ctrl-C or SIGTERM undoes every mount, loop device and
process of the run in progress and prints what was measured so far.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from common import LINK_HELP, drop_caches, link_url
from contenders import CONTENDERS, DEFAULT, Cmd, Contender, Opened, missing_commands, opened
from dataset import (
    BIG_IMAGE,
    BIG_NAME,
    NEEDLE,
    TREE_IMAGE,
    Dataset,
    check_files,
    check_tree,
    grep_lines,
    ls_line_count,
    prepare,
    run_grep,
    run_ls,
    say,
)

from tests.support.nginx import Nginx
from tests.support.system import remove_tree

OUT = Path(__file__).resolve().parent / "out"
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


def w5_ls(c: Contender, o: Opened, dest: Path, ds: Dataset, timeout_s: float) -> Check:
    run_cmds(c.before_scan(o.root, metadata_only=True), o.env, timeout_s)
    proc = run_ls(o.root, timeout_s)

    def check() -> str | None:
        if proc.returncode:
            error = proc.stderr.decode(errors="replace").strip()[-200:]
            return f"ls exited with {proc.returncode}: {error}"
        count = ls_line_count(proc)
        return None if count == ds.ls_lines else f"{count} lines, {ds.ls_lines} on the source"

    return check


WORKLOADS = {
    w.key: w
    for w in [
        Workload("W1", "copy the big file", BIG_IMAGE, w1_copy_big, lambda ds: ds.big_bytes),
        Workload(
            "W2", "restore the tree", TREE_IMAGE, w2_restore_tree, lambda ds: ds.tree.total_bytes
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
    ]
}


# --------------------------------------------------------------------------------------------
# measuring one run


@dataclass
class Run:
    wall_s: float = float("nan")  # setup (mount/attach or download) + the workload
    setup_s: float = float("nan")
    served_bytes: int = 0  # response bodies nginx sent during the run (its access log)
    daemon_cpu_s: float = float("nan")  # what serves the data: FUSE daemon(s), or curl
    cmd_cpu_s: float = float("nan")  # the workload's commands (restore, cp, grep, ls)
    daemon_rss_mib: float = float("nan")  # its peak RSS (VmHWM)
    failure: str | None = None  # FAILED: the result was wrong or a command failed
    error: str | None = None  # ERROR: the run could not be made (setup failed)


class AccessLog:
    """Bytes of response bodies nginx logged after a mark ($body_bytes_sent, combined format)."""

    LINE = re.compile(rb'^\S+ \S+ \S+ \[[^\]]*\] "(?:[^"\\]|\\.)*" \d{3} (\d+)')

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def bytes_since(self, mark: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(mark)
            return sum(int(m.group(1)) for line in f if (m := self.LINE.match(line)))


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(
    contender: Contender,
    workload: Workload,
    url: str,
    ds: Dataset,
    scratch: Path,
    log: AccessLog,
    timeout_s: float,
) -> Run:
    fresh_dir(scratch)
    dest = scratch / "dest"
    dest.mkdir()
    run = Run()
    mark = log.mark()
    drop_caches()
    start = time.perf_counter()
    try:
        with opened(contender, url, workload.image, scratch) as o:
            run.setup_s = time.perf_counter() - start
            cpu_before = children_cpu_s()
            try:
                check = workload.run(contender, o, dest, ds, timeout_s)
            except CommandFailed as exc:
                run.failure = str(exc)
            except subprocess.TimeoutExpired as exc:
                run.failure = f"{Path(exc.cmd[0]).name} took more than {exc.timeout:.0f} s"
            run.wall_s = time.perf_counter() - start
            run.cmd_cpu_s = children_cpu_s() - cpu_before
            run.daemon_cpu_s, run.daemon_rss_mib = o.metrics()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:500]
    time.sleep(0.2)  # nginx logs a request when its connection is done with it
    run.served_bytes = log.bytes_since(mark)
    if run.error is None and run.failure is None:
        run.failure = check()
    fresh_dir(scratch)
    return run


def fresh_dir(path: Path) -> None:
    """Empty `path`, refusing if anything below it is still mounted (never delete through a
    mount that cleanup failed to undo)."""
    remove_tree(path)
    path.mkdir(parents=True)


# --------------------------------------------------------------------------------------------
# the table


@dataclass
class Cell:
    link: str
    workload: str
    contender: str
    payload_bytes: int
    runs: list[Run]

    def median_run(self) -> Run | None:
        """The run with the median wall time; None if any run failed or erred."""
        if not self.runs or any(r.failure or r.error for r in self.runs):
            return None
        return sorted(self.runs, key=lambda r: r.wall_s)[(len(self.runs) - 1) // 2]

    def problem(self) -> str:
        bad = next(r for r in self.runs if r.failure or r.error)
        return f"FAILED: {bad.failure}" if bad.failure else f"ERROR: {bad.error}"

    def row(self) -> list[str]:
        run = self.median_run()
        head = [self.link, self.workload, self.contender]
        if run is None:
            word = "FAILED" if any(r.failure for r in self.runs) else "ERROR"
            return [*head, word, "-", word, "-", "-", "-", "-"]
        mbps = f"{self.payload_bytes / run.wall_s / 1e6:.1f}" if self.payload_bytes else "-"
        return [
            *head,
            f"{run.wall_s:.2f}",
            f"{run.setup_s:.2f}",
            mbps,
            f"{run.served_bytes / 1e6:.1f}",
            f"{run.daemon_cpu_s:.1f}",
            f"{run.cmd_cpu_s:.1f}",
            f"{run.daemon_rss_mib:.0f}",
        ]


HEADER = [
    "link",
    "work",
    "contender",
    "wall s",
    "setup s",
    "MB/s",
    "served MB",
    "daemon CPU s",
    "cmd CPU s",
    "daemon RSS MiB",
]
LEGEND = [
    "wall s: setup (mount + attach, or the whole download) plus the workload, cold "
    "(sync + drop caches first); median run",
    "setup s: the part of wall s spent making the filesystem readable",
    "MB/s: the workload's payload (file bytes copied or grepped) / wall s; - for ls -lR",
    "served MB: response body bytes nginx sent (its access log), metadata included; through "
    "the proxy this includes data in flight that a client dropped by closing a connection",
    "daemon CPU s / RSS: the FUSE daemon(s) serving the image (nbdkit: nbdfuse + nbdkit), or "
    "curl; RSS is the peak (VmHWM)",
    "cmd CPU s: the workload's commands (backupfs restore, or cp + sync -f, grep, ls)",
    "W1-W3 end with one syncfs of the target (backupfs restore does it; `sync -f` after cp)",
]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = []
    for r in [HEADER, *rows]:
        cells = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---:|" * (len(HEADER) - 3)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(
    cells: list[Cell],
    ds: Dataset,
    args: argparse.Namespace,
    contenders: list[Contender],
    complete: bool,
) -> tuple[str, str, dict[str, object]]:
    tree = ds.tree
    title = (
        f"Contender suite{' (--quick)' if args.quick else ''}: tree = {ds.tree_source} "
        f"({len(tree.files)} files, {tree.total_bytes / 1e6:.0f} MB; W3 sample "
        f"{len(ds.sample)} files, {ds.sample_bytes / 1e6:.1f} MB), big file = "
        f"{ds.big_bytes >> 20} MiB; {args.runs} cold run(s) per cell"
        + ("" if complete else "; INTERRUPTED, partial")
    )
    rows = [c.row() for c in cells]
    problems = [
        f"{c.link} {c.workload} {c.contender}: {c.problem()}"
        for c in cells
        if c.median_run() is None
    ]
    setups = [
        f"{c.name}: `{c.describe()}`. {' '.join((c.__doc__ or '').split())}" for c in contenders
    ]
    workloads = [f"{w.key}: {w.title}" for w in WORKLOADS.values()]
    links = "links: direct = nginx on loopback; RTT_MS[@MBIT] = delaying proxy (RTT, cap)"
    text = "\n".join(
        [
            title,
            text_table(rows),
            "",
            *LEGEND,
            links,
            *workloads,
            *(["problems:", *problems] if problems else []),
        ]
    )
    md = "\n".join(
        [
            f"## {title}",
            "",
            f"`{' '.join(['python3', 'bench/suite.py', *sys.argv[1:]])}`",
            "",
            markdown_table(rows),
            "",
            *[f"- {line}" for line in [*LEGEND, links, *workloads]],
            "",
            "Contenders:",
            "",
            *[f"- {s}" for s in setups],
            "",
            "Versions: " + "; ".join(tool_versions()) + f"; kernel {platform.release()}",
            "",
            *(["Problems:", "", *[f"- {p}" for p in problems]] if problems else []),
        ]
    )
    doc: dict[str, object] = {
        "title": title,
        "argv": sys.argv,
        "complete": complete,
        "kernel": platform.release(),
        "tree_source": ds.tree_source,
        "tree_files": len(tree.files),
        "tree_bytes": tree.total_bytes,
        "sample_files": len(ds.sample),
        "sample_bytes": ds.sample_bytes,
        "big_bytes": ds.big_bytes,
        "contenders": setups,
        "versions": tool_versions(),
        "cells": [
            {
                **{k: v for k, v in asdict(c).items() if k != "runs"},
                "runs": [asdict(r) for r in c.runs],
            }
            for c in cells
        ],
    }
    return text, md, doc


VERSION_COMMANDS = [
    [sys.executable, "-m", "backupfs", "--version"],
    ["curl", "--version"],
    ["rclone", "version"],
    ["httpdirfs", "--version"],
    ["nbdkit", "--version"],
    ["nbdfuse", "--version"],
]


def tool_versions() -> list[str]:
    """The first line each tool prints about its version (missing tools are left out)."""
    versions = []
    for argv in VERSION_COMMANDS:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            lines = (proc.stderr + proc.stdout).splitlines()
            name = "backupfs" if argv[0] == sys.executable else argv[0]
            if line := next((x for x in lines if name in x.lower()), ""):
                versions.append(" ".join(line.split()[:3]))
    return versions


def _no_nan(value: object) -> object:
    """JSON has no NaN: unmeasured numbers become null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: /usr/share/perl as the tree, a 64 MiB file, link 20",
    )
    parser.add_argument("--links", help=LINK_HELP + " (default direct,20,20@400; --quick: 20)")
    parser.add_argument(
        "--contenders",
        default=",".join(DEFAULT),
        help=f"comma-separated, from {','.join(CONTENDERS)} (default {','.join(DEFAULT)})",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)}",
    )
    parser.add_argument("--runs", type=int, default=1, help="cold runs per cell (median)")
    parser.add_argument(
        "--tree-source",
        metavar="DIR",
        help="copy this directory as the tree instead of debootstrap",
    )
    parser.add_argument("--big-mib", type=int, help="size of the big file (default 1024)")
    parser.add_argument(
        "--mirror", default="http://deb.debian.org/debian", help="debootstrap mirror"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds one workload command may take"
    )
    parser.add_argument("--work", type=Path, help="data and scratch (default bench/out/suite)")
    parser.add_argument(
        "--prepare-only", action="store_true", help="build (or check) the data and stop"
    )
    args = parser.parse_args()
    if args.quick:
        args.tree_source = args.tree_source or "/usr/share/perl"
        args.big_mib = args.big_mib or 64
        args.links = args.links or "20"
    args.big_mib = args.big_mib or 1024
    args.links = args.links or "direct,20,20@400"
    args.work = (args.work or OUT / ("suite-quick" if args.quick else "suite")).resolve()
    return args


def choose(names: str, known: dict[str, object], what: str) -> list[str]:
    chosen = [n for n in names.split(",") if n]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        sys.exit(f"suite: unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return chosen


def main() -> int:
    args = parse_args()
    contenders = [CONTENDERS[n] for n in choose(args.contenders, dict(CONTENDERS), "contender")]
    workloads = [WORKLOADS[n] for n in choose(args.workloads, dict(WORKLOADS), "workload")]
    if os.geteuid() != 0:
        sys.exit("suite: run as root (loop devices, mounts, drop_caches)")
    missing = sorted({cmd for c in contenders for cmd in missing_commands(c)})
    if not args.tree_source and not shutil.which("debootstrap"):
        missing.append("debootstrap")
    if missing:
        sys.exit(f"suite: missing {', '.join(missing)}: run `bash bench/setup-contenders.sh`")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)  # unwind: every mount, loop device and daemon undone

    ds = prepare(args.work, args.tree_source, args.big_mib, args.mirror)
    if args.prepare_only:
        say(
            f"data ready in {args.work}: {len(ds.tree.files)} files, {len(ds.tree.links)} "
            f"symlinks, {ds.tree.total_bytes / 1e6:.0f} MB; big file {ds.big_bytes >> 20} MiB"
        )
        return 0
    log_dir = args.work / "nginx"
    shutil.rmtree(log_dir, ignore_errors=True)
    cells: list[Cell] = []
    complete = False
    started = time.monotonic()
    try:
        # autoindex: rclone's and httpdirfs' http backends list directories from it
        with Nginx(ds.store, log_dir, extra="autoindex on;") as nginx:
            log = AccessLog(log_dir / "access.log")
            for link in args.links.split(","):
                for w in workloads:
                    for c in contenders:
                        cell = Cell(link, w.key, c.name, w.payload(ds), [])
                        cells.append(cell)
                        for _ in range(args.runs):
                            with link_url(nginx, link) as url:
                                cell.runs.append(
                                    one_run(c, w, url, ds, args.work / "scratch", log, args.timeout)
                                )
                            say(f"{link} {w.key} {c.name}: " + "  ".join(cell.row()[3:]))
        complete = True
    except KeyboardInterrupt:
        say("interrupted: everything set up so far was undone; partial table follows")
        cells = [c for c in cells if c.runs]
    if not cells:
        return 130
    text, md, doc = report(cells, ds, args, contenders, complete)
    doc["seconds"] = round(time.monotonic() - started)
    print("\n" + text)
    stem = OUT / ("suite-quick" if args.quick else "suite")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md + "\n")
    stem.with_suffix(".json").write_text(json.dumps(_no_nan(doc), indent=1) + "\n")
    say(f"written: {stem}.md, {stem}.json ({doc['seconds']} s)")
    return 0 if complete and all(c.median_run() for c in cells) else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(other, signal.SIG_IGN)  # let the cleanup finish (each step has a timeout)
    raise KeyboardInterrupt


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
