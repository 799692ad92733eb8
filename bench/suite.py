"""Side-by-side contender suite: backupfs next to the other ways of getting files out of a
disk image on an HTTP server, on the same data, links and workloads; prints one table.

    bash bench/setup-contenders.sh     # once: debootstrap rclone httpdirfs nbdkit libnbd-bin
    python3 bench/suite.py --quick     # smoke run, ~5 min: /usr/share/perl, 64 MiB file, link 20
    python3 bench/suite.py             # everything: ~6 h, ~4 h of it httpdirfs (~1 MB/s)
    python3 bench/suite.py --links 20@400 --contenders backupfs,rclone --workloads W2,W3

Data: a Debian root filesystem from debootstrap (22k files, 750 MB; the tarball is cached
in /var/cache/backupfs-bench) in ext4 in a GPT image, and an image holding one random
1 GiB file, in a store (STORE/HOST/SNAPSHOT/disk0.img, `backupfs index`) served by nginx.
Built once under bench/out/suite[-quick]/ and reused while the parameters stay the same.
Links: direct (nginx on loopback), 20 (DelayProxy, RTT 20 ms), 20@400 (and 400 Mbit/s).
Workloads, each cold (sync, drop caches, fresh mount/attach/download per run):
  W1 copy the big file          W2 restore the whole tree     W3 restore a 1% sample of files
  W4 grep -rF a string (tree)   W5 ls -lR (tree)              W6 find . -type f | wc -l (tree)
  W7 du -s (tree)
  (W1-W3 copy with cp -a + sync -f, except on the backupfs attach rows: backupfs restore)
Contenders (contenders.py), and the table's `access` column:
  attach    backupfs (mount + attach, `backupfs restore`)
  plain     the image file in a FUSE mount, loop-mounted read-only by the suite, `cp -a`:
            backupfs-plain (`backupfs mount` only), rclone, httpdirfs, nbdkit (nbdfuse +
            nbdkit curl)
  download  curl+loop (the whole image downloaded, then the same loop mount)
Every result is checked against the source (SHA-256 of every file, grep output, ls line
count, regular file count, du -s of the image's filesystem mounted locally); a wrong
result shows FAILED instead of a number, a run that could not be made ERROR, with the
reason under the table. Per cell: wall and setup time, bytes fetched (what nginx served),
the daemon's CPU seconds (also per GB fetched), the commands' CPU seconds, the daemon's
peak RSS. The table is also written as markdown and JSON to
bench/out/suite[-quick].{md,json}. Ctrl-C or SIGTERM undoes every mount, loop device and
process of the run in progress and prints what was measured so far.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from common import LINK_HELP, link_url
from contenders import CONTENDERS, DEFAULT, missing_commands
from dataset import du_baseline, prepare, say
from measure import AccessLog, one_run
from report import Cell, no_nan, report
from workloads import WORKLOADS

from tests.support.nginx import Nginx

OUT = Path(__file__).resolve().parent / "out"


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
    if any(w.key == "W7" for w in workloads):
        du_baseline(ds)  # once, before any timed run (cached next to dataset.json)
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
                        cell = Cell(link, w.key, c.name, w.payload(ds), [], c.access)
                        cells.append(cell)
                        for _ in range(args.runs):
                            with link_url(nginx, link) as url:
                                cell.runs.append(
                                    one_run(c, w, url, ds, args.work / "scratch", log, args.timeout)
                                )
                            say(f"{link} {w.key} {c.name}: " + "  ".join(cell.row()[4:]))
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
    stem.with_suffix(".json").write_text(json.dumps(no_nan(doc), indent=1) + "\n")
    say(f"written: {stem}.md, {stem}.json ({doc['seconds']} s)")
    return 0 if complete and all(c.median_run() for c in cells) else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(other, signal.SIG_IGN)  # let the cleanup finish (each step has a timeout)
    raise KeyboardInterrupt


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
