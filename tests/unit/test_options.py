"""Mount option parsing in backupfs.options."""

import math
from pathlib import Path

import pytest

from backupfs.errors import UserError
from backupfs.options import MountOptions, parse_options, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64K", 64 << 10),
        ("1M", 1 << 20),
        ("2G", 2 << 30),
        ("512KiB", 512 << 10),
        ("64k", 64 << 10),
        ("1MB", 1 << 20),
        ("4096", 4096),
        ("1T", 1 << 40),
        (" 8M ", 8 << 20),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text, "cache_size") == expected


@pytest.mark.parametrize("text", ["", "1.5G", "-1M", "M", "12X", "1 G", "0x10", "1KiBB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UserError, match=r"option cache_size=.*: not a size"):
        parse_size(text, "cache_size")


def test_empty_and_defaults() -> None:
    assert parse_options([]) == MountOptions()
    assert parse_options([""]) == MountOptions()
    assert parse_options([",,"]) == MountOptions()


def test_values_are_parsed_into_fields() -> None:
    opts = parse_options(
        [
            "cache_size=1G,readahead=128M",
            "block_size=1M",
            "request_size=16M,connections=3",
            "retries=0,timeout=2.5s",
            "token_file=/etc/tok,log_file=/var/log/b.log",
            "allow_other,debug",
        ]
    )
    assert opts == MountOptions(
        cache_size=1 << 30,
        readahead=128 << 20,
        block_size=1 << 20,
        request_size=16 << 20,
        connections=3,
        retries=0,
        timeout=2.5,
        token_file=Path("/etc/tok"),
        log_file=Path("/var/log/b.log"),
        allow_other=True,
        debug=True,
    )


def test_credential_and_tls_options_are_paths() -> None:
    opts = parse_options(["netrc=/etc/backupfs/netrc,cert=c.pem,key=./k.pem,cafile=/etc/ca.pem"])
    assert (opts.netrc, opts.cert, opts.key, opts.cafile) == (
        Path("/etc/backupfs/netrc"),
        Path.cwd() / "c.pem",
        Path.cwd() / "k.pem",
        Path("/etc/ca.pem"),
    )
    assert not opts.insecure
    assert parse_options(["insecure"]) == MountOptions(insecure=True)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("token_file=/t,netrc=/n", "mount options token_file= and netrc= exclude each other"),
        ("cafile=/ca.pem,insecure", "mount options cafile= and insecure exclude each other"),
        ("key=/k.pem", "mount option key= needs cert="),
    ],
)
def test_conflicting_credential_options(item: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        parse_options([item])
    assert str(info.value) == message


def test_generic_options_are_ignored() -> None:
    generic = [
        "ro",
        "rw",
        "_netdev",
        "x-systemd.automount",
        "noauto",
        "nofail",
        "defaults",
        "x-systemd.idle-timeout=60",
        "noatime",
        "nosuid,nodev",
        "user",
    ]
    assert parse_options(generic) == MountOptions()
    assert parse_options([",".join(generic) + ",cache_size=512M"]).cache_size == 512 << 20


def test_unknown_option() -> None:
    with pytest.raises(UserError) as info:
        parse_options(["ro,bogus,cache_size=1G"])
    assert str(info.value) == "unknown mount option 'bogus'"
    with pytest.raises(UserError, match="unknown mount option 'bogus'"):
        parse_options(["bogus=1"])


@pytest.mark.parametrize("item", ["allow_other=1", "debug=yes", "allow_other=", "insecure=no"])
def test_flag_with_a_value_is_rejected(item: str) -> None:
    key = item.partition("=")[0]
    with pytest.raises(UserError) as info:
        parse_options([item])
    assert str(info.value) == f"mount option '{key}' takes no value"


@pytest.mark.parametrize(
    "key",
    [
        "cache_size",
        "timeout",
        "retries",
        "token_file",
        "readahead",
        "netrc",
        "cert",
        "key",
        "cafile",
    ],
)
def test_missing_value_is_rejected(key: str) -> None:
    with pytest.raises(UserError) as info:
        parse_options([key])
    assert str(info.value) == f"mount option '{key}' needs a value (name=value)"


def test_cache_size_bounds_cache_plus_replies_in_flight() -> None:
    opts = parse_options([])
    assert opts.lru_bytes + opts.connections * opts.request_size == opts.cache_size
    assert opts.readahead <= opts.lru_bytes // 2
    assert parse_options(["cache_size=192M,readahead=64M"]).readahead == 64 << 20
    with pytest.raises(UserError) as info:
        parse_options(["cache_size=128M,readahead=64M"])
    assert str(info.value) == (
        "readahead=64M must be at most half of what the cache holds besides the replies in "
        "flight (96M = cache_size=128M less 32M): at most readahead=48M"
    )
    with pytest.raises(UserError) as info:
        parse_options(["cache_size=64M,connections=8,request_size=8M"])
    assert str(info.value) == (
        "cache_size=64M is too small for connections=8 x request_size=8M = 64M of replies "
        "in flight: it must be at least twice that, cache_size=128M"
    )


def test_a_tiny_cache_says_the_numbers_and_the_minimum() -> None:
    with pytest.raises(UserError) as info:
        parse_options(["cache_size=1024"])
    assert str(info.value) == (
        "cache_size=1K is too small for connections=16 x request_size=1M = 16M of replies "
        "in flight: it must be at least twice that, cache_size=32M"
    )
    assert parse_options(["cache_size=32M"]).cache_size == 32 << 20  # the minimum works


def test_a_small_cache_shrinks_the_defaults() -> None:
    opts = parse_options(["cache_size=64M"])
    assert opts.request_size == 1 << 20  # a quarter of the cache over 16 connections
    assert opts.readahead == 24 << 20  # half of what is left for the LRU
    assert opts.lru_bytes == 48 << 20


@pytest.mark.parametrize(
    ("text", "expected"), [("30", 30.0), ("2.5", 2.5), ("10s", 10.0), ("0.1s", 0.1)]
)
def test_timeout(text: str, expected: float) -> None:
    assert parse_options([f"timeout={text}"]).timeout == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "must be positive"),
        ("-1", "must be positive"),
        ("abc", "not a number of seconds"),
        ("", "not a number of seconds"),
        ("5m", "not a number of seconds"),
    ],
)
def test_timeout_rejected(text: str, message: str) -> None:
    with pytest.raises(UserError, match=f"option timeout={text}: {message}"):
        parse_options([f"timeout={text}"])


def test_timeout_nan_rejected() -> None:
    with pytest.raises(UserError, match="timeout"):
        opts = parse_options(["timeout=nan"])
        assert not math.isnan(opts.timeout)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("connections=0", "connections=0: must be an integer >= 1"),
        ("connections=x", "connections=x: must be an integer >= 1"),
        ("retries=-1", "retries=-1: must be an integer >= 0"),
        ("retries=1.5", "retries=1.5: must be an integer >= 0"),
    ],
)
def test_counts(item: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_options([item])
    assert parse_options(["connections=1,retries=0"]).connections == 1


def test_count_with_a_non_ascii_digit_is_a_user_error() -> None:
    with pytest.raises(UserError, match="connections"):
        parse_options(["connections=²"])


def test_the_option_table_is_the_readme_table_and_names_every_option() -> None:
    """`backupfs mount --help` and the README show one table (OPTION_TABLE)."""
    from dataclasses import fields

    from backupfs.options import _FLAGS, OPTION_TABLE, MountOptions, option_help

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("| option | default | meaning |")
    rows = []
    for line in readme[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, default, meaning = (c.strip() for c in line.strip("|").split("|"))
        rows.append((name.strip("`"), default.strip("`"), meaning))
    assert tuple(rows) == OPTION_TABLE
    names = {name.rstrip("=") for name, _, _ in OPTION_TABLE}
    assert names == {f.name for f in fields(MountOptions)}
    for name, _, _ in OPTION_TABLE:
        assert name.endswith("=") != (name in _FLAGS), name
        assert name in option_help()
