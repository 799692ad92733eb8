"""s3:// URLs to base URLs, and where keys and regions come from (the AWS CLI's order)."""

from pathlib import Path

import pytest

from backupfs.errors import UsageError, UserError
from backupfs.options import parse_options
from backupfs.remote.aws_credentials import from_environment_or_profile, from_file, region_for
from backupfs.remote.s3 import base_url, endpoint_of, parse_s3_url
from backupfs.remote.target import open_target

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    monkeypatch.delenv("AWS_CONFIG_FILE", raising=False)
    return home


def test_addressing_path_virtual_and_auto() -> None:
    loc = parse_s3_url("s3://backups/store/x")
    assert loc.bucket == "backups" and loc.prefix == "store/x/"
    aws = endpoint_of(None, "eu-west-1")
    assert aws == "https://s3.eu-west-1.amazonaws.com"
    assert base_url(loc, aws, "auto") == "https://backups.s3.eu-west-1.amazonaws.com/store/x/"
    rgw = endpoint_of("http://127.0.0.1:7480/", "us-east-1")
    assert base_url(loc, rgw, "auto") == "http://127.0.0.1:7480/backups/store/x/"
    assert base_url(loc, rgw, "virtual") == "http://backups.127.0.0.1:7480/store/x/"
    dotted = parse_s3_url("s3://my.backups/")
    assert base_url(dotted, aws, "auto") == "https://s3.eu-west-1.amazonaws.com/my.backups/"
    with pytest.raises(UsageError, match="addressing=path"):
        base_url(dotted, aws, "virtual")


@pytest.mark.parametrize(
    "url, message",
    [("s3://ab/", "not an S3 bucket name"), ("s3://a b/x", "not an S3 bucket name"),
     ("s3://bucket/a/../b", "component"), ("s3://key:secret@bucket/", "not an S3 bucket")],
)  # fmt: skip
def test_bad_s3_urls_are_one_line(url: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_s3_url(url)


def test_bad_endpoints() -> None:
    for endpoint in ("ftp://h", "http://h/bucket", "http://u:p@h", "host-only"):
        with pytest.raises(UsageError):
            endpoint_of(endpoint, "us-east-1")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_keys_follow_the_aws_cli_order(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws = clean_environment / ".aws"
    write(aws / "credentials", "[default]\naws_access_key_id = FILEKEY\n"
          "aws_secret_access_key = filesecret\n[prod]\naws_access_key_id = PRODKEY\n"
          "aws_secret_access_key = prodsecret\naws_session_token = tok\n")  # fmt: skip
    write(aws / "config", "[profile cfg]\naws_access_key_id = CFGKEY\n"
          "aws_secret_access_key = cfgsecret\nregion = ap-south-1\n")  # fmt: skip
    assert from_environment_or_profile(None).access_key == "FILEKEY"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    assert from_environment_or_profile(None).access_key == "ENVKEY"
    prod = from_environment_or_profile("prod")  # profile= beats the variables
    assert (prod.access_key, prod.session_token) == ("PRODKEY", "tok")
    assert from_environment_or_profile("cfg").access_key == "CFGKEY"
    assert region_for(None, "cfg") == "ap-south-1"
    assert region_for("eu-west-3", "cfg") == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "sa-east-1")
    assert region_for(None, "cfg") == "sa-east-1"
    with pytest.raises(UserError, match="no keys for profile nope"):
        from_environment_or_profile("nope")


def test_no_keys_anywhere_is_one_line() -> None:
    with pytest.raises(UserError, match="no S3 credentials"):
        from_environment_or_profile(None)


def test_a_credentials_file_is_checked_and_its_secret_never_in_messages(tmp_path: Path) -> None:
    path = tmp_path / "aws"
    keys = from_file("[default]\naws_access_key_id = K\naws_secret_access_key = S3CR3T\n",
                     path, None)  # fmt: skip
    assert keys.secret_key == "S3CR3T" and "S3CR3T" not in repr(keys)
    with pytest.raises(UserError, match=r"\[default\] has no aws_secret_access_key"):
        from_file("[default]\naws_access_key_id = K\n", path, None)
    with pytest.raises(UserError, match="malformed") as caught:
        from_file("aws_secret_access_key = S3CR3T\n", path, None)
    assert "S3CR3T" not in str(caught.value)
    with pytest.raises(UserError, match=r"no \[other\] section"):
        from_file("[default]\naws_access_key_id = K\naws_secret_access_key = S\n", path, "other")


def test_open_target_for_s3_reads_the_file_and_warns_of_its_mode(tmp_path: Path) -> None:
    creds = tmp_path / "aws"
    creds.write_text("[default]\naws_access_key_id = K\naws_secret_access_key = S\n")
    creds.chmod(0o644)
    opts = parse_options([f"endpoint=http://127.0.0.1:7480,credentials_file={creds}"])
    target = open_target("s3://backups/store", opts)
    assert target.url == "http://127.0.0.1:7480/backups/store/"
    assert target.bucket_url == "http://127.0.0.1:7480/backups/"
    assert target.shown == "s3://backups/store/"
    assert target.creds.aws is not None and target.creds.auth() is not None
    assert any("chmod 600" in w for w in target.creds.warnings)


def test_s3_options_and_plain_http(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="applies to s3:// URLs only"):
        open_target("https://store.example/", parse_options(["region=eu-west-1"]))
    creds = write(tmp_path / "aws", "[default]\naws_access_key_id = K\naws_secret_access_key = S\n")
    remote = parse_options([f"endpoint=http://rgw.example:7480,credentials_file={creds}"])
    with pytest.raises(UsageError, match="replayed"):
        open_target("s3://backups/store/", remote)
    with pytest.raises(UsageError, match="do not apply to s3://"):
        open_target("s3://backups/store/", parse_options([f"token_file={creds}"]))
