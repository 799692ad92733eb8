"""Checks of values read from a store, which are all untrusted: integers in the range their
users take, SHA-256 in hex, JSON of bounded size and depth. Each failure is a one-line
ManifestError."""

import json
import re
from typing import Any

from backupfs.errors import ManifestError

INT64_MAX = (1 << 63) - 1  # sizes are an off_t (st_size), times st_mtime_ns
MIN_TIME_NS = -(1 << 63)  # times before 1970 are negative, like st_mtime_ns
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_int(value: object, what: str, lo: int = 0, hi: int = INT64_MAX) -> int:
    bound = f" >= {lo}" if lo > MIN_TIME_NS else ""
    if not isinstance(value, int) or isinstance(value, bool) or (bound and value < lo):
        raise ManifestError(f"malformed store metadata: {what} must be an integer{bound}")
    if not lo <= value <= hi:
        raise ManifestError(f"malformed store metadata: {what} is out of range ({lo} to {hi})")
    return value


def check_sha256_hex(raw: dict[str, Any], key: str, name: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ManifestError(f"malformed store metadata: {key} of {name} is not SHA-256")
    return value


def no_duplicates(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise ManifestError(f"malformed store metadata: duplicate {what} name")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def load_json(data: bytes, limit: int) -> object:
    if len(data) > limit:
        raise ManifestError(f"malformed store metadata: larger than {limit >> 20} MiB")
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ManifestError(
            "malformed store metadata: not valid JSON (nested too deeply)"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError too, and integers over 4300 digits
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(f"malformed store metadata: not valid JSON ({reason})") from None
