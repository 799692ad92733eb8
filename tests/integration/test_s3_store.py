"""A store in a real S3 server (Ceph RGW): index it in the bucket, mount it, restore from it.

Every request is signed by backupfs's own SigV4 signer and checked by RGW; the objects are
put there with botocore, an independent client.
"""

import datetime
import errno
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from backupfs.remote.s3 import AwsKeys, SigV4
from backupfs.remote.s3errors import s3_error
from tests.support.attachment import attach_env, attached
from tests.support.fsimages import PartSpec, make_fs_image
from tests.support.mounting import daemon_pids, mounted, run_cli, sha256_file
from tests.support.rgw import RGW, client, make_bucket, session_token, upload_tree
from tests.support.trees import make_tree

SNAP1, SNAP2 = "web01/2026-11-20T0300Z", "web01/2026-11-21T0300Z"


@dataclass(frozen=True)
class Bucket:
    rgw: RGW
    name: str
    url: str  # s3://name/store/
    options: str  # -o value: endpoint, region, credentials_file
    credentials: Path
    local: Path  # what was uploaded
    sha: dict[str, str]  # store path -> SHA-256 of the image
    tree_sha: dict[str, str]  # file in the ext4 image -> SHA-256


def write_credentials(path: Path, access: str, secret: str, token: str | None = None) -> Path:
    lines = ["[default]", f"aws_access_key_id = {access}", f"aws_secret_access_key = {secret}"]
    if token:
        lines.append(f"aws_session_token = {token}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def s3_options(rgw: RGW, credentials: Path, *extra: str) -> str:
    return ",".join((f"endpoint={rgw.endpoint}", f"region={rgw.region}",
                     f"credentials_file={credentials}", *extra))  # fmt: skip


@pytest.fixture(scope="module")
def bucket(rgw: RGW, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    work = tmp_path_factory.mktemp("s3store")
    local = work / "store"
    tree_sha = make_tree(work / "tree", seed=17, files=30, special=False)
    image = local / SNAP1 / "disk0.img"
    image.parent.mkdir(parents=True)
    make_fs_image(image, PartSpec("ext4", 64, tree=work / "tree"))
    second = local / SNAP2 / "disk0.img"
    second.parent.mkdir(parents=True)
    second.write_bytes(os.urandom(5 << 20) + bytes(3 << 20))  # data, then zeros
    sha = {f"{SNAP1}/disk0.img": sha256_file(image), f"{SNAP2}/disk0.img": sha256_file(second)}
    name = f"bfs-{uuid.uuid4().hex[:12]}"
    make_bucket(rgw, name)
    upload_tree(rgw, local, name, "store")
    creds = write_credentials(work / "aws", rgw.access_key, rgw.secret_key)
    yield Bucket(rgw, name, f"s3://{name}/store/", s3_options(rgw, creds), creds, local, sha,
                 tree_sha)  # fmt: skip


@pytest.fixture(scope="module")
def indexed(bucket: Bucket) -> Bucket:
    result = run_cli("index", bucket.url, "-o", bucket.options)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("hashing ") == 2
    assert "indexed 2 snapshots, 2 disks" in result.stdout
    keys = [o["Key"] for o in client(bucket.rgw).list_objects_v2(
        Bucket=bucket.name, Prefix="store/")["Contents"]]  # fmt: skip
    assert "store/backupfs-store.json" in keys
    assert f"store/{SNAP1}/.backupfs/disk0.img.sha256" in keys
    return bucket


def test_index_in_the_bucket_and_mount_it(indexed: Bucket, mnt: Path) -> None:
    listing = run_cli("ls", "--json", indexed.url, "-o", indexed.options)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert {f"{r['host']}/{r['snapshot']}/{r['disk']}" for r in rows} == set(indexed.sha)
    with mounted(indexed.url, mnt, indexed.options):
        for rel, digest in indexed.sha.items():
            assert sha256_file(mnt / rel) == digest
        stats = json.loads((mnt / ".backupfs" / "stats").read_text())
        assert stats["verify_failures"] == 0 and stats["unverified_disks"] == 0
        assert stats["zero_bytes"] >= 3 << 20  # the digests said so: not fetched
        [pid] = daemon_pids(mnt)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert indexed.rgw.secret_key.encode() not in cmdline
        assert indexed.rgw.secret_key not in json.dumps(stats)


def test_a_second_index_hashes_only_what_is_new(indexed: Bucket) -> None:
    extra = indexed.local / "web02/2026-11-22T0300Z/disk0.img"
    extra.parent.mkdir(parents=True)
    extra.write_bytes(os.urandom(1 << 20))
    key = "store/web02/2026-11-22T0300Z/disk0.img"
    client(indexed.rgw).put_object(Bucket=indexed.name, Key=key, Body=extra.read_bytes())
    result = run_cli("index", indexed.url, "-o", indexed.options)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("hashing ") == 1
    assert "hashing web02/2026-11-22T0300Z/disk0.img" in result.stdout
    assert "indexed 3 snapshots" in result.stdout


def test_attach_and_restore_a_tree_from_the_bucket(
    indexed: Bucket, mnt: Path, tmp_path: Path
) -> None:
    env = attach_env(tmp_path / "run")
    dest = tmp_path / "restored"
    with mounted(indexed.url, mnt, indexed.options), attached(
        mnt / SNAP1 / "disk0.img", tmp_path / "att", env
    ) as att:
        result = run_cli("restore", str(att.target / "p0"), str(dest), env=env)
        assert result.returncode == 0, result.stderr
    got = {str(p.relative_to(dest)): sha256_file(p) for p in dest.rglob("*")
           if p.is_file() and not p.is_symlink()}  # fmt: skip
    got.pop("lost+found", None)
    assert got == indexed.tree_sha


def one_line_failure(url: str, options: str) -> str:
    result = run_cli("ls", url, "-o", options)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_wrong_secret_is_one_line_and_never_shown(indexed: Bucket, tmp_path: Path) -> None:
    wrong = "x" + indexed.rgw.secret_key[1:]
    creds = write_credentials(tmp_path / "aws", indexed.rgw.access_key, wrong)
    line = one_line_failure(indexed.url, s3_options(indexed.rgw, creds))
    assert "SignatureDoesNotMatch" in line and "credentials_file=" in line
    assert wrong not in line and indexed.rgw.access_key in Path(creds).read_text()


def test_an_unknown_key_and_a_missing_bucket_are_one_line(indexed: Bucket, tmp_path: Path) -> None:
    creds = write_credentials(tmp_path / "aws", "NOSUCHKEY0000000000", "secret")
    line = one_line_failure(indexed.url, s3_options(indexed.rgw, creds))
    assert "InvalidAccessKeyId" in line
    line = one_line_failure("s3://no-such-bucket-here/store/", indexed.options)
    assert "NoSuchBucket" in line
    line = one_line_failure(f"s3://{indexed.name}/nothing-here/", indexed.options)
    assert "NoSuchKey" in line and "--no-index" in line


def test_session_tokens(indexed: Bucket, tmp_path: Path) -> None:
    """Temporary keys work with their token; a token that is not the one issued is refused
    in one line that shows neither it nor the secret. (RGW's gateway with STS on answers
    AccessDenied to any failed authentication, so the code there is not ExpiredToken.)"""
    temporary = session_token(indexed.rgw)
    if temporary is None:
        pytest.skip("RGW's STS is not enabled here")
    access, secret, token = temporary
    rgw = indexed.rgw
    good = write_credentials(tmp_path / "good", access, secret, token)
    options = s3_options(rgw, good).replace(rgw.endpoint, rgw.sts_endpoint)
    listing = run_cli("ls", indexed.url, "-o", options)
    assert listing.returncode == 0, listing.stderr
    bad = write_credentials(tmp_path / "bad", access, secret, token[:-8] + "AAAAAAAA")
    line = one_line_failure(indexed.url, options.replace(str(good), str(bad)))
    assert "AccessDenied" in line or "InvalidToken" in line or "ExpiredToken" in line
    assert token not in line and secret not in line
    line = one_line_failure(indexed.url, s3_options(rgw, good))  # no STS: key unknown
    assert "InvalidAccessKeyId" in line


def test_no_index_from_the_bucket_listing(bucket: Bucket, mnt: Path) -> None:
    listing = run_cli("ls", "--json", "--no-index", bucket.url, "-o", bucket.options)
    assert listing.returncode == 0, listing.stderr
    found = {f"{r['host']}/{r['snapshot']}/{r['disk']}" for r in json.loads(listing.stdout)}
    assert set(bucket.sha) <= found
    with mounted(bucket.url, mnt, bucket.options, "no_index"):
        for rel, digest in bucket.sha.items():
            assert sha256_file(mnt / rel) == digest
        stats = json.loads((mnt / ".backupfs" / "stats").read_text())
        assert stats["unverified_disks"] >= 2


def test_an_object_replaced_under_an_unindexed_mount_gives_eio(bucket: Bucket, mnt: Path) -> None:
    key = "store/web03/2026-11-23T0300Z/disk0.img"
    s3 = client(bucket.rgw)
    s3.put_object(Bucket=bucket.name, Key=key, Body=os.urandom(24 << 20))
    options = (bucket.options, "no_index", "cache_size=32M", "readahead=1M", "fill=off")
    with mounted(bucket.url, mnt, *options):
        path = mnt / "web03/2026-11-23T0300Z/disk0.img"
        with open(path, "rb") as f:
            f.read(64 << 10)
        s3.put_object(Bucket=bucket.name, Key=key, Body=os.urandom(24 << 20))  # a new ETag
        with open(path, "rb") as f, pytest.raises(OSError) as caught:
            f.seek(20 << 20)
            f.read(64 << 10)
        assert caught.value.errno == errno.EIO
    s3.delete_object(Bucket=bucket.name, Key=key)


def test_a_skewed_clock_is_named_in_the_line(bucket: Bucket) -> None:
    """RGW's own reply to a request signed 20 minutes in the past, through our mapping."""
    keys = AwsKeys(bucket.rgw.access_key, bucket.rgw.secret_key)
    request = httpx.Request("GET", f"{bucket.rgw.endpoint}/{bucket.name}/store/{SNAP2}/disk0.img")
    skewed = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=20)
    SigV4(keys, bucket.rgw.region).sign(request, skewed)
    with httpx.Client() as http:
        reply = http.send(request)
    error = s3_error(reply.status_code, reply.content)
    assert error is not None and str(error).startswith("RequestTimeTooSkewed: ")
    assert "clock" in str(error)


def test_the_log_holds_no_secret(indexed: Bucket, mnt: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "backupfs.log"
    with mounted(indexed.url, mnt, indexed.options, "debug", f"log_file={log_file}"):
        assert sha256_file(mnt / SNAP2 / "disk0.img") == indexed.sha[f"{SNAP2}/disk0.img"]
    text = log_file.read_text()
    assert "GET" in text or "mounted" in text  # the log was written
    assert indexed.rgw.secret_key not in text
    assert "Signature=" not in text and "Authorization" not in text
