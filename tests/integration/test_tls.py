"""Credentials and TLS against a real nginx over HTTPS: a private CA, client certificates,
basic auth from a netrc file and a bearer token, none of which may leak."""

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.errors import EXIT_ERROR, EXIT_STORE
from tests.integration.conftest import NGINX_EXTRA, TOKEN, Store
from tests.support.mounting import daemon_pids, kill_daemons, mounted, run_cli, sha256_file
from tests.support.nginx import Nginx, Pki, Tls, basic_auth_location, htpasswd_line, make_pki
from tests.support.system import is_mounted, unmount

SMALL_REL = "web02/2026-11-19/data.img"
USER, PASSWORD = "alice", "pa55 w0rd-that-must-not-leak"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_url(store: Store, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session store over HTTPS: /private/ wants the bearer token, /basic/ basic auth."""
    work = tmp_path_factory.mktemp("nginx-tls")
    htpasswd = work / "htpasswd"
    htpasswd.write_text(htpasswd_line(USER, PASSWORD, work))
    extra = NGINX_EXTRA + basic_auth_location("/basic/", store.root, htpasswd)
    with Nginx(store.root, work, extra, Tls(pki.server_cert, pki.server_key)) as nginx:
        yield nginx.url


@pytest.fixture(scope="module")
def mtls_url(store: Store, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session store over HTTPS, for clients with a certificate signed by the test CA."""
    work = tmp_path_factory.mktemp("nginx-mtls")
    tls = Tls(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    with Nginx(store.root, work, tls=tls) as nginx:
        yield nginx.url


def _secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _one_line_error(*args: str, rc: int = EXIT_STORE) -> str:
    result = run_cli(*args)
    assert result.returncode == rc, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.removeprefix("backupfs: ").rstrip("\n")


def _read_back(store: Store, mnt: Path) -> None:
    assert sha256_file(mnt / SMALL_REL) == store.sha256[SMALL_REL]


def test_cafile_verifies_a_private_ca(store: Store, pki: Pki, tls_url: str, mnt: Path) -> None:
    with mounted(tls_url, mnt, f"cafile={pki.ca_cert}"):
        _read_back(store, mnt)
    result = run_cli("ls", "--json", "-o", f"cafile={pki.ca_cert}", tls_url)
    assert result.returncode == 0 and result.stderr == "", result
    assert SMALL_REL.split("/")[0] in result.stdout


def test_untrusted_certificate_fails_fast_with_one_line(pki: Pki, tls_url: str, mnt: Path) -> None:
    start = time.monotonic()
    # Eight retries of a transient failure would back off for 9 s or more.
    message = _one_line_error("mount", "-o", "retries=8", tls_url, str(mnt))
    assert time.monotonic() - start < 6
    assert message.startswith(
        f"cannot read {tls_url}backupfs-store.json: TLS certificate verification failed: "
    )
    assert message.endswith(" (use -o cafile= for a private CA)")
    assert not is_mounted(mnt)
    assert _one_line_error("ls", "-o", "retries=8", tls_url) == message
    # The right CA, the wrong name: the certificate is for 127.0.0.1 only.
    other_name = tls_url.replace("127.0.0.1", "localhost")
    assert _one_line_error("ls", "-o", f"cafile={pki.ca_cert}", other_name).endswith(
        ": Hostname mismatch, certificate is not valid for 'localhost' "
        "(use the host name or address the certificate names)"
    )


def test_a_cafile_of_another_ca_is_refused(tls_url: str, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    message = _one_line_error("ls", "-o", f"cafile={other.ca_cert}", tls_url)
    assert "TLS certificate verification failed" in message


def test_insecure_skips_verification_with_a_warning(
    store: Store, tls_url: str, mnt: Path, tmp_path: Path
) -> None:
    log_file = tmp_path / "daemon.log"
    try:
        result = run_cli("mount", "-o", f"insecure,log_file={log_file}", tls_url, str(mnt))
        assert result.returncode == 0, result.stderr
        assert result.stderr == "backupfs: warning: insecure: TLS certificate verification is off\n"
        _read_back(store, mnt)
        assert "insecure: TLS certificate verification is off" in log_file.read_text()
    finally:
        unmount(mnt, fuse=True)
        kill_daemons(mnt)


def test_client_certificate(store: Store, pki: Pki, mtls_url: str, mnt: Path) -> None:
    ca = f"cafile={pki.ca_cert}"
    with mounted(mtls_url, mnt, ca, f"cert={pki.client_cert}", f"key={pki.client_key}"):
        _read_back(store, mnt)
    # One file holding both certificate and key.
    result = run_cli("ls", "-o", f"{ca},cert={pki.client_pem}", mtls_url)
    assert result.returncode == 0 and result.stderr == "", result
    message = _one_line_error("mount", "-o", ca, mtls_url, str(mnt))
    assert message == (
        f"cannot read {mtls_url}backupfs-store.json: HTTP 400 "
        "(does the server want a client certificate? -o cert=,key=)"
    )
    assert not is_mounted(mnt)


def test_basic_auth_from_netrc(
    store: Store, pki: Pki, tls_url: str, mnt: Path, tmp_path: Path
) -> None:
    url = tls_url + "basic/"
    ca = f"cafile={pki.ca_cert}"
    netrc = _secret_file(
        tmp_path / "netrc",
        f"machine other.example login bob password nope\n"
        f'machine 127.0.0.1 login {USER} password "{PASSWORD}"\n',
    )
    log_file = tmp_path / "daemon.log"
    with mounted(url, mnt, ca, f"netrc={netrc}", "debug", f"log_file={log_file}") as proc:
        _read_back(store, mnt)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    log = log_file.read_bytes()
    assert b"HTTP Request: GET" in log  # the per-request trace is there...
    for secret in (PASSWORD.encode(), basic):  # ...without the secrets
        assert secret not in log and secret not in cmdline
    assert _one_line_error("mount", "-o", ca, url, str(mnt)) == (
        f"cannot read {url}backupfs-store.json: HTTP 401 (check -o netrc=)"
    )
    wrong = _secret_file(tmp_path / "wrong", f"default login {USER} password wrong\n")
    assert _one_line_error("ls", "-o", f"{ca},netrc={wrong}", url).endswith(
        "HTTP 401 (check -o netrc=)"
    )
    elsewhere = _secret_file(tmp_path / "elsewhere", "machine other.example login a password b\n")
    assert _one_line_error("ls", "-o", f"{ca},netrc={elsewhere}", url, rc=EXIT_ERROR) == (
        f"netrc {elsewhere} has no entry for 127.0.0.1 (nor a default entry)"
    )


def test_bearer_token_never_leaks(
    store: Store, pki: Pki, tls_url: str, mnt: Path, tmp_path: Path
) -> None:
    url = tls_url + "private/"
    ca = f"cafile={pki.ca_cert}"
    token_file = _secret_file(tmp_path / "token", TOKEN + "\n")
    log_file = tmp_path / "daemon.log"
    with mounted(url, mnt, ca, f"token_file={token_file}", "debug", f"log_file={log_file}") as proc:
        _read_back(store, mnt)
        with open(mnt / SMALL_REL, "rb") as f:  # some ranged reads besides the sequential one
            for offset in (0, 300_000, 700_000):
                assert len(os.pread(f.fileno(), 4096, offset)) == 4096
        assert TOKEN.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        stats = (mnt / ".backupfs" / "stats").read_bytes()
        assert b"bytes_served" in stats and TOKEN.encode() not in stats
    log = log_file.read_bytes()
    assert b"HTTP Request: GET" in log and b"206" in log
    assert TOKEN.encode() not in log
    assert _one_line_error("mount", "-o", ca, url, str(mnt)) == (
        f"cannot read {url}backupfs-store.json: HTTP 401 (check -o token_file=)"
    )


def test_group_readable_token_warns_and_relative_paths_survive_the_fork(
    store: Store, pki: Pki, tls_url: str, mnt: Path, tmp_path: Path
) -> None:
    """The background daemon does chdir("/"): relative paths are read before it forks."""
    _secret_file(tmp_path / "token", TOKEN + "\n", mode=0o644)
    (tmp_path / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    log_file = tmp_path / "daemon.log"
    url = tls_url + "private/"
    try:
        result = run_cli(
            "mount", "-o", f"token_file=token,cafile=ca.crt,log_file={log_file}", url, str(mnt),
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        token = tmp_path / "token"  # named by its absolute path: options are made absolute
        warning = f"token_file {token} is readable by group or others; chmod 600 it"
        assert result.stderr == f"backupfs: warning: {warning}\n"
        _read_back(store, mnt)
        assert len(daemon_pids(mnt)) == 1
        assert warning in log_file.read_text()
    finally:
        unmount(mnt, fuse=True)
        kill_daemons(mnt)
