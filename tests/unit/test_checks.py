"""Checks on ranged HTTP replies in backupfs.remote.checks."""

import hashlib
import os

import pytest

from backupfs.errors import FetchError
from backupfs.remote.checks import (
    BlockAssembler,
    check_range_headers,
    check_status,
    parse_content_range,
    validator_of,
    verify_blocks,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-99/1000", (0, 100, 1000)),
        ("bytes 0-0/1", (0, 1, 1)),
        ("bytes 4096-8191/8192", (4096, 8192, 8192)),
        ("  bytes 10-19/*  ", (10, 20, None)),
    ],
)
def test_parse_content_range_good(value: str, expected: tuple) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bytes",
        "bytes 0-99",
        "bytes=0-99/1000",
        "items 0-99/1000",
        "bytes */1000",
        "bytes -5-10/100",
        "bytes 0-99/1000x",
        "bytes a-b/c",
    ],
)
def test_parse_content_range_bad(value: str) -> None:
    with pytest.raises(FetchError, match="malformed Content-Range") as info:
        parse_content_range(value)
    assert info.value.transient is True


def test_check_status_206_passes() -> None:
    check_status(206, "http://store/x.img")


def test_check_status_200_means_range_ignored() -> None:
    with pytest.raises(FetchError, match="ignored the Range header") as info:
        check_status(200, "http://store/x.img")
    assert info.value.transient is False
    assert info.value.status == 200
    assert "http://store/x.img" in str(info.value)


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (404, False),
        (401, False),
        (403, False),
        (416, False),
        (500, True),
        (503, True),
        (429, True),
        (502, True),
    ],
)
def test_check_status_errors(status: int, transient: bool) -> None:
    with pytest.raises(FetchError, match=f"HTTP {status}") as info:
        check_status(status, "u")
    assert info.value.transient is transient
    assert info.value.status == status


def _headers(cr: str, **extra: str) -> dict[str, str]:
    return {"content-range": cr} | {k.replace("_", "-"): v for k, v in extra.items()}


def test_check_range_headers_match_returns_validator() -> None:
    h = _headers("bytes 0-99/1000", etag='"abc"')
    assert check_range_headers(h, 0, 100, 1000, None) == 'etag:"abc"'
    assert check_range_headers(h, 0, 100, 1000, 'etag:"abc"') == 'etag:"abc"'


def test_check_range_headers_unknown_total_is_accepted() -> None:
    assert check_range_headers(_headers("bytes 0-99/*"), 0, 100, 1000, None) is None


@pytest.mark.parametrize(
    "cr",
    [
        "bytes 1-99/1000",
        "bytes 0-98/1000",
        "bytes 0-100/1000",
        "bytes 0-99/999",
        "bytes 0-99/1001",
        "bytes 100-199/1000",
    ],
)
def test_check_range_headers_mismatch_is_transient(cr: str) -> None:
    with pytest.raises(FetchError, match="does not match the request") as info:
        check_range_headers(_headers(cr), 0, 100, 1000, None)
    assert info.value.transient is True


def test_check_range_headers_missing_content_range() -> None:
    with pytest.raises(FetchError, match="malformed Content-Range") as info:
        check_range_headers({}, 0, 100, 1000, None)
    assert info.value.transient is True


def test_validator_prefers_strong_etag() -> None:
    lm = "Wed, 21 Oct 2026 07:28:00 GMT"
    assert validator_of({"etag": '"v1"', "last-modified": lm}) == 'etag:"v1"'
    assert validator_of({"etag": 'W/"v1"', "last-modified": lm}) == f"modified:{lm}"
    assert validator_of({"last-modified": lm}) == f"modified:{lm}"
    assert validator_of({"etag": 'W/"v1"'}) is None
    assert validator_of({}) is None


def test_weak_etag_change_is_ignored() -> None:
    h = _headers("bytes 0-9/10", etag='W/"other"')
    assert check_range_headers(h, 0, 10, 10, None) is None
    assert check_range_headers(h, 0, 10, 10, 'etag:"v1"') is None  # nothing to compare


def test_validator_change_means_image_changed() -> None:
    h = _headers("bytes 0-9/10", etag='"v2"')
    with pytest.raises(FetchError, match="image changed") as info:
        check_range_headers(h, 0, 10, 10, 'etag:"v1"')
    assert info.value.transient is False
    lm = _headers("bytes 0-9/10", last_modified="Thu, 22 Oct 2026 07:28:00 GMT")
    with pytest.raises(FetchError, match="image changed"):
        check_range_headers(lm, 0, 10, 10, "modified:Wed, 21 Oct 2026 07:28:00 GMT")
    # The same Last-Modified passes.
    same = "modified:Thu, 22 Oct 2026 07:28:00 GMT"
    assert check_range_headers(lm, 0, 10, 10, same) == same


def _digests(data: bytes, digest_block_size: int) -> list[bytes]:
    return [
        hashlib.sha256(data[i : i + digest_block_size]).digest()
        for i in range(0, len(data), digest_block_size)
    ]


def split_verified(
    body: bytes, start: int, block_size: int, digests: list[bytes] | None, digest_block_size: int
) -> list[bytes]:
    """Feed `body` through a BlockAssembler in uneven chunks, then verify the blocks."""
    assembler = BlockAssembler(block_size)
    pos, step = 0, 1
    while pos < len(body):
        assembler.feed(body[pos : pos + step])
        pos += step
        step = step * 3 + 7
    blocks = assembler.finish()
    assert assembler.size_bytes == len(body)
    records = None if digests is None else b"".join(digests[start // digest_block_size :])
    verify_blocks(blocks, start, records, digest_block_size)
    return blocks


@pytest.mark.parametrize(
    ("image_size", "start", "end", "block_size", "digest_block_size"),
    [
        (40_000, 0, 40_000, 8192, 4096),  # several cache blocks, short last one
        (40_000, 8192, 16_384, 8192, 4096),  # one cache block of two digest blocks
        (40_000, 32_768, 40_000, 8192, 4096),  # the short tail
        (40_000, 4096, 12_288, 4096, 4096),  # cache block == digest block
        (40_000, 0, 40_000, 65_536, 4096),  # body smaller than one cache block
    ],
)
def test_split_verified_good(
    image_size: int, start: int, end: int, block_size: int, digest_block_size: int
) -> None:
    data = os.urandom(image_size)
    body = data[start:end]
    blocks = split_verified(
        body, start, block_size, _digests(data, digest_block_size), digest_block_size
    )
    assert b"".join(blocks) == body
    assert all(len(b) == block_size for b in blocks[:-1])
    assert 0 < len(blocks[-1]) <= block_size
    assert len(blocks) == -(-len(body) // block_size)


def test_split_verified_without_digests_only_splits() -> None:
    body = os.urandom(10_000)
    blocks = split_verified(body, 0, 4096, None, 4096)
    assert [len(b) for b in blocks] == [4096, 4096, 1808]
    assert b"".join(blocks) == body


@pytest.mark.parametrize("flip_at", [0, 4095, 4096, 9000, 39_999])
def test_split_verified_detects_one_corrupted_byte(flip_at: int) -> None:
    data = os.urandom(40_000)
    digests = _digests(data, 4096)
    body = bytearray(data)
    body[flip_at] ^= 0x01
    with pytest.raises(FetchError, match="do not match their SHA-256") as info:
        split_verified(bytes(body), 0, 8192, digests, 4096)
    assert info.value.transient is True
    assert f"offset {flip_at - flip_at % 4096}" in str(info.value)


def test_split_verified_checks_against_the_right_digests_for_an_offset() -> None:
    data = os.urandom(32_768)
    digests = _digests(data, 4096)
    # The body of blocks 2-3 presented as if it came from offset 0 must not verify.
    with pytest.raises(FetchError, match="offset 0"):
        split_verified(data[8192:16_384], 0, 8192, digests, 4096)
    assert split_verified(data[8192:16_384], 8192, 8192, digests, 4096) == [data[8192:16_384]]
