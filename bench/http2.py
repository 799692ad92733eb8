"""HTTP/1.1 over N connections against HTTP/2 (h2c, one connection, N streams), for the
ranged GETs of the read path: throughput and client CPU, per link. One table.

    python3 bench/http2.py [--links direct,20,20@400] [--mib 512]

Needs the `h2` package (`pip install h2`); nginx serves both protocols from one file.
"""

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LINK_HELP  # noqa: E402
from tests.support.nginx import Nginx, free_port  # noqa: E402
from tests.support.proxy import DelayProxy  # noqa: E402

REQUEST = 8 << 20
FILE_BYTES = 256 << 20


async def _fetch_all(url: str, http2: bool, connections: int, total: int) -> float:
    limits = httpx.Limits(max_connections=1 if http2 else connections)
    async with httpx.AsyncClient(http1=not http2, http2=http2, limits=limits, timeout=60) as c:
        offsets = iter(range(0, total, REQUEST))

        async def worker() -> None:
            for offset in offsets:
                start = offset % FILE_BYTES
                headers = {"Range": f"bytes={start}-{start + REQUEST - 1}"}
                async with c.stream("GET", url, headers=headers) as resp:
                    assert resp.status_code == 206, resp.status_code
                    assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                    async for _ in resp.aiter_raw():
                        pass

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(worker)
        return time.monotonic() - started


@contextlib.contextmanager
def _link(port: int, link: str) -> Iterator[str]:
    if link == "direct":
        yield f"http://127.0.0.1:{port}/"
        return
    rtt, _, rate = link.partition("@")
    with DelayProxy(port, rtt_ms=float(rtt), rate_mbit=float(rate) if rate else None) as proxy:
        yield proxy.url


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="direct,20,20@400", help=LINK_HELP)
    parser.add_argument("--mib", type=int, default=512, help="bytes fetched per cell")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bfs-h2-"))
    (work / "root").mkdir()
    with open(work / "root" / "blob", "wb") as f:
        f.write(os.urandom(FILE_BYTES))
    h2_port = free_port()
    extra = f"listen 127.0.0.1:{h2_port} http2;"
    print(f"{args.mib} MiB of {REQUEST >> 20} MiB ranged GETs, {args.connections} at a time")
    print(f"{'link':<10} {'protocol':<22} {'MB/s':>8} {'client CPU s':>13}")
    with Nginx(work / "root", work / "nginx", extra) as nginx:
        for link in args.links.split(","):
            for http2 in (False, True):
                port = h2_port if http2 else nginx.port
                with _link(port, link) as url:
                    cpu = _cpu_s()
                    seconds = trio.run(
                        _fetch_all, url + "blob", http2, args.connections, args.mib << 20
                    )
                    cpu = _cpu_s() - cpu
                name = "HTTP/2, 1 connection" if http2 else f"HTTP/1.1, {args.connections} conns"
                mbps = (args.mib << 20) / seconds / 1e6
                print(f"{link:<10} {name:<22} {mbps:8.1f} {cpu:13.2f}", flush=True)


if __name__ == "__main__":
    main()
