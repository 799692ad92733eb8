"""Fast checks of the test proxies (tests/support/proxy.py) against a real nginx."""

import os
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.nginx import Nginx
from tests.support.proxy import DelayProxy, FaultProxy

SIZE = 1024 * 1024 + 123


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> Iterator[Nginx]:
    base = tmp_path_factory.mktemp("proxy")
    root = base / "root"
    root.mkdir()
    (root / "a.img").write_bytes(blob)
    (root / "b.img").write_bytes(blob)
    with Nginx(root, base / "work") as n:
        yield n


@pytest.fixture
def fault(nginx: Nginx) -> Iterator[FaultProxy]:
    with FaultProxy(nginx.port) as p:
        yield p


def check_ok(client: httpx.Client, url: str, blob: bytes) -> None:
    r = client.get(url + "a.img", headers={"Range": "bytes=10-1009"})
    assert r.status_code == 206
    assert r.content == blob[10:1010]


# ------------------------------------------------------------------ DelayProxy


def test_delay_proxy_passes_bytes_exactly(nginx: Nginx, blob: bytes) -> None:
    for rtt in (0.0, 5.0):
        with DelayProxy(nginx.port, rtt_ms=rtt) as p, httpx.Client() as c:
            assert p.url == f"http://127.0.0.1:{p.port}/"
            assert c.get(p.url + "a.img").content == blob
            check_ok(c, p.url, blob)  # keep-alive connection reused


def test_delay_proxy_adds_rtt(nginx: Nginx, blob: bytes) -> None:
    with DelayProxy(nginx.port, rtt_ms=100) as p, httpx.Client() as c:
        check_ok(c, p.url, blob)  # connect outside the timed request
        t0 = time.monotonic()
        check_ok(c, p.url, blob)
        assert 0.1 <= time.monotonic() - t0 < 0.5


def test_delay_proxy_rate_cap(nginx: Nginx, blob: bytes) -> None:
    # 80 Mbit/s = 10 MB/s: ~1 MiB takes ~0.1 s (plus at most the 20 ms burst credit)
    with DelayProxy(nginx.port, rate_mbit=80) as p, httpx.Client() as c:
        t0 = time.monotonic()
        assert c.get(p.url + "a.img").content == blob
        assert time.monotonic() - t0 >= 0.08


def test_delay_proxy_stop_closes_open_connections(nginx: Nginx, blob: bytes) -> None:
    with httpx.Client() as c:
        with DelayProxy(nginx.port, rtt_ms=10) as p:
            check_ok(c, p.url, blob)
        with pytest.raises(httpx.TransportError):
            c.get(p.url + "a.img")


# ------------------------------------------------------------------ FaultProxy


def test_fault_proxy_plain(fault: FaultProxy, blob: bytes) -> None:
    with httpx.Client() as c:
        assert c.get(fault.url + "a.img").content == blob
        assert c.head(fault.url + "a.img").headers["content-length"] == str(SIZE)
        check_ok(c, fault.url, blob)
        assert c.get(fault.url + "missing").status_code == 404
        check_ok(c, fault.url, blob)
    assert fault.requests == 5
    assert fault.faults_left() == 0


def test_status503(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("status503", count=2)
    assert fault.faults_left() == 2
    with httpx.Client() as c:
        for _ in range(2):
            r = c.get(fault.url + "a.img")
            assert r.status_code == 503
            assert r.content
        assert fault.faults_left() == 0
        check_ok(c, fault.url, blob)


def test_reset(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("reset")
    with httpx.Client() as c:
        with pytest.raises(httpx.ReadError):
            c.get(fault.url + "a.img")
        check_ok(c, fault.url, blob)


def test_truncate(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("truncate")
    with httpx.Client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(fault.url + "a.img")
        check_ok(c, fault.url, blob)


def test_truncate_streamed_body_is_half(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("truncate")
    got = bytearray()
    with httpx.Client() as c:
        with c.stream("GET", fault.url + "a.img") as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(SIZE)
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in r.iter_raw():
                    got += chunk
        assert bytes(got) == blob[: SIZE // 2]
        check_ok(c, fault.url, blob)


def test_corrupt(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("corrupt")
    with httpx.Client() as c:
        body = c.get(fault.url + "a.img").content
        assert len(body) == SIZE
        assert sum(x != y for x, y in zip(body, blob, strict=True)) == 1
        assert c.get(fault.url + "a.img").content == blob


def test_ignore_range(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("ignore_range")
    with httpx.Client() as c:
        r = c.get(fault.url + "a.img", headers={"Range": "bytes=10-1009"})
        assert r.status_code == 200
        assert r.content == blob
        check_ok(c, fault.url, blob)


def test_wrong_range(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("wrong_range")
    with httpx.Client() as c:
        r = c.get(fault.url + "a.img", headers={"Range": "bytes=10-1009"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes 11-1010/{SIZE}"
        assert r.content == blob[11:1011]
        check_ok(c, fault.url, blob)


def test_stall(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("stall", stall_s=2)
    with httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as c:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            c.get(fault.url + "a.img")
        assert time.monotonic() - t0 < 1.5
        check_ok(c, fault.url, blob)


def test_stop_does_not_wait_for_stall(nginx: Nginx) -> None:
    with httpx.Client(timeout=httpx.Timeout(5, read=0.2)) as c:
        with FaultProxy(nginx.port) as p:
            p.add_fault("stall", stall_s=60)
            with pytest.raises(httpx.ReadTimeout):
                c.get(p.url + "a.img")
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("FaultProxy")]


def test_path_contains_selects_requests(fault: FaultProxy, blob: bytes) -> None:
    fault.add_fault("status503", path_contains="b.img")
    with httpx.Client() as c:
        assert c.get(fault.url + "a.img").content == blob
        assert fault.faults_left() == 1
        assert c.get(fault.url + "b.img").status_code == 503
        assert fault.faults_left() == 0
        assert c.get(fault.url + "b.img").content == blob


def test_unknown_fault_kind(fault: FaultProxy) -> None:
    with pytest.raises(ValueError):
        fault.add_fault("explode")  # type: ignore[arg-type]


def test_port_known_before_start() -> None:
    p = DelayProxy(1)
    assert p.port > 0
    assert p.url == f"http://127.0.0.1:{p.port}/"
    p.stop()  # stopping a never-started proxy just closes its listener
