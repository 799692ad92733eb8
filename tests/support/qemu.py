"""Make and inspect disk images with qemu-img and qemu-io (Debian's qemu-utils), for tests
that compare backupfs's format readers with qemu's own; and the other side of the comparison:
an image and its parents opened with backupfs's local reader, mapped, and their reads checked
against the bytes qemu reads, whole and in random ranges.

`needs_qemu_img` skips a test where the tools are missing. Every helper raises
CalledProcessError (with qemu's stderr) when the tool fails.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backupfs.store.formats import local
from backupfs.store.formats.base import Extent, Layer

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None or QEMU_IO is None, reason="qemu-img is not installed"
)


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout


def qemu_img(*args: str | Path) -> str:
    """Run `qemu-img ARGS`; its stdout."""
    return _run([QEMU_IMG or "qemu-img", *map(str, args)])


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> str:
    """Run each qemu-io command (`write -P 0xab 0 4k`, `write -z 1M 64k` ...) on the image,
    in one qemu-io process; its stdout."""
    argv = [QEMU_IO or "qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    return _run([*argv, str(path)])


def write_bytes(path: Path, offset: int, data: bytes, fmt: str = "qcow2") -> None:
    """Write `data` at virtual `offset` of the image (through qemu-io's pattern file)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".pattern-") as pattern:
        pattern.write(data)
        pattern.flush()
        qemu_io(path, f"write -q -s {pattern.name} {offset} {len(data)}", fmt=fmt)


def convert_to_raw(path: Path, fmt: str = "qcow2") -> bytes:
    """The guest's disk as qemu reads it (`qemu-img convert -O raw`), backing chain included."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".raw-") as tmp:
        return raw_file(path, Path(tmp) / "disk.raw", fmt).read_bytes()


def raw_file(path: Path, out: Path, fmt: str = "qcow2") -> Path:
    """`convert_to_raw` into the (sparse) raw file `out`, for disks too big to hold; `out`."""
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    return out


def qemu_map(path: Path, fmt: str = "qcow2") -> list[dict[str, Any]]:
    """`qemu-img map --output=json`: start, length, depth, present, zero, data [, offset]."""
    entries: list[dict[str, Any]] = json.loads(qemu_img("map", "-f", fmt, "--output=json", path))
    return entries


def sparse_raw(path: Path, size: int, seed: int, pieces: int = 24) -> None:
    """A raw disk of `size` bytes: random data, runs of one byte, compressible bytes (few
    symbols) and holes, at scattered unaligned offsets (deterministic for `seed`)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for index in range(pieces):
            length = rng.randrange(1, min(size, 400_000))
            f.seek(rng.randrange(0, size - length))
            f.write(_piece(rng, index % 3, length))


def _piece(rng: random.Random, kind: int, length: int) -> bytes:
    if kind == 0:
        return rng.randbytes(length)
    if kind == 1:
        return bytes([rng.randrange(1, 256)]) * length
    return bytes(rng.choices(b"abcdefgh\n ", k=length))


# -- backupfs's side: the local reader


def open_layers(factory: Callable[[str, int], Layer], path: Path) -> list[local.LocalLayer]:
    """The image at `path` opened with `factory` (its format's layer class) and its parents,
    each found relative to its child's directory."""
    chain = [local.open_local(factory, path)]
    while (parent := chain[-1].layer.parent) is not None:
        assert len(chain) < 8
        path = path.parent / parent.path
        chain.append(local.open_local(factory, path))
    return chain


def mapped(chain: list[local.LocalLayer], start: int, end: int) -> list[Extent]:
    """The top layer's extents for [start, end), given the tables it asks for."""
    top = chain[0]
    tables = {read: top.pread(read) for read in top.layer.table_reads(start, end)}
    return top.layer.map(start, end, tables)


def random_ranges(size: int, count: int = 1000, seed: int = 7) -> Iterator[tuple[int, int]]:
    """`count` (start, length) ranges inside a disk of `size` bytes, up to 1 MiB long."""
    rng = random.Random(seed)
    for _ in range(count):
        start = rng.randrange(size)
        yield start, rng.randint(1, min(size - start, rng.choice([512, 4096, 65536, 1 << 20])))


def assert_reads(chain: list[local.LocalLayer], expected: bytes) -> None:
    """The chain reads `expected`: whole (SHA-256) and in `random_ranges`."""
    assert chain[0].layer.virtual_size == len(expected)
    whole = local.read_chain(chain, 0, len(expected))
    assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(expected).hexdigest()
    for start, length in random_ranges(len(expected)):
        assert local.read_chain(chain, start, length) == expected[start : start + length]
