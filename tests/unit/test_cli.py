"""The command line's own decisions, without a mount: commands, mistypes, exit codes."""

import pytest

from backupfs.cli.main import main
from backupfs.errors import EXIT_USAGE


@pytest.mark.parametrize(
    ("typed", "meant"),
    [("detatch", "detach"), ("stauts", "status"), ("restroe", "restore"), ("umonut", "umount")],
)
def test_a_mistyped_command_is_named_not_taken_for_a_url(
    typed: str, meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([typed, "/mnt/x"]) == EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"backupfs: unknown command '{typed}' (did you mean '{meant}'?)\n"


def test_an_unknown_word_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("backupfs: unknown command 'frobnicate'; commands: index, ls, mount,")
    assert err.count("\n") == 1


def test_a_url_first_is_the_mount_helper_form(capsys: pytest.CaptureFixture[str]) -> None:
    # mount.fuse3 runs `backupfs SOURCE DIR -o OPTS`: that is `backupfs mount`, whose
    # argument parser then asks for the mountpoint.
    with pytest.raises(SystemExit) as exit_info:
        main(["https://backups.example/store/"])
    assert exit_info.value.code == EXIT_USAGE
    assert "backupfs mount: error: the following arguments are required: MOUNTPOINT" in (
        capsys.readouterr().err
    )


def test_stats_lines_say_what_the_cache_bound_is_and_keep_one_precision() -> None:
    from backupfs.cli.format import stats_lines

    doc = {
        "store": "http://s/", "bytes_served": 0, "bytes_fetched": 0, "requests": 3,
        "requests_in_flight": 0, "retries": 0, "cache_hits": 1, "cache_misses": 1,
        "blocks_in_cache": 1, "cache_bytes": 65536, "cache_max_bytes": 192 << 20,
        "fetch_p50_ms": 12.0, "fetch_p99_ms": 45.67, "readahead_windows": [],
        "readahead_max_bytes": 64 << 20, "verify_failures": 0, "read_errors": 0,
        "digest_bytes_fetched": 65536, "digest_cache_bytes": 65536,
        "digest_index_bytes": 1 << 20, "zero_bytes": 3 << 30,
    }  # fmt: skip
    lines = stats_lines(doc)
    assert "64.0 KiB of 192.0 MiB (cache_size= less the replies in flight and the" in lines[3]
    assert lines[4] == (
        "digests          64.0 KiB fetched, 64.0 KiB held, 1.0 MiB of chunk indexes;"
        " 3.0 GiB of zero blocks made, not fetched"
    )
    assert lines[5] == "fetch latency    p50 12.0 ms, p99 45.7 ms"


def test_counts_have_their_noun_in_the_right_number() -> None:
    from backupfs.units import human, plural

    assert plural(1, "file") == "1 file" and plural(0, "file") == "0 files"
    assert human(1536) == "1.5 KiB" and human(10) == "10 B"
