"""Exceptions that carry a one-line message meant for the user."""


class UserError(Exception):
    """A failure the user can act on; the CLI prints `backupfs: <message>` and exits non-zero."""

    exit_code = 1


class StoreError(UserError):
    """The store could not be read: unreachable, refused, missing or malformed metadata."""


class ManifestError(StoreError):
    """Store metadata that is malformed or unsafe."""


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
