"""Commands across snapshots, without attaching anything: find, log, diff, cat."""

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from backupfs.errors import EXIT_PARTIAL, UsageError, UserError, user_error_in
from backupfs.options import parse_options
from backupfs.units import human

if TYPE_CHECKING:
    from backupfs.snapshots.queries import Report
    from backupfs.snapshots.session import Session
    from backupfs.store.manifest import SnapshotEntry

T = TypeVar("T")


def _run(args: argparse.Namespace, host: str, job: Callable[["Session"], Awaitable[T]]) -> T:
    import trio

    from backupfs.remote.target import open_target
    from backupfs.snapshots.session import open_session

    opts = parse_options(args.o)
    target = open_target(args.store, opts)
    for warning in target.creds.warnings:
        print(f"backupfs: warning: {warning}", file=sys.stderr)

    async def main() -> T:
        async with open_session(target, opts, host) as session:
            result = await job(session)
            if getattr(args, "stats", False):
                fetched = session.stats.bytes_fetched
                print(f"backupfs: fetched {fetched} bytes ({human(fetched)}) in "
                      f"{session.stats.requests} requests", file=sys.stderr)  # fmt: skip
            return result

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # the session's nursery wraps what the job raised
        error = user_error_in(group)
        if error is None:
            raise
        raise error from None


def _selection(session: "Session", spec: str) -> list["SnapshotEntry"]:
    """HOST (every snapshot, oldest first) or HOST/SNAPSHOT."""
    host, _, name = spec.partition("/")
    found = [s for s in session.snapshots if s.host == host and name in ("", s.name)]
    if not found:
        raise UserError(f"no snapshot {spec} in the store")
    return found


def _finish(report: "Report", as_json: bool, lines: Callable[[dict[str, object]], str]) -> int:
    if as_json:
        json.dump(report.rows, sys.stdout, indent=1)
        print()
    else:
        for row in report.rows:
            print(lines(row))
    sys.stdout.flush()
    for error in report.errors:
        print(f"backupfs: {error}", file=sys.stderr)
    return EXIT_PARTIAL if report.errors else 0


def _entry_line(lead: object, r: dict[str, object], where: str) -> str:
    """One entry as find and log print it: what leads, type, mode, size, mtime, where."""
    digest = f"  {r['sha256']}" if "sha256" in r else ""
    return (f"{lead}  {r['type']:<7} {r['mode']} {human(int(str(r['size']))):>9}  "
            f"{r['mtime']}  {where}{digest}")  # fmt: skip


def cmd_find(args: argparse.Namespace) -> int:
    from backupfs.snapshots.queries import find

    async def job(session: "Session") -> "Report":
        return await find(session, _selection(session, args.snapshots), args.pattern, args.hash)

    report = _run(args, args.snapshots.partition("/")[0], job)

    def line(r: dict[str, object]) -> str:
        return _entry_line(r["snapshot"], r, f"{r['disk']}:{r['partition']}:{r['path']}")

    return _finish(report, args.json, line)


def cmd_log(args: argparse.Namespace) -> int:
    from backupfs.snapshots.queries import log

    async def job(session: "Session") -> "Report":
        return await log(session, _selection(session, args.host), args.path, args.hash)

    report = _run(args, args.host.partition("/")[0], job)

    def line(r: dict[str, object]) -> str:
        span = r["first"] if r["first"] == r["last"] else f"{r['first']} .. {r['last']}"
        return _entry_line(span, r, f"{r['disk']}:{r['partition']}")

    return _finish(report, args.json, line)


def cmd_diff(args: argparse.Namespace) -> int:
    from backupfs.snapshots.diff import diff

    host_a, host_b = args.first.partition("/")[0], args.second.partition("/")[0]
    if host_a != host_b or "/" not in args.first or "/" not in args.second:
        raise UsageError("diff compares two snapshots of one host: HOST/SNAPSHOT HOST/SNAPSHOT")

    async def job(session: "Session") -> "Report":
        [a], [b] = _selection(session, args.first), _selection(session, args.second)
        return await diff(session, a, b, args.path)

    report = _run(args, host_a, job)
    return _finish(report, args.json, lambda r: f"{r['change']}    {r['path']}")


def cmd_cat(args: argparse.Namespace) -> int:
    import trio

    from backupfs.snapshots.queries import cat_places, read_file

    async def job(session: "Session") -> int:
        report, found, path = await cat_places(session, args.spec)
        for error in report.errors:
            print(f"backupfs: {error}", file=sys.stderr)
        if len(found) != 1:
            which = ", ".join(p.where for p in found) or "none readable"
            raise UserError(f"{args.spec}: name one filesystem (HOST/SNAPSHOT/DISK:pN:/PATH;"
                            f" found {which})")  # fmt: skip

        def copy() -> None:
            out = sys.stdout.buffer
            for chunk in read_file(found[0], path):
                out.write(chunk)
            out.flush()

        await trio.to_thread.run_sync(copy)
        return 0

    return _run(args, args.spec.partition("/")[0], job)
