"""A real S3 server for tests and benchmarks: Debian's Ceph RADOS Gateway (RGW) in front of a
single-node cluster, one monitor and one OSD on a sparse BlueStore file.

Every file lives under the one directory the caller gives (layout below); no systemd, no
/etc/ceph, no keyrings (cephx is off: only loopback listens). Each daemon runs in the
foreground (`-f`) as a child started here, its PID kept in `pids/NAME.pid`, and is stopped
by that PID: SIGTERM, then SIGKILL after a timeout; also when the start fails halfway. The
monitor and the gateways listen on free loopback ports, so two sessions never clash.

    ceph.conf monmap        the cluster's configuration and its first monitor map
    mon/ osd/ rgw/          daemon data; osd/block-0 is the BlueStore file (sparse)
    log/                    Ceph's logs (mon.a.log, osd.0.log, client.rgw.s3.log, ...) and
                            each daemon's stdout and stderr (mon.out, osd.out, rgw.out, ...)
    run/                    admin sockets (`ceph --admin-daemon run/osd.0.asok help`)
    pids/                   one PID file a daemon

Two gateways serve the same cluster, users and buckets. `endpoint` has STS authentication
off and answers a bad signature with AWS's codes (SignatureDoesNotMatch, InvalidAccessKeyId);
`sts_endpoint` has it on (`rgw_s3_auth_use_sts`), so it takes temporary keys with their
session token, but answers AccessDenied to every failed authentication (its STS engine,
tried last, has the last word). The S3 user gets random keys each start. GetSessionToken is
allowed by a user policy (RGW refuses it by default, even to the key's own user), put
through RGW's IAM API, which the user's `user-policy=*` cap lets it call. Virtual-hosted
requests work with `Host: BUCKET.localhost[:PORT]` (`rgw_dns_name = localhost`; the
connection still goes to 127.0.0.1: *.localhost does not resolve here).

For benchmarks, a CLI that leaves the daemons running:

    python3 -m tests.support.rgw_cli start DIR    # one JSON line: endpoints, keys, region, sts
    python3 -m tests.support.rgw_cli stop DIR
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.nginx import free_port, wait_for_port
from tests.support.system import remove_tree

log = logging.getLogger(__name__)

REGION = "us-east-1"  # RGW takes any region in a signature's scope; this is botocore's default
BLOCK_SIZE = 2 << 30  # the OSD's BlueStore file, sparse
START_TIMEOUT_S = 120.0  # each step's; the whole start takes about 20 s on 2 cores
STOP_TIMEOUT_S = 20.0  # SIGTERM to SIGKILL
_CLI_TIMEOUT_S = 60.0  # one `ceph` or `radosgw-admin` run
_PR_SET_PDEATHSIG = 1

CONF = """\
[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
ms_bind_msgr2 = false
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
keyring = /dev/null
run_dir = {root}/run
log_file = {root}/log/$name.log
mon_data = {root}/mon/$cluster-$id
osd_data = {root}/osd/$cluster-$id
rgw_data = {root}/rgw
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_crit = 1
osd_objectstore = bluestore
bluestore_block_path = {root}/osd/block-$id
bluestore_block_create = true
bluestore_block_size = {block_size}
osd_memory_target = 1073741824
rgw_dns_name = localhost
rgw_sts_key = {sts_key}

# The command-line tools (client.admin) get no admin socket: they would take the daemons'.
[mon]
admin_socket = {root}/run/$name.asok
[osd]
admin_socket = {root}/run/$name.asok
[client.rgw.s3]
admin_socket = {root}/run/$name.asok
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_s3_auth_use_sts = false
[client.rgw.sts]
admin_socket = {root}/run/$name.asok
rgw_frontends = beast endpoint=127.0.0.1:{sts_port}
rgw_s3_auth_use_sts = true
"""

# Daemons in start order; stopped in reverse.
_DAEMONS = {
    "mon": ["ceph-mon", "-i", "a"],
    "osd": ["ceph-osd", "-i", "0"],
    "rgw": ["radosgw", "-n", "client.rgw.s3"],
    "sts": ["radosgw", "-n", "client.rgw.sts"],
}


class RgwError(RuntimeError):
    """The cluster did not come up (or a tool failed); one line, naming the log to read."""


class DaemonExited(RgwError):
    def __init__(self, daemon: Daemon, message: str) -> None:
        super().__init__(message)
        self.daemon = daemon


@dataclass
class Daemon:
    name: str
    pid: int
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)  # None: not ours

    def exited(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return True
        return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie has exited

    def signal(self, sig: int) -> None:
        if self.exited():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


@dataclass
class RGW:
    endpoint: str  # http://127.0.0.1:PORT: STS auth off, so errors are AWS's codes
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    root: Path
    sts: bool = False  # GetSessionToken works (session_token() gives temporary keys)
    sts_endpoint: str = ""  # the gateway that takes temporary keys (STS auth on)
    daemons: list[Daemon] = field(default_factory=list, repr=False)
    detached: bool = field(default=False, repr=False)  # the daemons outlive their starter

    @property
    def port(self) -> int:
        return int(self.endpoint.rpartition(":")[2])


# --------------------------------------------------------------------------------------------
# start and stop


def start_rgw(root: Path, block_size: int = BLOCK_SIZE, detach: bool = False) -> RGW:
    """Make a cluster under `root` (created; must not hold one already) and start it. The
    daemons get SIGTERM if this thread ends first (a test run killed), unless `detach`."""
    root = root.resolve()
    if (root / "ceph.conf").exists():
        raise RgwError(f"{root} already holds a cluster: stop it and remove the directory")
    for sub in ("mon", "osd/ceph-0", "rgw", "log", "run", "pids"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    fsid, (mon_port, rgw_port, sts_port) = str(uuid.uuid4()), sorted(ports)
    conf = root / "ceph.conf"
    conf.write_text(
        CONF.format(
            fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, sts_port=sts_port, root=root,
            block_size=block_size, sts_key=secrets.token_hex(8),
        )
    )  # fmt: skip
    conf.chmod(0o600)  # the STS key signs session tokens
    rgw = RGW(f"http://127.0.0.1:{rgw_port}", "", "", REGION, root,
              sts_endpoint=f"http://127.0.0.1:{sts_port}", detached=detach)  # fmt: skip
    begun = time.monotonic()
    try:
        _ceph_tool(root, "monmaptool", "--create", "--fsid", fsid,
                   "--addv", "a", f"[v1:127.0.0.1:{mon_port}]", str(root / "monmap"))  # fmt: skip
        _ceph_tool(root, "ceph-mon", "--mkfs", "-i", "a", "--monmap", str(root / "monmap"))
        _start(rgw, "mon")
        _wait_until(rgw, "the monitor's port", lambda: _port_open(mon_port))
        osd_uuid = str(uuid.uuid4())
        _ceph_again(root, "--connect-timeout", "30", "osd", "new", osd_uuid)
        _ceph_tool(root, "ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        _start_and_wait(rgw, "osd", "the OSD", lambda: _osds_up(root) == 1)
        _start_and_wait(rgw, "rgw", "the gateway's HTTP", lambda: _answers_http(rgw.endpoint))
        _start_and_wait(rgw, "sts", "the STS gateway's HTTP",
                        lambda: _answers_http(rgw.sts_endpoint))  # fmt: skip
        _make_user(rgw)
        rgw.sts = _allow_session_tokens(rgw)
    except BaseException:
        stop_rgw(rgw)
        raise
    log.info("RGW at %s and %s up in %.1f s (STS %s)", rgw.endpoint, rgw.sts_endpoint,
             time.monotonic() - begun, "works" if rgw.sts else "fails")  # fmt: skip
    return rgw


def stop_rgw(rgw: RGW) -> None:
    """Stop the daemons by their PIDs, one after the other: the gateways, the OSD, the
    monitor (a gateway whose OSD is gone hangs in its shutdown until SIGKILL)."""
    for name in reversed(_DAEMONS):
        _stop([d for d in rgw.daemons if d.name == name])
    for d in rgw.daemons:
        (rgw.root / "pids" / f"{d.name}.pid").unlink(missing_ok=True)
    rgw.daemons.clear()


def _stop(daemons: list[Daemon]) -> None:
    for d in daemons:
        d.signal(signal.SIGTERM)
    begun = time.monotonic()
    end = begun + STOP_TIMEOUT_S
    while any(not d.exited() for d in daemons) and time.monotonic() < end:
        time.sleep(0.1)
    for d in daemons:
        if not d.exited():
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", d.name, d.pid,
                        STOP_TIMEOUT_S)  # fmt: skip
            d.signal(signal.SIGKILL)
    end = time.monotonic() + 10
    while any(not d.exited() for d in daemons) and time.monotonic() < end:
        time.sleep(0.05)
    for d in daemons:
        if d.proc is not None:
            d.proc.wait(timeout=1)
        log.debug("%s stopped in %.1f s", d.name, time.monotonic() - begun)


def _start(rgw: RGW, name: str) -> None:
    out = open(rgw.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (the child keeps it)
    with out:
        proc = subprocess.Popen(
            [*_DAEMONS[name], "-c", str(rgw.root / "ceph.conf"), "-f"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's ^C reaches the test run, not the daemons
            preexec_fn=None if rgw.detached else _die_with_parent,
        )  # fmt: skip
    rgw.daemons.append(Daemon(name, proc.pid, proc))
    (rgw.root / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _start_and_wait(rgw: RGW, name: str, what: str, ready: Callable[[], bool]) -> None:
    """Start a daemon and wait until it is `ready`; start it again if it exits on the way
    (a fresh OSD sometimes does: its first command reaches the monitor with an fsid of
    zeros, refused as 'wrong fsid', and it gives up)."""
    for attempt in range(1, 4):
        _start(rgw, name)
        try:
            _wait_until(rgw, what, ready)
            return
        except DaemonExited as e:
            if e.daemon.name != name or attempt == 3:
                raise
            log.warning("%s exited at its start (%s): starting it again", name, e)
            rgw.daemons.remove(e.daemon)


def _wait_until(rgw: RGW, what: str, ready: Callable[[], bool]) -> None:
    end = time.monotonic() + START_TIMEOUT_S
    while True:
        for d in rgw.daemons:
            if d.exited():
                raise DaemonExited(d, f"{d.name} exited while waiting for {what}: see "
                                      f"{rgw.root}/log/{d.name}.out and .log")  # fmt: skip
        if ready():
            return
        if time.monotonic() > end:
            raise RgwError(f"{what} not ready after {START_TIMEOUT_S:.0f} s: see {rgw.root}/log")
        time.sleep(0.2)


def _port_open(port: int) -> bool:
    try:
        wait_for_port(port, deadline_s=0)
    except OSError:
        return False
    return True


def _osds_up(root: Path) -> int:
    """OSDs up; 0 while the monitor refuses to answer (seen once in a while right after its
    start: "Error EPERM: problem getting command descriptions from mon.")."""
    try:
        proc = _ceph_tool(root, "ceph", "--connect-timeout", "10", "osd", "stat", "-f", "json")
    except RgwError as e:
        log.info("RGW: %s; asking again", e)
        return 0
    return int(json.loads(proc.stdout)["num_up_osds"])


def _ceph_again(root: Path, *args: str) -> None:
    """A `ceph` command that the monitor may refuse for a moment after its start."""
    for attempt in range(10):
        try:
            _ceph_tool(root, "ceph", *args)
            return
        except RgwError as e:
            if attempt == 9:
                raise
            log.info("RGW: %s; trying again", e)
            time.sleep(1)


def _answers_http(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as reply:
            return bool(reply.status == 200)
    except (OSError, http.client.HTTPException):
        return False


def _ceph_tool(root: Path, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one of Ceph's tools on this cluster. An error names the command (never given a
    secret) and the last line of its stderr; its stdout (which may hold keys) stays out."""
    cmd = [tool, "-c", str(root / "ceph.conf"), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RgwError(f"{' '.join([tool, *args])} took over {_CLI_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RgwError(f"{' '.join([tool, *args])} failed ({proc.returncode}): {last}")
    return proc


# --------------------------------------------------------------------------------------------
# the S3 user


def _make_user(rgw: RGW) -> None:
    """A user with keys that radosgw-admin makes at random (read from its JSON reply)."""
    proc = _ceph_tool(rgw.root, "radosgw-admin", "user", "create", "--uid=backupfs",
                      "--display-name=backupfs tests")  # fmt: skip
    key = json.loads(proc.stdout)["keys"][0]
    rgw.access_key, rgw.secret_key = key["access_key"], key["secret_key"]
    _ceph_tool(rgw.root, "radosgw-admin", "caps", "add", "--uid=backupfs", "--caps=user-policy=*")


from tests.support.rgw_clients import (  # noqa: E402  (they need RGW, defined above)
    CATALOGUE,
    _allow_session_tokens,
    client,
    make_bucket,
    session_token,
    upload_tree,
)

__all__ = [
    "CATALOGUE", "RGW", "client", "make_bucket", "session_token", "start_rgw", "stop_rgw",
    "upload_tree",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# the pytest fixture


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the Ceph RGW fixture needs root"
    for tool in ("radosgw", "ceph-mon", "ceph-osd", "ceph", "radosgw-admin", "monmaptool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash contrib/setup-rgw.sh)"
    if importlib.util.find_spec("botocore") is None:
        return "botocore is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RGW]:
    """One Ceph RGW for the whole test session (about 20 s to start)."""
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("rgw")
    server = start_rgw(root)
    try:
        yield server
    finally:
        stop_rgw(server)
        remove_tree(root)
