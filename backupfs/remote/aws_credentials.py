"""Where an s3:// store's keys and region come from, in the order the AWS CLI uses.

1. `-o credentials_file=FILE`: an AWS-style credentials file (INI; `[default]` or the
   `profile=` section), with the same mode check as token_file=;
2. `-o profile=NAME`: that profile of the shared files (3), even when AWS_* keys are set;
3. the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN;
4. the shared files: AWS_SHARED_CREDENTIALS_FILE (~/.aws/credentials), then
   AWS_CONFIG_FILE (~/.aws/config, sections `[profile NAME]` and `[default]`), for
   AWS_PROFILE or `default`.

Only static keys (with an optional session token) are read: role assumption, SSO and
credential_process are the AWS CLI's business (`aws configure export-credentials
--format env` turns them into variables). The region: `region=`, else AWS_REGION or
AWS_DEFAULT_REGION, else the profile's `region` in the config file, else us-east-1.
"""

import configparser
import os
from pathlib import Path

from backupfs.errors import UserError
from backupfs.remote.s3 import AwsKeys

DEFAULT_REGION = "us-east-1"
NO_KEYS = (
    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or -o credentials_file= (a public bucket can be read by its https:// URL)"
)


def _parse_ini(text: str, path: Path, option: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:  # its message may quote a line, a secret: leave it out
        line = getattr(exc, "lineno", None)
        where = f" at line {line}" if line else ""
        raise UserError(f"{option} {path}: malformed{where} (not an AWS-style INI file)") from None
    return parser


def _keys_in(
    parser: configparser.ConfigParser, section: str, source: str
) -> AwsKeys | None:
    if not parser.has_section(section):
        return None
    entry = parser[section]
    access, secret = entry.get("aws_access_key_id"), entry.get("aws_secret_access_key")
    if not access and not secret:
        return None
    if not access or not secret:
        missing = "aws_secret_access_key" if access else "aws_access_key_id"
        raise UserError(f"{source}: [{section}] has no {missing}")
    return AwsKeys(access.strip(), secret.strip(), entry.get("aws_session_token") or None, source)


def _profile_sections(profile: str, config_file: bool) -> list[str]:
    if not config_file or profile == "default":
        return [profile]
    return [f"profile {profile}"]


def _home_file(variable: str, name: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / ".aws" / name


def _read_shared(path: Path, option: str) -> configparser.ConfigParser | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not a text file"
        raise UserError(f"cannot read {option} {path}: {reason}") from None
    return _parse_ini(text, path, option)


def from_file(text: str, path: Path, profile: str | None) -> AwsKeys:
    """The keys of `profile` (or default) in a credentials_file= file."""
    section = profile or "default"
    keys = _keys_in(_parse_ini(text, path, "credentials_file"), section,
                    f"credentials_file {path}")  # fmt: skip
    if keys is None:
        raise UserError(f"credentials_file {path} has no [{section}] section with keys")
    return keys


def from_environment_or_profile(profile: str | None) -> AwsKeys:
    """Keys by the AWS CLI's order (the module's docstring), without credentials_file=."""
    env = os.environ
    if profile is None and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None
        return AwsKeys(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], token,
                       "AWS_ACCESS_KEY_ID")  # fmt: skip
    name = profile or env.get("AWS_PROFILE") or "default"
    for variable, file_name, is_config in (
        ("AWS_SHARED_CREDENTIALS_FILE", "credentials", False),
        ("AWS_CONFIG_FILE", "config", True),
    ):
        path = _home_file(variable, file_name)
        parser = _read_shared(path, "AWS file")
        if parser is None:
            continue
        for section in _profile_sections(name, is_config):
            keys = _keys_in(parser, section, str(path))
            if keys is not None:
                return keys
    if profile is not None or env.get("AWS_PROFILE"):
        raise UserError(f"no keys for profile {name} in ~/.aws/credentials or ~/.aws/config")
    raise UserError(NO_KEYS)


def region_for(option: str | None, profile: str | None) -> str:
    if option:
        return option
    env = os.environ
    if env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
        return env.get("AWS_REGION") or env["AWS_DEFAULT_REGION"]
    name = profile or env.get("AWS_PROFILE") or "default"
    parser = _read_shared(_home_file("AWS_CONFIG_FILE", "config"), "AWS file")
    if parser is not None:
        for section in _profile_sections(name, True):
            if parser.has_section(section) and parser[section].get("region"):
                return parser[section]["region"].strip()
    return DEFAULT_REGION
