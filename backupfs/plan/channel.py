"""The read-plan channel between `backupfs restore`/`warm` and a mount's daemon.

A Unix stream socket in the abstract namespace, named after the mountpoint (so no file
is left behind by a crashed daemon); the daemon accepts only its own user and root,
or anyone with `allow_other`. Messages are JSON objects, one per line:

client -> daemon:  {"image": "HOST/SNAPSHOT/DISK.img", "mode": "restore" | "warm"}
                   {"ranges": [[start, end], ...]}     image byte ranges, in reading order
                   {"end": true}                       the plan is complete
daemon -> client:  {"fetched": N, "total": M}           warm only: progress, repeated
                   {"fetched": N, "total": M, "done": true, "error": null | "one line"}

A restore keeps its connection open while it copies; closing it ends the plan.
"""

import hashlib
import json
import os
from collections.abc import Mapping

MAX_LINE_BYTES = 1 << 20
RANGES_PER_MESSAGE = 4096


def socket_address(mountpoint: str) -> bytes:
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return b"\0backupfs-plan-" + digest.encode()


def encode(message: Mapping[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"
