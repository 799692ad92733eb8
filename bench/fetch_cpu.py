"""CPU per byte of the fetch path alone: verified ranged GETs of a 1 GiB image from nginx
on loopback (`StoreClient.fetch_range`, 16 in flight, no FUSE), with the daemon's
connection layout (one httpx client of one connection per slot) next to one client
holding all the connections in its pool (what the daemon did before).

    python3 bench/fetch_cpu.py [--runs 3] [--request-kib 768,4096]

768 KiB is about the mean request of `grep -r` through a plain mount (bench/suite.py W4);
4096 KiB is request_size=, what sequential reads send. Prints medians of this process's
user and system CPU seconds per GB (1e9 bytes) fetched, and the wall MB/s.
"""

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import common  # noqa: F401 - puts the checkout on sys.path
import httpx
import trio
from run import make_store

from backupfs.mount.opening import open_store
from backupfs.remote.client import ClientConfig, StoreClient, enlarge_socket_reads, make_clients
from backupfs.remote.credentials import Credentials
from backupfs.remote.metadata import DigestLoader
from backupfs.stats import Stats
from backupfs.store.image import Image
from tests.support.nginx import Nginx

CONNECTIONS = 16
FETCH_BYTES = 900 << 20
LAYOUTS = ("one client per connection", "one client, pool of 16")


@contextlib.asynccontextmanager
async def clients(layout: str, config: ClientConfig) -> AsyncIterator[list[httpx.AsyncClient]]:
    if layout == LAYOUTS[0]:
        async with make_clients(config, Credentials()) as made:
            yield made
        return
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, headers={"Accept-Encoding": "identity"}) as one:
        yield [one] * CONNECTIONS  # every slot takes the same client: its pool holds 16


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def one_run(url: str, layout: str, request: int) -> tuple[float, float, float]:
    """(user s/GB, system s/GB, MB/s) of fetching FETCH_BYTES in `request`-byte GETs."""
    config = ClientConfig(CONNECTIONS, 30.0, 2)
    async with clients(layout, config) as made:
        stats = Stats()
        store = StoreClient(made, url, config, stats)
        tree = await open_store(store, 64 << 10)
        for host in list(tree.hosts):  # a split catalogue (format 3): hosts load on first use
            await tree.load_path(host)
        image = tree.images()[0]
        assert isinstance(image, Image)
        await DigestLoader(store, 64 << 20).ensure(image)
        slots = trio.Semaphore(CONNECTIONS)

        async def fetch(offset: int) -> None:
            async with slots:
                await store.fetch_range(image, offset, offset + request, image.block_size)

        before, start = cpu(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for offset in range(0, FETCH_BYTES - request + 1, request):
                nursery.start_soon(fetch, offset)
        after, wall = cpu(), time.perf_counter() - start
        gb = stats.bytes_fetched / 1e9
        return (after[0] - before[0]) / gb, (after[1] - before[1]) / gb, gb * 1e3 / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--request-kib", default="768,4096")
    parser.add_argument("--work", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    work = Path(args.work)
    store = work / "store-64K"
    make_store(store, 1024, 64 << 10)
    enlarge_socket_reads()
    rows = []
    with Nginx(store, work / "nginx-fetch-cpu") as nginx:
        for kib in (int(k) for k in args.request_kib.split(",")):
            results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in LAYOUTS}
            for _ in range(args.runs):
                for layout in LAYOUTS:  # side by side, alternating
                    results[layout].append(trio.run(one_run, nginx.url, layout, kib << 10))
            for layout, runs in results.items():
                user, system, mbps = (statistics.median(r[i] for r in runs) for i in range(3))
                rows.append((kib, layout, user, system, mbps))
    print(f"\nfetch path alone, nginx on loopback, {CONNECTIONS} GETs in flight; "
          f"median of {args.runs} runs")  # fmt: skip
    print(f"{'request':>8}  {'connections':<27} {'user s/GB':>9} {'sys s/GB':>9} "
          f"{'total':>6} {'MB/s':>6}")  # fmt: skip
    for kib, layout, user, system, mbps in rows:
        print(f"{kib:>5} KiB  {layout:<27} {user:>9.2f} {system:>9.2f} {user + system:>6.2f} "
              f"{mbps:>6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
