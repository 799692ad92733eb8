"""Plain http:// and credentials (backupfs.remote.credentials): a token or password is not
sent in clear unless `-o allow_http` says so, and plain http is warned about in any case.
Loopback addresses are exempt: their traffic never leaves the host."""

from pathlib import Path

import pytest

from backupfs.errors import EXIT_USAGE, UsageError
from backupfs.options import MountOptions, parse_options
from backupfs.remote.credentials import Credentials, load_credentials
from tests.support.mounting import run_cli

HTTP = "http://backups.example/store/"
TOKEN = "tok-0123456789abcdef"
WARNING = (
    "plain http://: anyone on the network path can read and alter what the store sends "
    "(use https://)"
)


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine backups.example login alice password pw\n")
    for path in (token, netrc):
        path.chmod(0o600)
    return {"token_file": f"token_file={token}", "netrc": f"netrc={netrc}"}


def _load(url: str, *options: str) -> Credentials:
    return load_credentials(parse_options([",".join(options)]), url)


@pytest.mark.parametrize("kind", ["token_file", "netrc"])
def test_credentials_over_plain_http_are_refused(secrets: dict[str, str], kind: str) -> None:
    with pytest.raises(UsageError) as info:
        _load(HTTP, secrets[kind])
    assert str(info.value) == (
        f"{kind}= over plain http:// would send the secret in clear: "
        "use https:// (or -o allow_http to send it anyway)"
    )
    assert info.value.exit_code == EXIT_USAGE


def test_allow_http_sends_them_with_a_warning(secrets: dict[str, str]) -> None:
    creds = _load(HTTP, secrets["token_file"], "allow_http")
    assert creds.headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert creds.warnings == (WARNING,)
    creds = _load(HTTP, secrets["netrc"], "allow_http")
    assert creds.basic_auth == ("alice", "pw") and creds.warnings == (WARNING,)


def test_plain_http_without_credentials_is_warned_about() -> None:
    assert _load(HTTP).warnings == (WARNING,)
    assert _load("http://192.0.2.7:8080/s/").warnings == (WARNING,)


def test_https_is_not_warned_about(secrets: dict[str, str]) -> None:
    assert _load("https://backups.example/store/", secrets["token_file"]).warnings == ()


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/", "http://127.3.4.5/s/", "http://[::1]:80/", "http://localhost/"],
)
def test_loopback_is_exempt(secrets: dict[str, str], url: str) -> None:
    creds = load_credentials(parse_options([secrets["token_file"]]), url)
    assert creds.token == TOKEN and creds.warnings == ()


def test_allow_http_is_a_flag() -> None:
    assert parse_options(["allow_http"]) == MountOptions(allow_http=True)
    with pytest.raises(UsageError, match="^mount option 'allow_http' takes no value$"):
        parse_options(["allow_http=1"])


@pytest.mark.parametrize("command", ["ls", "mount"])
def test_the_cli_refuses_in_one_line_before_connecting(
    secrets: dict[str, str], tmp_path: Path, command: str
) -> None:
    """192.0.2.0/24 is TEST-NET-1: nothing answers there, so only an early refusal is fast."""
    url = "http://192.0.2.1/store/"
    args = ["-o", f"{secrets['token_file']},timeout=1,retries=0", url]
    if command == "mount":
        (tmp_path / "mnt").mkdir()
        args.append(str(tmp_path / "mnt"))
    result = run_cli(command, *args, timeout=30)
    assert result.returncode == EXIT_USAGE, result
    assert result.stdout == ""
    assert result.stderr == (
        "backupfs: token_file= over plain http:// would send the secret in clear: "
        "use https:// (or -o allow_http to send it anyway)\n"
    )
