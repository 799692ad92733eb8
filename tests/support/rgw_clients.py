"""botocore clients of the test RGW (tests/support/rgw.py): an S3 client independent of
backupfs's own, to set up buckets and objects and to get session tokens."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.support.rgw import RGW

CATALOGUE = "backupfs-store.json"
log = logging.getLogger(__name__)



def _config(addressing: str) -> Any:
    from botocore.config import Config  # type: ignore[import-untyped]

    extra: dict[str, Any] = {}
    if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
        # botocore 1.36+ would add CRC32 trailers (aws-chunked uploads) that RGW 16 refuses
        extra = {"request_checksum_calculation": "when_required",
                 "response_checksum_validation": "when_required"}  # fmt: skip
    return Config(
        signature_version="s3v4", s3={"addressing_style": addressing},
        retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=120, **extra,
    )  # fmt: skip


Keys = tuple[str, str] | tuple[str, str, str]  # access, secret[, session token]


def _client(
    rgw: RGW, service: str, keys: Keys | None, addressing: str, endpoint: str | None
) -> Any:
    import botocore.session  # type: ignore[import-untyped]

    access, secret, *token = keys or (rgw.access_key, rgw.secret_key)
    if endpoint is None:
        endpoint = rgw.sts_endpoint if token or service == "sts" else rgw.endpoint
    return botocore.session.get_session().create_client(
        service, endpoint_url=endpoint, region_name=rgw.region,
        aws_access_key_id=access, aws_secret_access_key=secret,
        aws_session_token=token[0] if token else None, config=_config(addressing),
    )  # fmt: skip


def client(
    rgw: RGW, keys: Keys | None = None, addressing: str = "path", endpoint: str | None = None
) -> Any:
    """A botocore S3 client (SigV4, path-style, no retries) with the user's keys or `keys`.
    Requests go to `rgw.endpoint`, or with a session token in `keys` to `rgw.sts_endpoint`
    (the gateway that takes temporary keys), unless `endpoint` says otherwise."""
    return _client(rgw, "s3", keys, addressing, endpoint)


def make_bucket(rgw: RGW, name: str) -> None:
    client(rgw).create_bucket(Bucket=name)


def upload_tree(rgw: RGW, local_dir: Path, bucket: str, prefix: str = "") -> list[str]:
    """Put every regular file below `local_dir` (symlinks are skipped) at `prefix/relpath`,
    in name order but catalogues (backupfs-store.json) after the rest and the top one last,
    as a publisher would. Returns the keys in upload order."""
    base = prefix.strip("/")
    rels: list[str] = []
    for top, _, names in os.walk(local_dir):
        paths = [Path(top) / n for n in names]
        rels += [p.relative_to(local_dir).as_posix() for p in paths if not p.is_symlink()]
    rels.sort(key=lambda rel: (rel.rpartition("/")[2] == CATALOGUE, rel == CATALOGUE, rel))
    s3, keys = client(rgw), []
    for rel in rels:
        path = local_dir / rel
        key = f"{base}/{rel}" if base else rel
        with open(path, "rb") as body:
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        keys.append(key)
    return keys


def session_token(rgw: RGW, seconds: int = 900, force: bool = False) -> tuple[str, str, str] | None:
    """Temporary credentials (access, secret, token) from RGW's STS, or None without STS."""
    if not (rgw.sts or force):
        return None
    reply = _client(rgw, "sts", None, "path", None).get_session_token(DurationSeconds=seconds)
    c = reply["Credentials"]
    return c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]


_STS_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["sts:GetSessionToken"], "Resource": ["*"]}],
}


def _allow_session_tokens(rgw: RGW) -> bool:
    """Let the user call GetSessionToken, and check once that it works."""
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    try:
        _client(rgw, "iam", None, "path", None).put_user_policy(
            UserName="backupfs", PolicyName="sts", PolicyDocument=json.dumps(_STS_POLICY)
        )
        return session_token(rgw, force=True) is not None
    except (BotoCoreError, ClientError) as e:
        log.warning("RGW: no STS (%s)", e)
        return False
