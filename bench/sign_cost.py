"""CPU per request of the SigV4 signer, next to building the same request unsigned.

    python3 bench/sign_cost.py [--runs 5] [--requests 20000]

Prints the median over --runs of the per-request time of `httpx.Request(...)` alone and
with `SigV4.sign` (a ranged GET of an image, as the mount sends), and what that costs per
GB read at 4 MiB and 768 KiB requests.
"""

import argparse
import statistics
import sys
import timeit

import httpx  # noqa: E402
from common import ROOT  # noqa: F401 (sets sys.path first)

from backupfs.remote.s3 import AwsKeys, SigV4  # noqa: E402

URL = "http://127.0.0.1:7480/backups/store/web01/2026-11-20T0300Z/disk0.img"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    signer = SigV4(AwsKeys("AKIDEXAMPLE", "secret"), "us-east-1")

    def plain() -> httpx.Request:
        return httpx.Request("GET", URL, headers={"Range": "bytes=0-4194303"})

    def signed() -> None:
        signer.sign(plain())

    n = args.requests
    base = [timeit.timeit(plain, number=n) / n * 1e6 for _ in range(args.runs)]
    both = [timeit.timeit(signed, number=n) / n * 1e6 for _ in range(args.runs)]
    sign = statistics.median(both) - statistics.median(base)
    print(f"{'measure':<40} {'median':>9}  runs")
    print(f"{'request built (us)':<40} {statistics.median(base):>9.1f}  "
          + " ".join(f"{v:.1f}" for v in base))  # fmt: skip
    print(f"{'request built and signed (us)':<40} {statistics.median(both):>9.1f}  "
          + " ".join(f"{v:.1f}" for v in both))  # fmt: skip
    print(f"{'signing alone (us per request)':<40} {sign:>9.1f}")
    for size, name in ((4 << 20, "4 MiB"), (768 << 10, "768 KiB")):
        per_gb = sign * 1e-6 * (1e9 / size) * 1000
        print(f"{'signing, ms CPU per GB at ' + name:<40} {per_gb:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
