"""S3 stores: `s3://bucket/prefix/` as an HTTPS base URL, and AWS Signature Version 4.

A store in a bucket is read exactly like one behind a web server (ranged GETs below one
base URL); what S3 adds is the signature on every request and its XML error replies
(s3errors.py). The signer is an `httpx.Auth`, so the same clients serve both kinds.

Signing follows the AWS SigV4 specification for S3: the canonical URI is the path as S3
re-encodes it (each byte outside A-Z a-z 0-9 - _ . ~ and / percent-encoded, never
normalised), the signed headers are host, x-amz-content-sha256, x-amz-date and, with
temporary credentials, x-amz-security-token; the Range header is left unsigned, which S3
allows. The signing key depends only on the day, so it is made once a day.
"""

import datetime
import hashlib
import hmac
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import httpx

from backupfs.errors import UsageError

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ALGORITHM = "AWS4-HMAC-SHA256"
# Bucket names: 3 to 63 of a-z 0-9 . - (the current rules); older buckets may have capitals
# or underscores, which only path-style addressing reaches.
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class AwsKeys:
    """An access key pair, with the session token of temporary credentials; `source` says
    where they came from (for messages) and never holds a secret."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    source: str = ""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def is_s3_url(url: str) -> bool:
    return url.lower().startswith("s3://")


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket/some/prefix` -> bucket and "some/prefix/"."""
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not 3 <= len(bucket) <= 63 or not set(bucket) <= _BUCKET_CHARS:
        raise UsageError(f"not an S3 bucket name: {bucket!r} (3 to 63 of a-z 0-9 . -)")
    if "@" in bucket or ":" in bucket:
        raise UsageError("credentials in the URL are refused; use -o credentials_file=")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise UsageError(f"{url}: the prefix has an empty, . or .. component")
    return S3Location(bucket, prefix + "/" if prefix else "")


def endpoint_of(endpoint: str | None, region: str) -> str:
    """The endpoint's scheme://host[:port], without a trailing slash; AWS's by default."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    if not endpoint:
        return f"https://s3.{region}.amazonaws.com"
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"endpoint={endpoint}: not an http(s)://host[:port] URL")
    if parts.username or parts.password or parts.query:
        raise UsageError(f"endpoint={endpoint}: only scheme://host[:port] is allowed")
    if parts.path.strip("/"):
        raise UsageError(f"endpoint={endpoint}: no path is allowed (the bucket goes in s3://)")
    return f"{parts.scheme}://{parts.netloc}"


def base_url(location: S3Location, endpoint: str, addressing: str) -> str:
    """The HTTP(S) URL of the store's prefix. `auto` is virtual-hosted on AWS and
    path-style elsewhere (MinIO, Ceph RGW and most other servers expect path-style unless
    set up with a DNS wildcard); a bucket name with dots or capitals is always path-style
    (it cannot be a host name that a certificate matches)."""
    parts = urlsplit(endpoint)
    on_aws = (parts.hostname or "").endswith(".amazonaws.com")
    virtual = addressing == "virtual" or (addressing == "auto" and on_aws)
    if virtual and ("." in location.bucket or location.bucket.lower() != location.bucket):
        if addressing == "virtual":
            raise UsageError(f"bucket {location.bucket} cannot be virtual-hosted "
                             "(dots or capitals in its name): use -o addressing=path")  # fmt: skip
        virtual = False
    prefix = quote(location.prefix)
    if virtual:
        return f"{parts.scheme}://{location.bucket}.{parts.netloc}/{prefix}"
    return f"{endpoint}/{quote(location.bucket)}/{prefix}"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def canonical_uri(raw_path: bytes) -> str:
    """The path as S3 encodes it, however the request spelled it."""
    return quote(unquote(raw_path.decode("ascii")), safe="/~")


def canonical_query(raw_query: bytes) -> str:
    if not raw_query:
        return ""
    pairs = []
    for item in raw_query.decode("ascii").split("&"):
        name, _, value = item.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


class SigV4(httpx.Auth):
    """Signs each request for `service` in `region` with `keys`. A request that carries
    its own x-amz-content-sha256 (an upload) is signed with it; others as empty."""

    def __init__(self, keys: AwsKeys, region: str, service: str = "s3") -> None:
        self.keys, self.region, self.service = keys, region, service
        self._day = ""
        self._signing_key = b""

    def _key_for(self, day: str) -> bytes:
        if day != self._day:
            key = _hmac(("AWS4" + self.keys.secret_key).encode(), day)
            for part in (self.region, self.service, "aws4_request"):
                key = _hmac(key, part)
            self._day, self._signing_key = day, key
        return self._signing_key

    def sign(self, request: httpx.Request, now: datetime.datetime | None = None) -> None:
        now = now or datetime.datetime.now(datetime.UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = request.headers
        payload = headers.setdefault("x-amz-content-sha256", EMPTY_SHA256)
        headers["x-amz-date"] = stamp
        if self.keys.session_token is not None:
            headers["x-amz-security-token"] = self.keys.session_token
        names = ["host", "x-amz-content-sha256", "x-amz-date"]
        if self.keys.session_token is not None:
            names.append("x-amz-security-token")
        canonical_headers = "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names)
        signed = ";".join(names)
        url = request.url
        canonical = "\n".join((
            request.method, canonical_uri(url.raw_path.split(b"?")[0]),
            canonical_query(url.query), canonical_headers, signed, payload,
        ))  # fmt: skip
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            (_ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest())
        )
        signature = hmac.new(self._key_for(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (
            f"{_ALGORITHM} Credential={self.keys.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request)
        yield request
