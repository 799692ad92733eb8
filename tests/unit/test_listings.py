"""Directory and bucket listings are untrusted: only a page's own children count."""

import time

import pytest

from backupfs.errors import StoreError
from backupfs.remote.discovery import MAX_PAGE_BYTES, parse_autoindex
from backupfs.remote.listing import parse_list_page
from backupfs.remote.s3errors import parse_error, s3_error

PAGE = "http://store.example/images/web01/"


def test_autoindex_keeps_children_and_drops_everything_else() -> None:
    html = b"""<html><body><h1>Index of /images/web01/</h1><pre>
    <a href="../">../</a>
    <a href="?C=N;O=D">Name</a>
    <a href="2026-11-20T0300Z/">2026-11-20T0300Z/</a>
    <a href="2026-11-21%20x/">2026-11-21 x/</a>
    <a href="disk0.img">disk0.img</a>
    <a href="/images/web01/disk1.img">disk1.img</a>
    <a href="http://evil.example/images/web01/x.img">x</a>
    <a href="%2e%2e/">..</a>
    <a href="a%2Fb.img">a/b</a>
    <a href=".hidden/">.hidden</a>
    <a href="sub/deeper/">deeper</a>
    <a href="/etc/passwd">passwd</a>
    <a>no href</a>
    </pre></body></html>"""
    dirs, files = parse_autoindex(html, PAGE)
    assert dirs == ["2026-11-20T0300Z", "2026-11-21 x"]
    assert files == ["disk0.img", "disk1.img"]


def test_an_oversized_listing_page_is_refused() -> None:
    with pytest.raises(StoreError, match="over 16 MiB"):
        parse_autoindex(b"<a href='x'>" * (MAX_PAGE_BYTES // 10), PAGE)


def test_too_many_links_are_refused_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(StoreError, match="more than"):
        parse_autoindex(b"<a href=x>" * 200_000, PAGE)
    assert time.monotonic() - start < 10


NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def page(contents: str, truncated: str = "false", token: str = "") -> bytes:
    tok = f"<NextContinuationToken>{token}</NextContinuationToken>" if token else ""
    return (f'<?xml version="1.0"?><ListBucketResult {NS}><IsTruncated>{truncated}'
            f"</IsTruncated>{tok}{contents}</ListBucketResult>").encode()  # fmt: skip


def obj(key: str, size: str = "10", modified: str = "2026-11-20T03:00:00.000Z") -> str:
    return (f"<Contents><Key>{key}</Key><Size>{size}</Size><ETag>&quot;abc&quot;</ETag>"
            f"<LastModified>{modified}</LastModified></Contents>")  # fmt: skip


def test_a_listing_page_gives_keys_below_the_prefix() -> None:
    objects, token = parse_list_page(
        page(obj("store/web01/s/disk0.img") + obj("store/x"), "true", "tok/=="), "store/", "t"
    )
    assert [(o.key, o.size, o.etag) for o in objects] == [
        ("web01/s/disk0.img", 10, '"abc"'),
        ("x", 10, '"abc"'),
    ]
    assert objects[0].mtime_ns == 1795143600 * 10**9
    assert token == "tok/=="


@pytest.mark.parametrize(
    "body, message",
    [
        (page(obj("other/key")), "outside the prefix"),
        (page(obj("store/k", size="-1")), "malformed Size"),
        (page(obj("store/k", size="99999999999999999999")), "malformed Size"),
        (page(obj("store/k", modified="yesterday")), "malformed LastModified"),
        (page("", "true"), "without a continuation token"),
        (b"<Error><Code>AccessDenied</Code></Error>", "not a bucket listing"),
        (b"not xml at all", "not XML"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><ListBucketResult/>',
         "document type"),
        (page(obj("store/k") * 1001), "more than 1000 keys"),
    ],
)
def test_hostile_listing_pages_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        parse_list_page(body, "store/", "s3://b/store/")


def test_s3_error_replies_become_one_line_naming_the_fix() -> None:
    body = b"<Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>"
    error = s3_error(403, body)
    assert error is not None and not error.transient
    assert "secret key is wrong" in str(error) and "credentials_file=" in str(error)
    region = s3_error(400, b"<Error><Code>AuthorizationHeaderMalformed</Code>"
                           b"<Region>eu-west-1</Region></Error>")  # fmt: skip
    assert region is not None and "-o region=eu-west-1" in str(region)
    slow = s3_error(503, b"<Error><Code>SlowDown</Code></Error>")
    assert slow is not None and slow.transient
    assert s3_error(403, b"<html>Forbidden</html>") is None
    assert parse_error(b"<!DOCTYPE Error><Error><Code>X</Code></Error>") is None
