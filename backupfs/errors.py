"""Exceptions that carry a one-line message meant for the user, and the exit codes.

Exit codes of `backupfs` (documented in the README):
  0   success
  1   an error the user can act on (a missing file, a busy mountpoint, ...)
  2   usage: bad arguments or options (as argparse exits)
  3   the store could not be read: unreachable, refused, missing or malformed metadata
  23  partial: some files failed, the rest was restored (as rsync's 23)
  70  internal error (a bug: the traceback is in the log, or on stderr with --debug)
  130 interrupted (SIGINT)
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_PARTIAL = 23
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A failure the user can act on; the CLI prints `backupfs: <message>` and exits non-zero."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(UserError):
    """Arguments or options that cannot be right whatever the system's state."""

    exit_code = EXIT_USAGE


class StoreError(UserError):
    """The store could not be read: unreachable, refused, missing or malformed metadata."""

    exit_code = EXIT_STORE


class ManifestError(StoreError):
    """Store metadata that is malformed or unsafe."""


class FormatError(ManifestError):
    """A disk image (qcow2, VMDK, VHD, VHDX) whose header or tables are malformed, hostile
    or of a kind backupfs does not read. The message names the file and the reason."""


class FetchError(Exception):
    """A block could not be fetched and verified; readers see EIO."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, looking inside (trio's) exception groups."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = user_error_in(inner)
            if found is not None:
                return found
    return None
