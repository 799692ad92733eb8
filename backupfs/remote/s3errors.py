"""S3's error replies (`<Error><Code>…</Code>…</Error>`) as one line naming what to fix.

The body is untrusted and read only up to MAX_ERROR_BYTES; a document type declaration is
refused before parsing (no entities, no external anything), and only <Code>, <Message>
and <Region> are looked at. A reply that is not S3's XML keeps the plain status line.
"""

import xml.etree.ElementTree as ET

from backupfs.errors import FetchError

MAX_ERROR_BYTES = 16 << 10
CREDENTIALS = "credentials_file=, profile= or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
_HINTS = {
    "AccessDenied": "access denied: the key's user or the bucket policy does not allow "
    "s3:GetObject/s3:ListBucket here (check the bucket, the prefix and the key's policy)",
    "AllAccessDisabled": "access to this bucket is disabled",
    "NoSuchBucket": "no such bucket (check the bucket name in s3://BUCKET/, endpoint= "
    "and region=)",
    "NoSuchKey": "no such object (is the prefix right? is the store indexed: `backupfs "
    "index s3://…`, or mount it with --no-index)",
    "InvalidAccessKeyId": f"the server knows no such access key (check {CREDENTIALS}, "
    "and endpoint=: keys of one service are not known to another)",
    "SignatureDoesNotMatch": f"the signature does not match: the secret key is wrong for "
    f"this access key (check {CREDENTIALS})",
    "RequestTimeTooSkewed": "this host's clock is more than 15 minutes off the server's: "
    "set the time (timedatectl, chrony) and try again",
    "ExpiredToken": "the session token has expired: get new temporary credentials "
    "(AWS_SESSION_TOKEN, aws_session_token in the credentials file)",
    "InvalidToken": "the session token is not valid (AWS_SESSION_TOKEN, aws_session_token "
    "in the credentials file)",
    "TokenRefreshRequired": "the session token has expired: get new temporary credentials",
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region "
    "(check region=)",
    "PermanentRedirect": "the bucket is not at this endpoint (check endpoint= and region=)",
    "InvalidBucketName": "not a valid bucket name",
    "InvalidRequest": "the server refused the request",
}
TRANSIENT = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"})


def parse_error(body: bytes) -> tuple[str, str, str] | None:
    """(code, message, region) of an S3 error document, or None."""
    if len(body) > MAX_ERROR_BYTES or b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body:
        return None
    try:
        root = ET.fromstring(body)
    except (ET.ParseError, ValueError):
        return None
    if root.tag != "Error":
        return None

    def text(tag: str) -> str:
        value = root.findtext(tag) or ""
        return " ".join(value.split())[:200]

    code = text("Code")
    return (code, text("Message"), text("Region")) if code else None


def s3_error(status: int, body: bytes) -> FetchError | None:
    """The FetchError for an S3 error reply, or None when `body` is not one."""
    parsed = parse_error(body)
    if parsed is None:
        return None
    code, message, region = parsed
    hint = _HINTS.get(code)
    if code == "AuthorizationHeaderMalformed" and region:
        hint = f"the request was signed for the wrong region: the bucket is in {region} " \
               f"(use -o region={region})"  # fmt: skip
    elif code == "PermanentRedirect" and region:
        hint = f"the bucket is in region {region}, not at this endpoint (use -o region={region})"
    if hint is None:
        hint = message or "refused"
    transient = code in TRANSIENT or status >= 500 or status == 429
    return FetchError(f"{code}: {hint}", transient=transient, status=status)
