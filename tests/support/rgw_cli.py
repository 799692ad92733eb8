"""The test RGW for benchmarks: start a cluster that outlives this command, stop it later.

    python3 -m tests.support.rgw_cli start DIR    # one JSON line: endpoints, keys, region, sts
    python3 -m tests.support.rgw_cli stop DIR
"""

import json
import sys
from pathlib import Path

from tests.support.rgw import _DAEMONS, REGION, RGW, Daemon, RgwError, _why_not, start_rgw, stop_rgw


def _running(root: Path) -> list[Daemon]:
    """The daemons whose PID files are under `root` and that still run this cluster's
    configuration (a PID that was reused by another program is left alone)."""
    conf = str(root / "ceph.conf").encode()
    found = []
    for name in _DAEMONS:
        try:
            pid = int((root / "pids" / f"{name}.pid").read_text())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if conf in argv:
            found.append(Daemon(name, pid))
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python3 -m tests.support.rgw_cli start|stop DIR", file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "stop":
        server = RGW("", "", "", REGION, root, daemons=_running(root))
        stop_rgw(server)
        return 0
    reason = _why_not()
    if reason is not None:
        print(f"rgw: {reason}", file=sys.stderr)
        return 1
    try:
        server = start_rgw(root, detach=True)
    except RgwError as e:
        print(f"rgw: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"endpoint": server.endpoint, "access_key": server.access_key,
                      "secret_key": server.secret_key, "region": server.region,
                      "sts": server.sts, "sts_endpoint": server.sts_endpoint}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
