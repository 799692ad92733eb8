"""The HTTP client's one runtime adjustment of httpcore (remote.client.enlarge_socket_reads)."""

import httpcore

from backupfs.remote.client import SOCKET_READ_BYTES, enlarge_socket_reads


def test_httpcore_still_has_the_attribute_we_raise() -> None:
    # If a new httpcore drops or renames it, the daemon silently spends twice the CPU per
    # byte: fail here instead, and re-measure (docs/benchmarks.md) before adapting.
    assert isinstance(httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, int)


def test_enlarge_socket_reads_raises_the_read_size() -> None:
    saved = httpcore.AsyncHTTP11Connection.READ_NUM_BYTES
    try:
        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 64 * 1024
        enlarge_socket_reads()
        assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == SOCKET_READ_BYTES
        enlarge_socket_reads()  # idempotent
        assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == SOCKET_READ_BYTES
    finally:
        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = saved
