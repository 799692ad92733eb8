"""The contender suite's table and report: one row per (link, workload, contender) cell from
its median run, printed as text, and written as markdown (with the legend, each contender's
exact setup and the tools' versions) and as JSON with every run's numbers.
"""

import argparse
import contextlib
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass

from contender import ACCESS, Contender
from dataset import Dataset
from measure import Run
from workloads import WORKLOADS


@dataclass
class Cell:
    link: str
    workload: str
    contender: str
    payload_bytes: int
    runs: list[Run]
    access: str = ""  # Contender.access: attach, plain or download

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
        head = [self.link, self.workload, self.contender, self.access]
        if run is None:
            word = "FAILED" if any(r.failure for r in self.runs) else "ERROR"
            return [*head, word, "-", word, "-", "-", "-", "-", "-"]
        mbps = f"{self.payload_bytes / run.wall_s / 1e6:.1f}" if self.payload_bytes else "-"
        per_gb = run.daemon_cpu_s_per_gb
        return [
            *head,
            f"{run.wall_s:.2f}",
            f"{run.setup_s:.2f}",
            mbps,
            f"{run.served_bytes / 1e6:.1f}",
            f"{run.daemon_cpu_s:.1f}",
            f"{per_gb:.1f}" if per_gb == per_gb else "-",
            f"{run.cmd_cpu_s:.1f}",
            f"{run.daemon_rss_mib:.0f}",
        ]


TEXT_COLUMNS = 4  # link, work, contender, access: left-aligned; the numbers right-aligned


HEADER = [
    "link",
    "work",
    "contender",
    "access",
    "wall s",
    "setup s",
    "MB/s",
    "served MB",
    "daemon CPU s",
    "CPU s/GB",
    "cmd CPU s",
    "daemon RSS MiB",
]
LEGEND = [
    *[f"access {key}: {text}" for key, text in ACCESS.items()],
    "wall s: setup (mount + attach, or the whole download) plus the workload, cold "
    "(sync + drop caches first); median run",
    "setup s: the part of wall s spent making the filesystem readable",
    "MB/s: the workload's payload (file bytes copied or grepped) / wall s; - for W5-W7, "
    "which read metadata only",
    "served MB: the bytes fetched: response body bytes nginx sent (its access log), metadata "
    "included; through the proxy this includes data in flight that a client dropped by "
    "closing a connection",
    "daemon CPU s / RSS: the FUSE daemon(s) serving the image (nbdkit: nbdfuse + nbdkit), or "
    "curl; RSS is the peak (VmHWM)",
    "CPU s/GB: daemon CPU s per GB (1e9 bytes) of served MB; the daemon's start-up is in "
    "it, so only cells that fetch a lot (W1, W2, W4) give a rate per GB",
    "cmd CPU s: the workload's commands (backupfs restore, or cp + sync -f, grep, ls, "
    "find | wc, du)",
    "W1-W3 end with one syncfs of the target (backupfs restore does it; `sync -f` after cp)",
]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = []
    for r in [HEADER, *rows]:
        cells = [
            c.ljust(w) if i < TEXT_COLUMNS else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    align = "|" + "---|" * TEXT_COLUMNS + "---:|" * (len(HEADER) - TEXT_COLUMNS)
    lines = ["| " + " | ".join(HEADER) + " |", align]
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
        f"{c.name} ({c.access}): `{c.describe()}`. {' '.join((c.__doc__ or '').split())}"
        for c in contenders
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
                "runs": [
                    {**asdict(r), "daemon_cpu_s_per_gb": r.daemon_cpu_s_per_gb} for r in c.runs
                ],
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


def no_nan(value: object) -> object:
    """JSON has no NaN: unmeasured numbers become null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value
