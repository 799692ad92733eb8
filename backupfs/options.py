"""Mount options: one frozen dataclass, parsed once from `-o a=b,c` strings."""

import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from backupfs.errors import UsageError

# Options that mount(8), fstab and systemd pass along; they mean nothing to backupfs.
GENERIC_OPTIONS = frozenset(
    {
        "ro", "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser",
        "users", "owner", "group", "exec", "noexec", "suid", "nosuid", "dev", "nodev",
        "async", "sync", "atime", "noatime", "relatime",
    }
)  # fmt: skip
_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_FLAGS = ("allow_other", "allow_http", "debug", "insecure", "nonempty", "no_index")
_SIZES = ("cache_size", "block_size", "readahead", "request_size", "cache_dir_size", "fill_max")
FILL_MODES = ("auto", "metadata", "off")
ADDRESSING = ("auto", "path", "virtual")
_TEXT = ("endpoint", "region", "profile")

# The option table of `backupfs mount --help` and of the README (tests/unit/test_options.py
# keeps the two equal): (name, as written in -o; default; meaning).
OPTION_TABLE: tuple[tuple[str, str, str], ...] = (
    ("cache_size=", "256M", "memory for verified blocks (LRU, bounded in bytes)"),
    ("block_size=", "store's", "cache and fetch unit; a multiple of the store's block size"),
    ("readahead=", "64M", "largest readahead window of a sequential stream (≤ cache_size/2)"),
    ("request_size=", "4M", "largest single ranged GET"),
    ("connections=", "16", "parallel HTTP connections"),
    (
        "timeout=",
        "30",
        "seconds a request may wait for its next byte (not a cap on its length)",
    ),
    (
        "retries=",
        "4",
        "further attempts after a transient failure (reset, 5xx, timeout, bad digest)",
    ),
    ("token_file=", "", "file holding a bearer token; never put credentials on the command line"),
    (
        "netrc=",
        "",
        "netrc file; the entry for the store's host gives HTTP basic auth (excludes token_file=)",
    ),
    ("endpoint=", "AWS", "s3:// URLs: the S3 endpoint (https://host:port of MinIO, Ceph RGW, …)"),
    ("region=", "us-east-1", "s3:// URLs: the region requests are signed for"),
    (
        "credentials_file=",
        "",
        "s3:// URLs: an AWS-style credentials file (else AWS_* variables, ~/.aws)",
    ),
    ("profile=", "default", "s3:// URLs: the profile of the credentials and config files"),
    (
        "addressing=",
        "auto",
        "s3:// URLs: path or virtual (bucket.host); auto: virtual on AWS, path elsewhere",
    ),
    ("cafile=", "system store", "CA bundle (PEM) to verify the server with, for a private CA"),
    ("cert=", "", "client certificate (PEM); may also hold the key"),
    ("key=", "", "the client certificate's private key (PEM), unencrypted"),
    ("insecure", "off", "do not verify the server's certificate (logs a warning)"),
    (
        "allow_http",
        "off",
        "send token_file= or netrc= credentials over plain http:// (refused without it)",
    ),
    (
        "nonempty",
        "off",
        "mount over a directory that holds files (hidden while mounted); refused without it",
    ),
    ("cache_dir=", "", "keep verified blocks on local disk across mounts"),
    ("cache_dir_size=", "10G", "most bytes kept in `cache_dir=`"),
    ("fill=", "auto", "once a disk is read, its metadata (then, auto, data) into the page cache"),
    ("fill_max=", "1/4 of RAM", "most bytes the fill pushes into the page cache per mount"),
    ("allow_other", "off", "let other users read (images become 0444 instead of 0400)"),
    (
        "no_index",
        "off",
        "serve a store never indexed, found by its listing (blocks not digest-verified)",
    ),
    ("catalogue_refresh=", "60", "seconds between checks for new snapshots (on `ls` of the top)"),
    ("metrics_port=", "", "serve Prometheus metrics on 127.0.0.1:PORT (see docs/metrics.md)"),
    ("metrics_textfile=", "", "write Prometheus metrics to this file (node-exporter textfile)"),
    ("log_file=", "", "log here instead of syslog when in the background"),
    ("debug", "off", "per-request log lines"),
)


@dataclass(frozen=True)
class MountOptions:
    cache_size: int = 256 << 20  # all block memory: the LRU cache plus replies in flight
    block_size: int = 0  # cache/fetch unit; 0 = the store's block size (else a multiple of it)
    readahead: int = 64 << 20  # maximum readahead window per sequential stream
    request_size: int = 4 << 20  # largest single ranged GET
    connections: int = 16  # parallel HTTP connections (metadata walks are many small reads)
    timeout: float = 30.0  # seconds an HTTP request may go without receiving a byte
    retries: int = 4  # further attempts after a transient failure
    token_file: Path | None = None  # bearer token, read once at mount time
    netrc: Path | None = None  # HTTP basic auth from the entry for the store's host
    cert: Path | None = None  # client certificate (PEM), with its key unless key= is given
    key: Path | None = None  # the client certificate's private key (PEM)
    cafile: Path | None = None  # CA bundle (PEM) to verify the server with, not the system's
    insecure: bool = False  # no TLS verification at all
    allow_http: bool = False  # credentials over plain http:// (to a non-loopback host)
    allow_other: bool = False  # let other users read (files become 0444)
    nonempty: bool = False  # mount over a directory that has files (hidden while mounted)
    debug: bool = False  # per-request log lines
    log_file: Path | None = None  # log here instead of syslog when daemonized
    cache_dir: Path | None = None  # verified blocks kept on disk across mounts (diskcache.py)
    cache_dir_size: int = 10 << 30  # most bytes kept in cache_dir
    fill: str = "auto"  # background fill of the page cache once a disk is read (mount/fill.py)
    fill_max: int = 0  # most bytes the fill pushes per mount; 0: a quarter of the RAM
    endpoint: str | None = None  # s3://: the endpoint URL; None: AWS (s3.REGION.amazonaws.com)
    region: str | None = None  # s3://: the region signatures are made for (aws_credentials.py)
    credentials_file: Path | None = None  # s3://: AWS-style credentials file (INI)
    profile: str | None = None  # s3://: profile in the credentials/config files (AWS_PROFILE)
    addressing: str = "auto"  # s3://: path-style or virtual-hosted requests
    no_index: bool = False  # discover the store from its listing; no digests (discovery.py)
    catalogue_refresh: float = 60.0  # seconds between checks of the catalogue's ETag
    metrics_port: int | None = None  # Prometheus metrics over HTTP on 127.0.0.1
    metrics_textfile: Path | None = None  # Prometheus metrics written to a file

    @property
    def in_flight_bytes(self) -> int:
        """Most reply bytes being received at once: one request per connection."""
        return self.connections * self.request_size

    @property
    def lru_bytes(self) -> int:
        """What the LRU caches may hold, so that they and in-flight replies fit cache_size."""
        return self.cache_size - self.in_flight_bytes

    @property
    def digest_cache_bytes(self) -> int:
        """The digest chunks' share of lru_bytes (store format 2; the block cache has the
        rest): 12 MiB with the defaults, the records of 24 GiB of image at 64 KiB blocks."""
        return max(1 << 20, self.lru_bytes // 16)

    @property
    def block_cache_bytes(self) -> int:
        """What the LRU of verified blocks may hold: lru_bytes less the digests' share."""
        return self.lru_bytes - self.digest_cache_bytes


def parse_size(text: str, name: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"option {name}={text}: not a size (e.g. 512K, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _parse_seconds(text: str, name: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise UsageError(f"option {name}={text}: not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"option {name}={text}: must be positive")
    return value


def _parse_count(text: str, name: str, lo: int) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < lo:
        raise UsageError(f"option {name}={text}: must be an integer >= {lo}")
    return int(text)


def _parse_value(key: str, value: str) -> object:
    if key in _FLAGS:
        return True
    if key in _SIZES:
        return parse_size(value, key)
    if key in ("timeout", "catalogue_refresh"):
        return _parse_seconds(value, key)
    if key in ("connections", "retries"):
        return _parse_count(value, key, 1 if key == "connections" else 0)
    if key == "metrics_port":
        port = _parse_count(value, key, 1)
        if port > 65535:
            raise UsageError(f"option metrics_port={value}: must be a port number (1 to 65535)")
        return port
    if key == "addressing":
        if value not in ADDRESSING:
            raise UsageError(f"option addressing={value}: must be one of {', '.join(ADDRESSING)}")
        return value
    if key in _TEXT:
        if not value or "," in value or any(c.isspace() for c in value):
            raise UsageError(f"option {key}={value}: must be one word")
        return value
    if key == "fill":
        if value not in FILL_MODES:
            raise UsageError(f"option fill={value}: must be one of {', '.join(FILL_MODES)}")
        return value
    return Path(os.path.abspath(value))  # the daemon runs in /


def parse_options(option_strings: list[str]) -> MountOptions:
    """Parse `-o` values; generic mount(8)/fstab/systemd options are accepted and ignored."""
    known = {f.name for f in fields(MountOptions)}
    values: dict[str, object] = {}
    for item in ",".join(option_strings).split(","):
        key, has_value, value = item.strip().partition("=")
        if not key or key in GENERIC_OPTIONS or key.startswith("x-"):
            continue
        if key not in known:
            raise UsageError(f"unknown mount option '{key}'")
        if (key in _FLAGS) == bool(has_value):
            want = "takes no value" if key in _FLAGS else "needs a value (name=value)"
            raise UsageError(f"mount option '{key}' {want}")
        values[key] = _parse_value(key, value)
    opts = replace(MountOptions(), **values)  # type: ignore[arg-type]
    if opts.token_file is not None and opts.netrc is not None:
        raise UsageError("mount options token_file= and netrc= exclude each other")
    if opts.cafile is not None and opts.insecure:
        raise UsageError("mount options cafile= and insecure exclude each other")
    if opts.credentials_file is not None and (opts.token_file or opts.netrc):
        raise UsageError("mount option credentials_file= excludes token_file= and netrc=")
    if opts.key is not None and opts.cert is None:
        raise UsageError("mount option key= needs cert=")
    # A small cache shrinks the defaults with it; explicit values must fit.
    if "request_size" not in values:
        per_connection = opts.cache_size // 4 // opts.connections
        opts = replace(opts, request_size=max(min(opts.request_size, per_connection), 1 << 20))
    if "readahead" not in values:
        opts = replace(opts, readahead=min(opts.readahead, opts.lru_bytes // 2))
    if opts.in_flight_bytes > opts.cache_size // 2:
        raise UsageError(
            f"cache_size={format_size(opts.cache_size)} is too small for "
            f"connections={opts.connections} x request_size={format_size(opts.request_size)} "
            f"= {format_size(opts.in_flight_bytes)} of replies in flight: it must be at least "
            f"twice that, cache_size={format_size(2 * opts.in_flight_bytes)}"
        )
    if opts.readahead > opts.lru_bytes // 2:
        raise UsageError(
            f"readahead={format_size(opts.readahead)} must be at most half of what the cache "
            f"holds besides the replies in flight ({format_size(opts.lru_bytes)} = cache_size="
            f"{format_size(opts.cache_size)} less {format_size(opts.in_flight_bytes)}): at most "
            f"readahead={format_size(opts.lru_bytes // 2)}"
        )
    return opts


def format_size(n: int) -> str:
    """A size as an option value: 64M, 1536K, 1000 (exact, the largest unit that divides)."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def option_help() -> str:
    """The option table as `backupfs mount --help` shows it."""
    width = max(len(name) for name, _, _ in OPTION_TABLE)
    lines = ["mount options (-o NAME=VALUE,FLAG,...; generic mount(8) options are ignored):"]
    for name, default, meaning in OPTION_TABLE:
        shown = f" [{default}]" if default else ""
        lines.append(f"  {name:<{width}}  {meaning.replace('`', '')}{shown}")
    return "\n".join(lines)
