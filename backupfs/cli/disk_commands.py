"""Commands on disk images and what is inside them: attach, detach, status, restore, warm,
flush."""

import argparse
import json
import os
import sys
import time

from backupfs.errors import EXIT_OK, EXIT_PARTIAL, UserError
from backupfs.units import human, plural


def cmd_attach(args: argparse.Namespace) -> int:
    from backupfs.attach import lifecycle as attach
    from backupfs.plan.volumes import serve_volume

    att = attach.attach(
        attach.AttachRequest(
            image=args.image,
            target=args.target,
            clones=args.clones,
            partition=args.partition,
            follow_symlinks=args.follow_symlinks,
            direct_io=args.direct_io,
            share=args.share,
        ),
        serve_volume=serve_volume,
    )
    print("\n".join(attach.describe(att)))
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    from backupfs.attach import lifecycle as attach

    for target in args.targets:  # idempotent: nothing attached is not an error
        if not attach.detach(target):
            print(f"backupfs: nothing attached at {target}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from backupfs.attach import lifecycle as attach
    from backupfs.attach import state as attach_state

    attachments = attach_state.load_all()
    if args.json:
        json.dump([asdict(a) for a in attachments], sys.stdout, indent=1)
        print()
    elif not attachments:
        print("nothing attached")
    for att in [] if args.json else attachments:
        print("\n".join(attach.describe(att)))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from backupfs.restore.outcome import RestoreOptions
    from backupfs.restore.run import restore

    existing = "overwrite" if args.overwrite else "skip" if args.skip_existing else "refuse"
    opts = RestoreOptions(
        jobs=args.jobs,
        flush=not args.no_flush,
        existing=existing,
        progress=sys.stderr.isatty() and not args.json,
        read_plan=not args.no_plan,
        no_special=args.no_special,
    )
    listed = None
    if args.files_from is not None:
        try:
            with sys.stdin if args.files_from == "-" else open(args.files_from) as f:
                listed = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise UserError(f"cannot read --files-from {args.files_from}: {exc.strerror}") from None
    out = restore(args.sources, args.dest, opts, listed)
    if args.json:
        json.dump(out.summary(), sys.stdout, indent=1)
        print()
    else:
        print(
            f"restored {plural(out.files, 'file')} ({human(out.bytes)}) in {out.seconds:.1f}s"
            + (f", {out.skipped} already there" if out.skipped else "")
        )
        for line in out.special_lines():  # setuid, capabilities, device nodes: said out loud
            print(line)
        for result in out.flush:
            print(f"flushed {result.line()}")
    for path, error in sorted(out.failed):
        print(f"backupfs: failed: {path}: {error}", file=sys.stderr)
    if out.failed:
        failed = plural(len(out.failed), "file")
        print(f"backupfs: {failed} failed, the rest was restored", file=sys.stderr)
    return EXIT_OK if out.ok else EXIT_PARTIAL


def cmd_warm(args: argparse.Namespace) -> int:
    from backupfs.plan import readplan
    from backupfs.restore.walk import scan_paths

    sources = []
    for path in args.paths:
        if not os.path.exists(path):
            raise UserError(f"{path}: no such file or directory")
        source = readplan.source_of(path)
        if source is None:
            raise UserError(
                f"{path}: not in an attached ext2/3/4, xfs or vfat filesystem (see backupfs attach)"
            )
        sources.append((source, path))
    started = time.monotonic()
    tty = sys.stderr.isatty()

    def progress(fetched: int, total: int) -> None:
        if tty:
            pct = 100 * fetched // total if total else 100
            sys.stderr.write(f"\rwarming {human(fetched)} of {human(total)} ({pct}%) ")

    fetched_all = 0
    known = readplan.KnownExtents()
    for source, path in sources:
        is_dir = os.path.isdir(path)
        # ext2/3/4: directories and inodes first, in parallel rounds (metaprefetch.py)
        walked = readplan.prefetch_metadata(path, known=known) if is_dir else None
        if walked is not None:
            fetched_all += walked.bytes_read
        if walked is not None and not walked.errors:
            if args.metadata:
                continue
            files = readplan.walked_files(path, walked)  # no second walk, no FIEMAP
        else:
            paths = scan_paths(path, files=not args.metadata) if is_dir else [path]
            files = [(p, readplan.WHOLE_FILE, 0) for p in paths]
        fetched, _, error = readplan.warm(source, files, progress, known)
        fetched_all += fetched
        if tty:
            sys.stderr.write("\n")
        if error is not None:
            raise UserError(f"warming {path}: {error}")
    print(f"warmed {human(fetched_all)} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    from backupfs.restore.durability import flush_paths

    for path in args.paths:
        if not os.path.exists(path):
            raise UserError(f"{path}: no such file or directory")
    results = flush_paths(args.paths)
    for result in results:
        print(result.line())
    return 0 if all(r.error is None for r in results) else 1
