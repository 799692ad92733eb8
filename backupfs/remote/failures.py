"""What an HTTP failure means to the user: one line naming the likely cause, and whether
another attempt could help (FetchError.transient)."""

import socket
import ssl
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from backupfs.errors import FetchError

_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


E = TypeVar("E", bound=BaseException)


def _cause(exc: BaseException, kind: type[E], depth: int = 0) -> E | None:
    """The first exception of type `kind` in the chain behind `exc` (looking into
    exception groups: trio tries each address of a host and groups the failures)."""
    seen: BaseException | None = exc
    while seen is not None and depth < 32:
        if isinstance(seen, kind):
            return seen
        if isinstance(seen, BaseExceptionGroup):
            for inner in seen.exceptions:
                found = _cause(inner, kind, depth + 1)
                if found is not None:
                    return found
        seen = seen.__cause__ or seen.__context__
        depth += 1
    return None


def _certificate_error(cert_error: ssl.SSLCertVerificationError) -> FetchError:
    reason = (cert_error.verify_message or "").rstrip(".")
    detail = f": {reason}" if reason else ""
    if cert_error.verify_code in _NAME_MISMATCH:
        hint = "use the host name or address the certificate names"
    else:
        hint = "use -o cafile= for a private CA"
    return FetchError(f"TLS certificate verification failed{detail} ({hint})", transient=False)


def _connection_error(exc: httpx.HTTPError, url: str) -> FetchError | None:
    """A sentence for the connection failures people meet, with the likely cause; None
    for the others."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    where = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    name_error = _cause(exc, socket.gaierror)
    if name_error is not None:
        if name_error.errno == socket.EAI_AGAIN:
            return FetchError(f"cannot resolve {host} (name service not answering)", transient=True)
        return FetchError(f"unknown host {host} (check the URL)", transient=False)
    if _cause(exc, ConnectionRefusedError) is not None:
        return FetchError(
            f"connection refused by {where} (is the server running, on this port?)",
            transient=True,
        )
    tls_error = _cause(exc, ssl.SSLError)
    if tls_error is not None and "WRONG_VERSION_NUMBER" in str(tls_error):
        return FetchError(
            f"{where} does not speak TLS (is this an http port? try http://)", transient=False
        )
    if isinstance(exc, httpx.ConnectTimeout):
        return FetchError(f"no answer from {where} (wrong address, or a firewall?)", transient=True)
    if isinstance(exc, httpx.RemoteProtocolError) and parts.scheme == "http":
        return FetchError(
            f"{where} closed the connection without an HTTP reply (is this an https port? "
            "try https://)",
            transient=True,
        )
    return None


def http_error(exc: httpx.HTTPError, url: str) -> FetchError:
    """A transient FetchError, unless retrying cannot help (a certificate that fails
    verification, an unknown host, TLS spoken to a plain HTTP port)."""
    cert_error = _cause(exc, ssl.SSLCertVerificationError)
    if cert_error is not None:
        return _certificate_error(cert_error)
    known = _connection_error(exc, url)
    if known is not None:
        return known
    return FetchError((str(exc) or type(exc).__name__).splitlines()[0], transient=True)


def status_hint(status: int, www_authenticate: str, url: str) -> str:
    """What to check when a metadata GET is refused."""
    if status == 401 and www_authenticate.lower().startswith("basic"):
        return " (check -o netrc=)"
    if status in (401, 403):
        return " (check -o token_file=)"
    if status == 404:
        return " (is this a backupfs store? run `backupfs index` on it)"
    if status == 400 and url.startswith("https:"):
        return " (does the server want a client certificate? -o cert=,key=)"
    if status == 400 and url.startswith("http:"):
        return " (is this an https port? try https://)"
    return ""
