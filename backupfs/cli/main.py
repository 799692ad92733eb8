"""Entry point: parse arguments, run a command, turn failures into one line and an exit code."""

import argparse
import difflib
import logging
import logging.handlers
import os
import signal
import socket
import sys
import traceback
from typing import cast

from backupfs.cli.parser import build_parser
from backupfs.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, UsageError, UserError


def _as_mount_helper(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`backupfs SOURCE DIR -o OPTS`, as mount.fuse3 runs it, means `backupfs mount ...`;
    SOURCE must look like a store URL (`scheme://...`). Any other first word that is not a
    command is a mistyped command, not a URL."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = cast(dict[str, argparse.ArgumentParser], sub.choices)
    if not argv or argv[0].startswith("-") or argv[0] in commands:
        return argv
    if "://" in argv[0]:
        return ["mount", *argv]
    close = _closest(argv[0], list(commands))
    hint = f" (did you mean '{close}'?)" if close else f"; commands: {', '.join(commands)}"
    raise UsageError(f"unknown command '{argv[0]}'{hint}")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a command the way Ctrl-C does: restore and attach undo or keep what
    they must (temporary files removed, the restore marker kept for a resume)."""
    raise KeyboardInterrupt


def _closest(word: str, commands: list[str]) -> str | None:
    """The command `word` most likely mistypes: same letters in another order first
    (`stauts`), then the closest spelling."""
    for command in commands:
        if sorted(command) == sorted(word):
            return command
    close = difflib.get_close_matches(word, commands, n=1)
    return close[0] if close else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = _as_mount_helper(parser, sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"backupfs: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    if args.command != "mount":  # the daemon handles its signals itself (mount/daemon.py)
        signal.signal(signal.SIGTERM, _interrupt)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="backupfs: %(message)s")
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"backupfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `backupfs ls | head`
        return 0
    except KeyboardInterrupt:
        print("backupfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for the user, the traceback in the log
        if args.debug:
            traceback.print_exc()
            hint = ""
        elif _log_internal_error():
            hint = " (traceback in the system log; --debug prints it)"
        else:
            hint = " (--debug prints the traceback)"
        print(f"backupfs: internal error: {exc!r}{hint}", file=sys.stderr)
        return EXIT_INTERNAL


def _log_internal_error() -> bool:
    """Send the traceback of the exception being handled to the system log (`journalctl
    -t backupfs`), not to stderr, where it would drown the one-line message; False if
    there is no system log."""
    if not os.path.exists("/dev/log"):
        return False
    handler = logging.handlers.SysLogHandler("/dev/log", socktype=socket.SOCK_DGRAM)
    handler.setFormatter(logging.Formatter("backupfs[%(process)d]: %(message)s"))
    internal = logging.getLogger("backupfs.internal")
    internal.propagate = False  # not to the stderr handler of the root logger
    internal.addHandler(handler)
    try:
        internal.error("internal error in `%s`", " ".join(sys.argv[1:2]), exc_info=True)
        return True
    except OSError:
        return False
    finally:
        internal.removeHandler(handler)
        handler.close()
