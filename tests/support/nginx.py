"""A real nginx serving a directory on a free loopback port, stopped by its PID."""

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CONF = """\
daemon off;
master_process off;
worker_processes 1;
user root;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    gzip off;
    server {{
        listen 127.0.0.1:{port}{listen_ssl};
        root {root};
        {tls}
        {extra}
    }}
}}
"""


@dataclass(frozen=True)
class Tls:
    """Serve HTTPS with this certificate; with `client_ca`, require client certificates
    signed by it (nginx answers 400 to a client that sends none)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def directives(self) -> str:
        lines = [f"ssl_certificate {self.cert};", f"ssl_certificate_key {self.key};"]
        if self.client_ca is not None:
            lines += [f"ssl_client_certificate {self.client_ca};", "ssl_verify_client on;"]
        return "\n        ".join(lines)


@dataclass(frozen=True)
class Pki:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_pem: Path  # client certificate and key in one file


def _openssl(cwd: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        ["openssl", *args], cwd=cwd, input=stdin, capture_output=True, text=True, check=True,
        timeout=60,
    )  # fmt: skip


def _signed_cert(work: Path, ca: str, name: str, subject: str, extensions: str) -> None:
    _openssl(
        work, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip
    (work / f"{name}.ext").write_text(extensions)
    _openssl(
        work, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
    )  # fmt: skip


def make_pki(work: Path) -> Pki:
    """Make the certificates with the openssl CLI in `work`; keys are mode 0600."""
    work.mkdir(parents=True, exist_ok=True)
    _openssl(
        work, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=backupfs test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    leaf = "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    _signed_cert(
        work, "ca", "server", "/CN=127.0.0.1",
        leaf + "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )  # fmt: skip
    _signed_cert(
        work, "ca", "client", "/CN=backupfs client", leaf + "extendedKeyUsage=clientAuth\n"
    )
    pem = work / "client.pem"
    pem.write_text((work / "client.crt").read_text() + (work / "client.key").read_text())
    for key in (work / "ca.key", work / "server.key", work / "client.key", pem):
        key.chmod(0o600)
    return Pki(
        ca_cert=work / "ca.crt",
        server_cert=work / "server.crt",
        server_key=work / "server.key",
        client_cert=work / "client.crt",
        client_key=work / "client.key",
        client_pem=pem,
    )


def htpasswd_line(user: str, password: str, work: Path) -> str:
    """A line of an nginx htpasswd file, hashed by `openssl passwd` (apr1)."""
    proc = subprocess.run(
        ["openssl", "passwd", "-apr1", "-stdin"], cwd=work, input=password + "\n",
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return f"{user}:{proc.stdout.strip()}\n"


def basic_auth_location(prefix: str, root: Path, htpasswd: Path) -> str:
    """An nginx location serving `root` at `prefix`, behind HTTP basic auth."""
    return f"""
        location {prefix} {{
            alias {root}/;
            auth_basic "backupfs test";
            auth_basic_user_file {htpasswd};
        }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


class Nginx:
    def __init__(self, root: Path, work: Path, extra: str = "", tls: Tls | None = None) -> None:
        self.root, self.work, self.extra, self.tls = root, work, extra, tls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}/"

    def start(self) -> "Nginx":
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(
            CONF.format(
                work=self.work,
                port=self.port,
                listen_ssl="" if self.tls is None else " ssl",
                root=self.root,
                tls="" if self.tls is None else self.tls.directives(),
                extra=self.extra,
            )
        )
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "error.log")],
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
