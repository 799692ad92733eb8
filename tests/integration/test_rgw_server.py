"""The Ceph RGW fixture itself: what the S3 tests rely on it answering, checked with botocore.

Each check is of a real reply from the running gateway: ranged reads, the error codes of
the failures backupfs turns into one-line messages, paginated listings, temporary keys, and
virtual-hosted addressing through `Host: BUCKET.localhost`.
"""

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from tests.support.rgw import (
    CATALOGUE,
    RGW,
    RgwError,
    client,
    make_bucket,
    session_token,
    start_rgw,
    upload_tree,
)

OBJECT = "some dir/disk 0+1.img"  # a space and a plus: both are encoded in the signature
SIZE = (1 << 20) + 7


@pytest.fixture(scope="module")
def bucket(rgw: RGW) -> Iterator[tuple[str, bytes]]:
    name = f"fixture-{uuid.uuid4().hex[:12]}"
    make_bucket(rgw, name)
    data = os.urandom(SIZE)
    client(rgw).put_object(Bucket=name, Key=OBJECT, Body=data)
    yield name, data


def failure(call: Callable[[], Any]) -> tuple[int, str]:
    """The HTTP status and S3 error code of a request that must fail."""
    with pytest.raises(ClientError) as info:
        call()
    reply = info.value.response
    return reply["ResponseMetadata"]["HTTPStatusCode"], reply["Error"]["Code"]


def test_a_ranged_get_is_206_with_content_range_and_etag(
    rgw: RGW, bucket: tuple[str, bytes]
) -> None:
    name, data = bucket
    s3 = client(rgw)
    reply = s3.get_object(Bucket=name, Key=OBJECT, Range="bytes=1000-1999")
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    assert reply["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert headers["content-range"] == f"bytes 1000-1999/{SIZE}"
    body = reply["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data[1000:2000]).digest()
    etag = headers["etag"]
    assert etag == f'"{hashlib.md5(data).hexdigest()}"'  # a single PUT: the MD5
    assert s3.head_object(Bucket=name, Key=OBJECT)["ETag"] == etag
    tail = s3.get_object(Bucket=name, Key=OBJECT, Range="bytes=-7")
    assert tail["ResponseMetadata"]["HTTPHeaders"]["content-range"] == (
        f"bytes {SIZE - 7}-{SIZE - 1}/{SIZE}"
    )
    assert tail["Body"].read() == data[-7:]
    past = failure(lambda: s3.get_object(Bucket=name, Key=OBJECT, Range=f"bytes={SIZE}-"))
    assert past == (416, "InvalidRange")


def test_a_wrong_secret_is_signature_does_not_match(rgw: RGW, bucket: tuple[str, bytes]) -> None:
    wrong = client(rgw, (rgw.access_key, "x" + rgw.secret_key[1:]))
    assert failure(lambda: wrong.get_object(Bucket=bucket[0], Key=OBJECT)) == (
        403, "SignatureDoesNotMatch",
    )  # fmt: skip


def test_an_unknown_access_key_is_invalid_access_key_id(
    rgw: RGW, bucket: tuple[str, bytes]
) -> None:
    unknown = client(rgw, ("NOSUCHKEY00000000000", rgw.secret_key))
    assert failure(lambda: unknown.get_object(Bucket=bucket[0], Key=OBJECT)) == (
        403, "InvalidAccessKeyId",
    )  # fmt: skip


def test_a_missing_bucket_and_a_missing_key(rgw: RGW, bucket: tuple[str, bytes]) -> None:
    s3 = client(rgw)
    missing = f"absent-{uuid.uuid4().hex[:12]}"
    assert failure(lambda: s3.get_object(Bucket=missing, Key=OBJECT)) == (404, "NoSuchBucket")
    assert failure(lambda: s3.get_object(Bucket=bucket[0], Key="no/such/key")) == (
        404, "NoSuchKey",
    )  # fmt: skip


def test_a_listing_by_prefix_comes_in_pages(rgw: RGW, bucket: tuple[str, bytes]) -> None:
    name, _ = bucket
    s3 = client(rgw)
    wanted = [f"listing/k{i}" for i in range(5)]
    for key in [*wanted, "listing-not/k9", "other/k0"]:
        s3.put_object(Bucket=name, Key=key, Body=key.encode())
    seen, pages, token = [], 0, None
    while True:
        more: dict[str, str] = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=name, Prefix="listing/", MaxKeys=2, **more)
        pages += 1
        assert page["KeyCount"] == len(page["Contents"]) <= 2
        seen += [o["Key"] for o in page["Contents"]]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert seen == wanted and pages == 3


def test_upload_tree_puts_the_catalogue_last(
    rgw: RGW, bucket: tuple[str, bytes], tmp_path: Path
) -> None:
    local = tmp_path / "store"
    (local / "h" / "s").mkdir(parents=True)
    (local / CATALOGUE).write_bytes(b"{}")
    (local / "h" / "s" / "disk0.img").write_bytes(os.urandom(4096))
    (local / "zz.txt").write_bytes(b"after the catalogue in name order")
    (local / "bad").mkdir()
    (local / "bad" / CATALOGUE).write_bytes(b"{not json")
    (local / "loop").symlink_to(".")
    keys = upload_tree(rgw, local, bucket[0], "/up/")
    assert keys == ["up/h/s/disk0.img", "up/zz.txt", f"up/bad/{CATALOGUE}", f"up/{CATALOGUE}"]
    s3 = client(rgw)
    for key in keys:
        got = s3.get_object(Bucket=bucket[0], Key=key)["Body"].read()
        assert got == (local / key.removeprefix("up/")).read_bytes()


def test_temporary_keys_work_and_a_mangled_token_is_refused(
    rgw: RGW, bucket: tuple[str, bytes]
) -> None:
    temporary = session_token(rgw)
    if temporary is None:
        pytest.skip("GetSessionToken does not work on this RGW (see the start's log)")
    access, secret, token = temporary
    name, data = bucket
    good = client(rgw, temporary)  # to rgw.sts_endpoint, the gateway that takes them
    assert good.get_object(Bucket=name, Key=OBJECT)["Body"].read() == data
    mangled = token[:-8] + ("A" * 8 if token[-8:] != "A" * 8 else "B" * 8)
    bad = client(rgw, (access, secret, mangled))
    assert failure(lambda: bad.get_object(Bucket=name, Key=OBJECT)) == (403, "AccessDenied")
    # Why two gateways: the plain one knows no temporary keys, and the STS one answers
    # AccessDenied to every failed authentication, a wrong secret too.
    elsewhere = client(rgw, temporary, endpoint=rgw.endpoint)
    assert failure(lambda: elsewhere.get_object(Bucket=name, Key=OBJECT)) == (
        403, "InvalidAccessKeyId",
    )  # fmt: skip
    wrong = client(rgw, (rgw.access_key, "x" + rgw.secret_key[1:]), endpoint=rgw.sts_endpoint)
    assert failure(lambda: wrong.get_object(Bucket=name, Key=OBJECT)) == (403, "AccessDenied")


def test_virtual_hosted_requests_with_a_localhost_host_header(
    rgw: RGW, bucket: tuple[str, bytes]
) -> None:
    """rgw_dns_name = localhost: `Host: BUCKET.localhost:PORT` names the bucket. Signed by
    botocore for that host, sent to 127.0.0.1 (*.localhost does not resolve here)."""
    name, data = bucket
    url = f"http://{name}.localhost:{rgw.port}/{OBJECT.replace(' ', '%20').replace('+', '%2B')}"
    request = AWSRequest(method="GET", url=url, headers={"Range": "bytes=10-19"})
    S3SigV4Auth(Credentials(rgw.access_key, rgw.secret_key), "s3", rgw.region).add_auth(request)
    headers = dict(request.headers.items())
    headers["Host"] = f"{name}.localhost:{rgw.port}"  # what was signed (httpx would send 127.0.0.1)
    assert headers["X-Amz-Content-SHA256"]  # botocore signs it, as RGW needs
    path = url.split(f":{rgw.port}", 1)[1]
    reply = httpx.get(f"http://127.0.0.1:{rgw.port}{path}", headers=headers)
    assert reply.status_code == 206, reply.text
    assert reply.content == data[10:20]


def test_a_start_that_fails_halfway_leaves_no_daemon(tmp_path: Path, rgw: RGW) -> None:
    """A BlueStore file too small for the OSD: the monitor is up by then, and must go."""
    root = tmp_path / "broken"
    with pytest.raises(RgwError, match=r"^ceph-osd -i 0 --mkfs .* failed") as info:
        start_rgw(root, block_size=1 << 20)
    assert "\n" not in str(info.value)
    conf = str((root / "ceph.conf").resolve()).encode()
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if conf in (proc / "cmdline").read_bytes().split(b"\0"):
                    left.append(proc.name)
            except OSError:
                continue
    assert not left and not list((root / "pids").iterdir())
