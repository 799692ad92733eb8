"""The read-plan channel between `backupfs restore`/`warm` and a mount's daemon.

A Unix stream socket in the abstract namespace, named after the mountpoint (so no file
is left behind by a crashed daemon); the daemon accepts only its own user and root,
or anyone with `allow_other`. The name can be bound by anyone, so the client checks the
daemon's credentials too (`peer_uid`). Messages are JSON objects, one per line:

client -> daemon:  {"image": "HOST/SNAPSHOT/DISK.img", "mode": "restore" | "warm"}
                   {"ranges": [[start, end], ...]}     image byte ranges, in reading order
                   {"end": true}                       the plan is complete
daemon -> client:  {"fetched": N, "total": M}           warm only: progress, repeated
                   {"fetched": N, "total": M, "done": true, "error": null | "one line"}

A restore keeps its connection open while it copies; closing it ends the plan.

`attach` asks for a volume (an LVM volume of several segments, stripes or disks, which
the daemon serves as one file, .backupfs/volumes/NAME) in a connection of its own:

client -> daemon:  {"volume": "VG-LV", "runs": [[size, stripe, [["HOST/SNAP/DISK.img",
                    offset], ...]], ...]}          runs end to end; one area: linear
daemon -> client:  {"done": true, "error": null | "one line", "path": ".backupfs/volumes/N",
                    "fetched": 0, "total": 0}

Either side may be hostile: `decode` and the `check_*` functions below accept exactly
this schema (strict JSON, integers that are not booleans, `0 <= start < end <= image
size`, at most RANGES_PER_MESSAGE ranges and MAX_LINE_BYTES per line) and raise
ChannelError, with a one-line reason, for anything else.
"""

import hashlib
import json
import os
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

MAX_LINE_BYTES = 1 << 20
RANGES_PER_MESSAGE = 4096
MODES = ("restore", "warm")
MAX_RUNS = 1024  # of one volume: LVM's segments
MAX_AREAS = 128  # of one run: LVM's stripes
MIN_STRIPE_BYTES = 4096
MAX_VOLUME_NAME = 128
_VOLUME_NAME = re.compile(r"[A-Za-z0-9+_.-]+")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Range = tuple[int, int]


class ChannelError(ValueError):
    """A message that breaks the protocol; its text is one line for the peer and the log."""


class _Socket(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def socket_address(mountpoint: str) -> bytes:
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return b"\0backupfs-plan-" + digest.encode()


def peer_uid(sock: _Socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(creds)[1])


def encode(message: Mapping[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _no_constant(name: str) -> object:
    raise ChannelError(f"{name} is not JSON")


def decode(line: bytes) -> dict[str, object]:
    """One message: a JSON object in strict JSON (no NaN or Infinity)."""
    if len(line) > MAX_LINE_BYTES:
        raise ChannelError(f"message longer than {MAX_LINE_BYTES} bytes")
    try:
        message = json.loads(line, parse_constant=_no_constant)
    except RecursionError:
        raise ChannelError("message nested too deeply") from None
    except ChannelError:
        raise
    except ValueError as exc:  # also UnicodeDecodeError, and ints of over 4300 digits
        raise ChannelError(f"not JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(message, dict):
        raise ChannelError("a message must be a JSON object")
    return message


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_head(message: Mapping[str, object]) -> tuple[str, str]:
    """`(image path, mode)` of a plan's first message."""
    image, mode = message.get("image"), message.get("mode")
    if not isinstance(image, str) or not image:
        raise ChannelError("the first message must name an image")
    if mode not in MODES:
        raise ChannelError(f"unknown plan mode {mode!r}")
    return image, str(mode)


def check_ranges(message: Mapping[str, object], size_bytes: int) -> list[Range]:
    """The message's ranges, each `[start, end)` with `0 <= start < end <= size_bytes`."""
    raw = message.get("ranges", [])
    if not isinstance(raw, list):
        raise ChannelError("ranges must be a list")
    if len(raw) > RANGES_PER_MESSAGE:
        raise ChannelError(f"more than {RANGES_PER_MESSAGE} ranges in one message")
    out = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 2 or not all(map(_is_int, item)):
            raise ChannelError("a range must be a list of two integers")
        start, end = item
        if not 0 <= start < end <= size_bytes:
            shown = f"[{start}, {end})" if max(abs(start), abs(end)) < 1 << 64 else "a range"
            raise ChannelError(f"{shown} is not a range within the image ({size_bytes} bytes)")
        out.append((start, end))
    return out


def check_end(message: Mapping[str, object]) -> bool:
    """Whether this message ends the plan."""
    end = message.get("end", False)
    if not isinstance(end, bool):
        raise ChannelError("end must be true or false")
    return end


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ChannelError(f"{what} must be a non-negative integer")
    return value


def check_reply(message: Mapping[str, object]) -> dict[str, object]:
    """A daemon's reply: `fetched` and `total` non-negative integers, `done` a boolean,
    `error` a one-line string or null."""
    done, error = message.get("done", False), message.get("error")
    if not isinstance(done, bool):
        raise ChannelError("done must be true or false")
    if error is not None and not isinstance(error, str):
        raise ChannelError("error must be a string or null")
    return {
        "fetched": _count(message.get("fetched"), "fetched"),
        "total": _count(message.get("total"), "total"),
        "done": done,
        "error": error,
    }


@dataclass(frozen=True)
class VolumeRequest:
    name: str
    runs: list[tuple[int, int, list[tuple[str, int]]]]  # (size, stripe bytes, areas)


def check_volume(message: Mapping[str, object]) -> VolumeRequest:
    """A volume request: a name LVM could have given, and runs of positive sizes (multiples
    of 512) whose stripes, when there are several areas, are at least MIN_STRIPE_BYTES,
    a multiple of 512, and divide each area evenly."""
    name, raw = message.get("volume"), message.get("runs")
    if not isinstance(name, str) or len(name) > MAX_VOLUME_NAME or not _VOLUME_NAME.fullmatch(name):
        raise ChannelError("a volume needs a name of letters, digits and +_.-")
    if name.startswith("."):
        raise ChannelError("a volume's name may not start with '.'")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_RUNS:
        raise ChannelError(f"a volume needs 1 to {MAX_RUNS} runs")
    runs = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3:
            raise ChannelError("a run must be [size, stripe, areas]")
        size, stripe, areas = item
        if not (_is_int(size) and _is_int(stripe) and isinstance(areas, list)):
            raise ChannelError("a run must be [size, stripe, areas]")
        if not 0 < len(areas) <= MAX_AREAS:
            raise ChannelError(f"a run needs 1 to {MAX_AREAS} areas")
        if not 0 < size < 1 << 62 or size % (512 * len(areas)):
            raise ChannelError(f"a run of {size} bytes does not split into {len(areas)} areas")
        if len(areas) == 1:
            stripe = size  # linear: any multiple of 512 (lvm2 allows 1 KiB extents)
        elif stripe < MIN_STRIPE_BYTES or stripe % 512 or (size // len(areas)) % stripe:
            raise ChannelError(f"stripes of {stripe} bytes do not divide a run of {size}")
        places = []
        for area in areas:
            if not (isinstance(area, list) and len(area) == 2 and isinstance(area[0], str)
                    and _is_int(area[1]) and 0 <= area[1] < 1 << 62):  # fmt: skip
                raise ChannelError("an area must be [image path, offset]")
            places.append((area[0], area[1]))
        runs.append((size, stripe, places))
    if sum(r[0] for r in runs) >= 1 << 62:
        raise ChannelError("a volume that large is not a disk's")
    return VolumeRequest(name, runs)
