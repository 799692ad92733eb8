"""Parsing S3's ListObjectsV2 replies. Untrusted input: bounded, no DTDs, keys checked."""

import datetime
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from backupfs.errors import StoreError

MAX_PAGE_BYTES = 16 << 20  # 1000 keys of 1 KiB each, with room to spare
MAX_KEYS_PER_PAGE = 1000
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the listed prefix
    size: int
    etag: str
    mtime_ns: int  # LastModified (S3 gives milliseconds at best)


def _text(node: ET.Element, tag: str) -> str:
    found = node.find(_NS + tag)
    if found is None:
        found = node.find(tag)
    return (found.text or "") if found is not None else ""


def _mtime_ns(value: str, what: str) -> int:
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise StoreError(f"{what}: malformed LastModified {value[:40]!r} in the listing") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    seconds = int(when.timestamp())
    return seconds * 1_000_000_000 + when.microsecond * 1000


def parse_list_page(body: bytes, prefix: str, what: str) -> tuple[list[StoredObject], str | None]:
    """The objects of one ListObjectsV2 page (keys made relative to `prefix`) and the
    continuation token of the next page, None on the last one."""
    if len(body) > MAX_PAGE_BYTES:
        raise StoreError(f"{what}: a listing page over {MAX_PAGE_BYTES >> 20} MiB")
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body:
        raise StoreError(f"{what}: the listing has a document type declaration (refused)")
    try:
        root = ET.fromstring(body)
    except (ET.ParseError, ValueError):
        raise StoreError(f"{what}: the bucket listing is not XML") from None
    if root.tag.removeprefix(_NS) != "ListBucketResult":
        raise StoreError(f"{what}: not a bucket listing (<{root.tag.removeprefix(_NS)[:40]}>)")
    contents = root.findall(_NS + "Contents") or root.findall("Contents")
    if len(contents) > MAX_KEYS_PER_PAGE:
        raise StoreError(f"{what}: more than {MAX_KEYS_PER_PAGE} keys on one listing page")
    objects = []
    for node in contents:
        key = _text(node, "Key")
        if not key.startswith(prefix):
            raise StoreError(f"{what}: the listing names {key[:80]!r}, outside the prefix")
        size_text = _text(node, "Size")
        if not size_text.isascii() or not size_text.isdigit() or int(size_text) > _INT64_MAX:
            raise StoreError(f"{what}: malformed Size of {key[:80]!r} in the listing")
        mtime = _mtime_ns(_text(node, "LastModified"), what)
        objects.append(StoredObject(key[len(prefix) :], int(size_text), _text(node, "ETag"), mtime))
    truncated = _text(root, "IsTruncated").lower() == "true"
    token = _text(root, "NextContinuationToken") or None
    if truncated and token is None:
        raise StoreError(f"{what}: a truncated listing without a continuation token")
    return objects, token if truncated else None
