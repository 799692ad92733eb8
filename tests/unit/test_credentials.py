"""Credential loading in backupfs.remote.credentials, with real files and openssl-made keys."""

import base64
import ssl
import subprocess
from pathlib import Path

import pytest

from backupfs.errors import UserError
from backupfs.options import parse_options
from backupfs.remote.credentials import Credentials, load_credentials
from tests.support.nginx import Pki, make_pki

URL = "https://backups.example:8443/store/"
TOKEN = "tok-0123456789abcdef"
PASSWORD = "hunter2 with spaces"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _load(*options: str) -> Credentials:
    return load_credentials(parse_options([",".join(options)]), URL)


def _error(*options: str) -> str:
    with pytest.raises(UserError) as info:
        _load(*options)
    return str(info.value)


def test_no_options_verify_against_the_system_store() -> None:
    creds = _load()
    assert creds.headers() == {} and creds.warnings == ()
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert creds.ssl_context.check_hostname


def test_token_file(tmp_path: Path) -> None:
    token_file = _file(tmp_path / "token", f"  {TOKEN}\n")
    creds = _load(f"token_file={token_file}")
    assert creds.headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert creds.warnings == ()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_readable_token_file_is_loaded_with_a_warning(tmp_path: Path, mode: int) -> None:
    token_file = _file(tmp_path / "token", TOKEN, mode)
    creds = _load(f"token_file={token_file}")
    assert creds.token == TOKEN
    assert creds.warnings == (
        f"token_file {token_file} is readable by group or others; chmod 600 it",
    )


@pytest.mark.parametrize("text", ["", "\n", "two tokens\n", "a\nb\n"])
def test_a_token_file_holds_one_token(tmp_path: Path, text: str) -> None:
    token_file = _file(tmp_path / "token", text)
    assert _error(f"token_file={token_file}") == (
        f"token_file {token_file}: expected one token on one line"
    )


def test_unreadable_files_name_the_option(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "missing"
    for option in ("token_file", "netrc", "cafile"):
        assert _error(f"{option}={missing}") == (
            f"cannot read {option} {missing}: No such file or directory"
        )
    assert _error(f"cert={missing}") == f"cannot read cert {missing}: No such file or directory"
    assert _error(f"cert={pki.client_cert},key={missing}") == (
        f"cannot read key {missing}: No such file or directory"
    )
    assert _error(f"cafile={tmp_path}") == f"cannot read cafile {tmp_path}: Is a directory"
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    assert _error(f"token_file={binary}") == f"token_file {binary}: not a text file"


def test_netrc_entry_for_the_host_gives_basic_auth(tmp_path: Path) -> None:
    netrc = _file(
        tmp_path / "netrc",
        "machine other.example login bob password nope\n"
        f'machine backups.example login alice password "{PASSWORD}"\n',
    )
    creds = _load(f"netrc={netrc}")
    assert creds.basic_auth == ("alice", PASSWORD)
    pair = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert creds.headers() == {"Authorization": f"Basic {pair}"}
    assert creds.warnings == ()


def test_netrc_default_entry_and_warning(tmp_path: Path) -> None:
    netrc = _file(tmp_path / "netrc", "default login carol password pw\n", 0o644)
    creds = _load(f"netrc={netrc}")
    assert creds.basic_auth == ("carol", "pw")
    assert creds.warnings == (f"netrc {netrc} is readable by group or others; chmod 600 it",)


def test_netrc_without_an_entry_for_the_host(tmp_path: Path) -> None:
    netrc = _file(tmp_path / "netrc", "machine other.example login bob password nope\n")
    assert _error(f"netrc={netrc}") == (
        f"netrc {netrc} has no entry for backups.example (nor a default entry)"
    )


def test_malformed_netrc_does_not_quote_it(tmp_path: Path) -> None:
    netrc = _file(tmp_path / "netrc", f"machine backups.example login alice\n{PASSWORD}\n")
    message = _error(f"netrc={netrc}")
    assert message == f"netrc {netrc}: malformed at line 2"
    assert "hunter2" not in message


def test_cafile_replaces_the_system_store(tmp_path: Path, pki: Pki) -> None:
    creds = _load(f"cafile={pki.ca_cert}")
    assert creds.ssl_context.cert_store_stats()["x509_ca"] == 1
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    junk = _file(tmp_path / "junk", "not a certificate\n")
    assert _error(f"cafile={junk}") == f"cafile {junk}: no PEM certificate in it"


def test_insecure_turns_verification_off_with_a_warning() -> None:
    creds = _load("insecure")
    assert creds.ssl_context.verify_mode == ssl.CERT_NONE
    assert not creds.ssl_context.check_hostname
    assert creds.warnings == ("insecure: TLS certificate verification is off",)


def test_client_certificate_and_key(tmp_path: Path, pki: Pki) -> None:
    assert _load(f"cert={pki.client_cert},key={pki.client_key}").warnings == ()
    assert _load(f"cert={pki.client_pem}").warnings == ()
    readable_pem = _file(tmp_path / "both.pem", pki.client_pem.read_text(), 0o644)
    assert _load(f"cert={readable_pem}").warnings == (
        f"cert {readable_pem} is readable by group or others; chmod 600 it",
    )
    # A certificate alone is public: no warning for it; the key gets one.
    readable_key = _file(tmp_path / "client.key", pki.client_key.read_text(), 0o640)
    assert pki.client_cert.stat().st_mode & 0o044
    assert _load(f"cert={pki.client_cert},key={readable_key}").warnings == (
        f"key {readable_key} is readable by group or others; chmod 600 it",
    )


def test_client_certificate_errors(tmp_path: Path, pki: Pki) -> None:
    cert, key = pki.client_cert, pki.client_key
    assert _error(f"cert={cert}") == f"cert {cert} holds no private key; name it with -o key="
    assert _error(f"cert={key},key={key}") == f"cert {key}: no PEM certificate in it"
    assert _error(f"cert={cert},key={cert}") == f"key {cert}: no PEM private key in it"
    assert _error(f"cert={cert},key={pki.server_key}") == (
        f"key {pki.server_key} does not match cert {cert}"
    )
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:xyz"]
        + ["-out", str(encrypted)],
        check=True,
        timeout=60,
    )
    encrypted.chmod(0o600)
    # Never a passphrase prompt: a daemon has no terminal.
    assert _error(f"cert={cert},key={encrypted}") == (
        f"key {encrypted} is encrypted; backupfs needs it unencrypted"
    )


def test_repr_shows_no_secret(tmp_path: Path) -> None:
    token_creds = _load(f"token_file={_file(tmp_path / 'token', TOKEN)}")
    netrc = _file(tmp_path / "netrc", f'default login alice password "{PASSWORD}"\n')
    basic_creds = _load(f"netrc={netrc}")
    for creds in (token_creds, basic_creds):
        text = repr(creds)
        assert text.startswith("Credentials(")
        for secret in (TOKEN, "hunter2", "alice", base64.b64encode(b"alice:").decode()[:6]):
            assert secret not in text
