"""The same store through Ceph RGW (native S3, SigV4) and through nginx, side by side.

    python3 bench/s3.py [--runs 3] [--image-mib 384] [--fs-mib 512] [--tree-files 400]

Builds a store of two disks: a raw image of random data (sequential read) and an ext4
image holding a generated tree (restore through attach). Each run, in turn for nginx and
for RGW (both on loopback, page cache dropped before each cold step): `index` of the
local directory vs `index s3://` of the bucket (hashing by ranged GETs), a sequential
read of the raw image through the mount, and `backupfs restore` of the tree from the
attached ext4 image. Prints medians; needs root and Ceph RGW (contrib/setup-rgw.sh). The
test RGW keeps its objects in a 2 GiB BlueStore file: both images must fit in it.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import ROOT, drop_caches, run_logged  # noqa: I001 (sets sys.path first)

from tests.support.fsimages import PartSpec, make_fs_image  # noqa: E402
from tests.support.mounting import mounted  # noqa: E402
from tests.support.nginx import Nginx  # noqa: E402
from tests.support.rgw import RGW, client, make_bucket, start_rgw, stop_rgw, upload_tree  # noqa: E402
from tests.support.system import remove_tree  # noqa: E402
from tests.support.trees import make_tree  # noqa: E402

BACKUPFS = [sys.executable, "-m", "backupfs"]
RAW, FS = "bench/2026-11-20T0300Z/raw.img", "bench/2026-11-20T0300Z/fs.img"


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    run_logged(argv, timeout=3600, env=env)
    return time.monotonic() - start


def build(work: Path, image_mib: int, fs_mib: int, tree_files: int) -> Path:
    store = work / "store"
    raw = store / RAW
    raw.parent.mkdir(parents=True)
    with open(raw, "wb") as f:
        for _ in range(image_mib):
            f.write(os.urandom(1 << 20))
    make_tree(work / "tree", seed=5, files=tree_files, special=False)
    make_fs_image(store / FS, PartSpec("ext4", fs_mib, tree=work / "tree"))
    return store


def read_and_restore(url: str, options: str, work: Path) -> tuple[float, float]:
    """Seconds for a cold sequential read of the raw image and a restore of the tree."""
    mnt, run_dir = work / "mnt", work / "run"
    mnt.mkdir(exist_ok=True)
    env = {**os.environ, "BACKUPFS_RUN_DIR": str(run_dir)}
    with mounted(url, mnt, *([options] if options else []), "fill=off"):
        drop_caches()
        read_s = timed(["dd", f"if={mnt / RAW}", "of=/dev/null", "bs=4M", "status=none"])
        target, dest = work / "att", work / "restored"
        run_logged([*BACKUPFS, "attach", str(mnt / FS), str(target)], env=env)
        try:
            drop_caches()
            restore_s = timed([*BACKUPFS, "restore", str(target / "p0"), str(dest)], env)
        finally:
            run_logged([*BACKUPFS, "detach", str(target)], env=env)
            remove_tree(dest)
    return read_s, restore_s


@contextlib.contextmanager
def rgw_running(root: Path) -> Iterator[RGW]:
    rgw = start_rgw(root)
    try:
        yield rgw
    finally:
        stop_rgw(rgw)


@contextlib.contextmanager
def served(store: Path, work: Path) -> Iterator[tuple[Nginx, RGW, str, str]]:
    with Nginx(store, work / "nginx") as nginx, rgw_running(work / "rgw") as rgw:
        bucket = "bench-store"
        make_bucket(rgw, bucket)
        upload_tree(rgw, store, bucket, "store")
        creds = work / "aws"
        creds.write_text(f"[default]\naws_access_key_id = {rgw.access_key}\n"
                         f"aws_secret_access_key = {rgw.secret_key}\n")  # fmt: skip
        creds.chmod(0o600)
        options = f"endpoint={rgw.endpoint},region={rgw.region},credentials_file={creds}"
        yield nginx, rgw, f"s3://{bucket}/store/", options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-mib", type=int, default=384)
    parser.add_argument("--fs-mib", type=int, default=512)
    parser.add_argument("--tree-files", type=int, default=400)
    args = parser.parse_args()
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        store = build(work, args.image_mib, args.fs_mib, args.tree_files)
        size = sum(p.stat().st_size for p in store.rglob("*.img"))
        rows: dict[str, list[float]] = {}
        with served(store, work) as (nginx, rgw, s3_url, s3_options):
            for _ in range(args.runs):
                for meta in store.rglob(".backupfs"):
                    remove_tree(meta)
                drop_caches()
                rows.setdefault("index, local directory (MB/s)", []).append(
                    size / timed([*BACKUPFS, "index", str(store)]) / 1e6
                )
                s3c = client(rgw)
                for obj in s3c.list_objects_v2(Bucket="bench-store", Prefix="store/").get(
                    "Contents", []
                ):
                    if "/.backupfs/" in obj["Key"] or obj["Key"].endswith(".json"):
                        s3c.delete_object(Bucket="bench-store", Key=obj["Key"])
                rows.setdefault("index, bucket by ranged GETs (MB/s)", []).append(
                    size / timed([*BACKUPFS, "index", s3_url, "-o", s3_options]) / 1e6
                )
                for name, url, options in (("nginx", nginx.url, ""),
                                           ("RGW", s3_url, s3_options)):  # fmt: skip
                    read_s, restore_s = read_and_restore(url, options, work)
                    mib = args.image_mib
                    rows.setdefault(f"sequential read, {name} (MB/s)", []).append(
                        mib * (1 << 20) / read_s / 1e6
                    )
                    rows.setdefault(f"restore of the tree, {name} (s)", []).append(restore_s)
        print(f"{'measure':<42} {'median':>8}  runs")
        for name, values in rows.items():
            shown = " ".join(f"{v:.1f}" for v in values)
            print(f"{name:<42} {statistics.median(values):>8.1f}  {shown}")
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
