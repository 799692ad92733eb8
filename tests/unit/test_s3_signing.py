"""The SigV4 signer against botocore's (the reference implementation), request by request.

botocore is only the oracle here: its canonical request and signature for the same
request at the same instant must equal ours. The real check is against Ceph RGW
(tests/integration/test_s3_store.py), which refuses a wrong signature.
"""

import datetime
import hashlib

import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from backupfs.remote.s3 import EMPTY_SHA256, AwsKeys, SigV4, canonical_query, canonical_uri

NOW = datetime.datetime(2026, 12, 2, 13, 5, 9, tzinfo=datetime.UTC)
KEYS = AwsKeys("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")


def botocore_signature(request: httpx.Request, keys: AwsKeys, region: str) -> str:
    headers = {"x-amz-content-sha256": request.headers["x-amz-content-sha256"]}
    aws = AWSRequest(method=request.method, url=str(request.url), headers=headers,
                     data=request.content)  # fmt: skip
    auth = S3SigV4Auth(Credentials(keys.access_key, keys.secret_key, keys.session_token),
                       "s3", region)  # fmt: skip
    aws.context["timestamp"] = NOW.strftime("%Y%m%dT%H%M%SZ")
    auth._modify_request_before_signing(aws)
    canonical = auth.canonical_request(aws)
    return str(auth.signature(auth.string_to_sign(aws, canonical), aws))


def our_signature(request: httpx.Request, keys: AwsKeys, region: str) -> str:
    SigV4(keys, region).sign(request, NOW)
    return request.headers["Authorization"].rsplit("Signature=", 1)[1]


@pytest.mark.parametrize(
    "url",
    [
        "https://s3.eu-west-1.amazonaws.com/bucket/store/backupfs-store.json",
        "http://127.0.0.1:7480/backups/store/web01/2026-11-20T0300Z/disk0.img",
        "https://bucket.s3.amazonaws.com/store/a%20b/%C3%A9t%C3%A9~x_y-z.img",
        "http://127.0.0.1:7480/b/odd%21%27%28%29%2A%2B%2C%3B%3D%40%24.img",
        "http://127.0.0.1:7480/backups?list-type=2&prefix=store%2Fweb%2001%2F&delimiter=%2F"
        "&continuation-token=1%2FabcXYZ%2B%3D%3D",
    ],
)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////wEaDK+token/=="])
def test_a_get_is_signed_as_botocore_signs_it(url: str, token: str | None) -> None:
    keys = AwsKeys(KEYS.access_key, KEYS.secret_key, token)
    request = httpx.Request("GET", url, headers={"Range": "bytes=0-99"})
    ours = our_signature(request, keys, "eu-west-1")
    assert ours == botocore_signature(request, keys, "eu-west-1")
    assert request.headers["x-amz-content-sha256"] == EMPTY_SHA256
    assert ("x-amz-security-token" in request.headers) == (token is not None)
    assert "range" not in request.headers["Authorization"]  # left unsigned


def test_an_upload_is_signed_with_its_payload_hash() -> None:
    body = b'{"format": "backupfs-store"}\n'
    request = httpx.Request(
        "PUT",
        "http://127.0.0.1:7480/backups/store/backupfs-store.json",
        content=body,
        headers={"x-amz-content-sha256": hashlib.sha256(body).hexdigest()},
    )
    assert our_signature(request, KEYS, "us-east-1") == botocore_signature(
        request, KEYS, "us-east-1"
    )


def test_the_signature_depends_on_secret_region_and_path() -> None:
    def sig(keys: AwsKeys, region: str, path: str) -> str:
        return our_signature(httpx.Request("GET", f"http://h:1{path}"), keys, region)

    base = sig(KEYS, "us-east-1", "/b/k")
    assert base != sig(AwsKeys(KEYS.access_key, KEYS.secret_key + "x"), "us-east-1", "/b/k")
    assert base != sig(KEYS, "eu-west-1", "/b/k")
    assert base != sig(KEYS, "us-east-1", "/b/k2")


def test_canonical_forms_do_not_depend_on_how_the_request_spelled_them() -> None:
    assert canonical_uri(b"/b/a%20b") == canonical_uri(b"/b/a b".replace(b" ", b"%20"))
    assert canonical_uri(b"/b/%7Ex") == "/b/~x"
    assert canonical_query(b"b=2&a=1") == "a=1&b=2"
    assert canonical_query(b"prefix=a/b") == "prefix=a%2Fb"
