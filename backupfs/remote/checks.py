"""Checks on ranged HTTP responses, as pure functions of status, headers and body.

A check either passes or raises `FetchError`; `transient` says whether another attempt
might succeed.
"""

import functools
import hashlib
import re
from collections.abc import Mapping

from backupfs.errors import FetchError
from backupfs.store.digestfile import DIGEST_SIZE, ZERO_RECORD

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """`bytes 0-99/1000` -> (0, 100, 1000): half-open start/end and the total size."""
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        raise FetchError(f"malformed Content-Range {value!r}", transient=True)
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)) + 1, total


def validator_of(headers: Mapping[str, str]) -> str | None:
    """What identifies this version of the object: strong ETag, else Last-Modified."""
    etag = headers.get("etag")
    if etag and not etag.startswith("W/"):
        return f"etag:{etag}"
    modified = headers.get("last-modified")
    return f"modified:{modified}" if modified else None


def check_status(status: int, url_for_log: str) -> None:
    """Status of a ranged GET, before its body is read."""
    if status == 206:
        return
    if status == 200:
        raise FetchError(
            f"{url_for_log}: server ignored the Range header (200)", transient=False, status=200
        )
    transient = status >= 500 or status == 429
    raise FetchError(f"{url_for_log}: HTTP {status}", transient=transient, status=status)


def check_range_headers(
    headers: Mapping[str, str], start: int, end: int, total: int, pinned: str | None
) -> str | None:
    """Content-Range and validator of a 206 reply for bytes `[start, end)` of a `total`-byte file.

    Returns the reply's validator; raises if it differs from `pinned` (the image changed).
    """
    got = parse_content_range(headers.get("content-range", ""))
    if got[:2] != (start, end) or got[2] not in (total, None):  # None: total given as "*"
        raise FetchError(
            f"Content-Range {got} does not match the request ({start}, {end}, {total})",
            transient=True,
        )
    validator = validator_of(headers)
    if pinned is not None and validator is not None and validator != pinned:
        raise FetchError(f"image changed on the server ({pinned} -> {validator})", transient=False)
    return validator


class BlockAssembler:
    """Cuts a reply body into cache blocks as its chunks arrive, so the body is never held
    twice: each chunk is copied once, into its block, and then dropped."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: list[bytes] = []
        self.size_bytes = 0
        self._parts: list[memoryview] = []
        self._have = 0

    def feed(self, chunk: bytes) -> None:
        self.size_bytes += len(chunk)
        view = memoryview(chunk)
        while view:
            take = min(self.block_size - self._have, len(view))
            self._parts.append(view[:take])
            self._have += take
            view = view[take:]
            if self._have == self.block_size:
                self._flush()

    def whole_blocks(self) -> list[bytes]:
        """The blocks received whole so far (a reply broken off mid-block loses its tail)."""
        return self.blocks

    def finish(self) -> list[bytes]:
        if self._parts:
            self._flush()
        return self.blocks

    def _flush(self) -> None:
        self.blocks.append(b"".join(self._parts))
        self._parts, self._have = [], 0


@functools.cache
def zeros(size: int) -> bytes:
    """A block of zeros; one object per size (few: block sizes and short last blocks),
    shared by every block of zeros the mount makes or compares with."""
    return bytes(size)


def verify_blocks(
    blocks: list[bytes],
    start: int,
    records: bytes | None,
    digest_block_size: int,
    marks_zeros: bool = False,
) -> None:
    """Check blocks read from byte `start` against the store's per-block SHA-256 records.

    `records` holds the records of the digest blocks from `start // digest_block_size` on;
    with `marks_zeros` (store format 2) a zero record asks for a block of zeros. `start`
    and every block but the last are multiples of `digest_block_size`. Runs in a worker
    thread (hashlib releases the GIL).
    """
    if records is None:
        return
    offset, first = start, start // digest_block_size
    block_of_zeros = zeros(digest_block_size) if marks_zeros else b""
    for block in blocks:
        view = memoryview(block)
        for pos in range(0, len(block), digest_block_size):
            n = (offset + pos) // digest_block_size - first
            want = records[n * DIGEST_SIZE : (n + 1) * DIGEST_SIZE]
            piece = view[pos : pos + digest_block_size]
            if marks_zeros and want == ZERO_RECORD:
                good = bytes(piece) == block_of_zeros[: len(piece)]  # memcmp, not per item
            else:
                good = hashlib.sha256(piece).digest() == want
            if not good:
                raise FetchError(
                    f"bytes at offset {offset + pos} do not match their SHA-256", transient=True
                )
        offset += len(block)
