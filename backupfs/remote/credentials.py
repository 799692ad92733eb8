"""Credentials and TLS settings, read once at mount time, before the daemon forks.

Only file paths travel on the command line; the secrets they hold live in one
`Credentials` object whose repr shows none of them.

Plain http:// carries a token or a password in clear, and lets anyone on the network path
forge the catalogue (digests included): credentials over it are refused unless
`allow_http` is given, and plain http gets a warning in any case. A loopback address
(127.0.0.0/8, ::1, localhost) is exempt from both: its traffic never leaves the host and
only root can watch it (a local TLS tunnel or proxy is the usual reason for one).
"""

import base64
import ipaddress
import netrc
import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from backupfs.errors import UsageError, UserError
from backupfs.options import MountOptions
from backupfs.remote import aws_credentials
from backupfs.remote.s3 import AwsKeys, SigV4

PLAIN_HTTP_WARNING = (
    "plain http://: anyone on the network path can read and alter what the store sends "
    "(use https://)"
)


@dataclass(frozen=True, eq=False)
class Credentials:
    token: str | None = field(default=None, repr=False)  # bearer token (token_file=)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)  # login, password
    ssl_context: ssl.SSLContext = field(default_factory=ssl.create_default_context, repr=False)
    warnings: tuple[str, ...] = ()  # one line each, for stderr and the daemon's log
    aws: AwsKeys | None = field(default=None, repr=False)  # s3:// stores: requests signed
    region: str = aws_credentials.DEFAULT_REGION

    def auth(self) -> httpx.Auth | None:
        """What signs each request: SigV4 for an S3 store, nothing otherwise."""
        return None if self.aws is None else SigV4(self.aws, self.region)

    def headers(self) -> dict[str, str]:
        if self.token is not None:
            return {"Authorization": f"Bearer {self.token}"}
        if self.basic_auth is not None:
            pair = ":".join(self.basic_auth).encode()
            return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
        return {}


_S3_ONLY = ("credentials_file", "endpoint", "region", "profile")


def load_credentials(opts: MountOptions, url: str, s3: bool = False) -> Credentials:
    """Read every credential file `opts` names; errors are one-line UserErrors. `s3`: the
    store is a bucket (`url` its HTTP(S) form), so its requests are signed."""
    warnings: list[str] = []
    if not s3:
        given = [name for name in _S3_ONLY if getattr(opts, name) is not None]
        if given or opts.addressing != "auto":
            raise UsageError(f"-o {(given or ['addressing'])[0]}= applies to s3:// URLs only")
    _check_transport(opts, url, warnings, s3)
    if s3:
        if opts.credentials_file is not None:
            path = opts.credentials_file
            text = _read_secret("credentials_file", path, warnings)
            keys = aws_credentials.from_file(text, path, opts.profile)
        else:
            keys = aws_credentials.from_environment_or_profile(opts.profile)
        region = aws_credentials.region_for(opts.region, opts.profile)
        ssl_context = _ssl_context(opts, warnings)
        return Credentials(None, None, ssl_context, tuple(warnings), keys, region)
    token = basic_auth = None
    if opts.token_file is not None:
        token = _read_token(_read_secret("token_file", opts.token_file, warnings), opts.token_file)
    if opts.netrc is not None:
        _read_secret("netrc", opts.netrc, warnings)  # one-line errors and the mode check
        basic_auth = _netrc_login(opts.netrc, urlsplit(url).hostname or "")
    ssl_context = _ssl_context(opts, warnings)
    return Credentials(token, basic_auth, ssl_context, tuple(warnings))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_transport(opts: MountOptions, url: str, warnings: list[str], s3: bool) -> None:
    """Refuse credentials over plain http:// unless `allow_http`; warn of plain http."""
    parts = urlsplit(url)
    if parts.scheme != "http" or _is_loopback(parts.hostname or ""):
        return
    named = [name for name, path in (("token_file=", opts.token_file), ("netrc=", opts.netrc))
             if path is not None]  # fmt: skip
    if named and not opts.allow_http:
        raise UsageError(
            f"{named[0]} over plain http:// would send the secret in clear: "
            "use https:// (or -o allow_http to send it anyway)"
        )
    if s3 and not opts.allow_http:
        raise UsageError(
            "S3 credentials over plain http://: signed requests (and a session token) could be "
            "read and replayed on the way: use an https:// endpoint= (or -o allow_http)"
        )
    warnings.append(PLAIN_HTTP_WARNING)


def _read_token(text: str, path: Path) -> str:
    token = text.strip()
    if not token or any(c.isspace() for c in token):
        raise UserError(f"token_file {path}: expected one token on one line")
    return token


def _read_text(option: str, path: Path) -> tuple[str, int]:
    """The file's text and mode."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as exc:
        raise UserError(f"cannot read {option} {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8"), mode
    except UnicodeDecodeError:
        raise UserError(f"{option} {path}: not a text file") from None


def _read_secret(option: str, path: Path, warnings: list[str]) -> str:
    text, mode = _read_text(option, path)
    _check_private(option, path, mode, warnings)
    return text


def _check_private(option: str, path: Path, mode: int, warnings: list[str]) -> None:
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(f"{option} {path} is readable by group or others; chmod 600 it")


def _netrc_login(path: Path, host: str) -> tuple[str, str]:
    try:
        entries = netrc.netrc(os.fspath(path))
    except netrc.NetrcParseError as exc:  # its message may quote a secret: leave it out
        raise UserError(f"netrc {path}: malformed at line {exc.lineno}") from None
    except OSError as exc:
        raise UserError(f"cannot read netrc {path}: {exc.strerror}") from None
    entry = entries.authenticators(host)
    if entry is None:
        raise UserError(f"netrc {path} has no entry for {host} (nor a default entry)")
    login, _, password = entry
    if not login:
        raise UserError(f"netrc {path}: the entry for {host} has no login")
    if ":" in login:
        raise UserError(f"netrc {path}: the login for {host} contains ':' (basic auth forbids it)")
    return login, password or ""


def _ssl_context(opts: MountOptions, warnings: list[str]) -> ssl.SSLContext:
    if opts.cafile is not None:
        ca_text = _read_text("cafile", opts.cafile)[0]
        try:
            ctx = ssl.create_default_context(cadata=ca_text)
        except (ssl.SSLError, ValueError):
            raise UserError(f"cafile {opts.cafile}: no PEM certificate in it") from None
    else:
        ctx = ssl.create_default_context()  # the system store (SSL_CERT_FILE/DIR honoured)
    if opts.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        warnings.append("insecure: TLS certificate verification is off")
    if opts.cert is not None:
        _load_client_cert(ctx, opts.cert, opts.key, warnings)
    return ctx


class _EncryptedKey(Exception):
    pass


def _ask_passphrase() -> str:
    """OpenSSL would prompt on the terminal, and a daemon has none: refuse instead."""
    raise _EncryptedKey


def _load_client_cert(
    ctx: ssl.SSLContext, cert: Path, key: Path | None, warnings: list[str]
) -> None:
    cert_text, cert_mode = _read_text("cert", cert)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise UserError(f"cert {cert}: no PEM certificate in it")
    if "PRIVATE KEY-----" in cert_text:
        _check_private("cert", cert, cert_mode, warnings)
    if key is not None:
        if "PRIVATE KEY-----" not in _read_secret("key", key, warnings):
            raise UserError(f"key {key}: no PEM private key in it")
    elif "PRIVATE KEY-----" not in cert_text:
        raise UserError(f"cert {cert} holds no private key; name it with -o key=")
    key_file = key or cert
    try:
        ctx.load_cert_chain(cert, key, password=_ask_passphrase)
    except _EncryptedKey:
        raise UserError(f"key {key_file} is encrypted; backupfs needs it unencrypted") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise UserError(f"key {key_file} does not match cert {cert}") from None
        detail = exc.reason or "not PEM"
        raise UserError(f"cert {cert} with key {key_file}: unusable ({detail})") from None
    except OSError as exc:
        raise UserError(f"cannot read cert {cert}: {exc.strerror}") from None
