"""The per-URL guards against a real fault-injecting HTTP server on loopback (no Ray: fast, exact)."""

from __future__ import annotations

import socket
import time
from urllib.parse import quote

import pytest
from faultserver import CanaryServer, FaultServer

from pipeline.config import load_config
from pipeline.download.fetch import AddressPolicy, FetchLimits, close_idle, fetch
from pipeline.download.shard import _fetch_one, image_processor

DEADLINE = 2.0
EXPECTED = {
    "/ok.jpg": "ok", "/ok.png": "ok", "/rgba.png": "ok", "/gray.jpg": "ok", "/cmyk.jpg": "ok",
    "/robots-other.jpg": "ok", "/redirect-chain/3": "ok", "/flaky/t1": "ok", "/ratelimit/t2": "ok",
    "/status/404": "http_4xx", "/status/403": "http_4xx", "/status/500": "http_5xx", "/reset": "connection_reset",
    "/truncated.jpg": "truncated", "/slow.jpg": "timeout", "/big.jpg": "too_large", "/redirect-loop": "redirect_loop",
    "/redirect-chain/9": "redirect_loop", "/html": "not_an_image", "/empty": "empty_body",
    "/corrupt.jpg": "decode_error", "/bomb.png": "too_many_pixels", "/noai.jpg": "opted_out",
}


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture(autouse=True)
def no_pooled_connections():
    """Each test starts without idle keep-alive connections left by the one before (some count connections)."""
    close_idle()
    yield
    close_idle()


def limits(**kw) -> FetchLimits:
    return FetchLimits(**{"deadline_s": DEADLINE, "io_timeout_s": 1.0, "retries": 2, **kw})


def only(server) -> AddressPolicy:
    """The SSRF guard on, with exactly the fault server let through (as the demo does)."""
    return AddressPolicy(False, [f"127.0.0.1:{server.port}"])


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_every_fault_gets_its_code_within_the_deadline(server, path):
    proc = image_processor(load_config(None, ["download.image_size=32"]).download)
    t0 = time.monotonic()
    out = _fetch_one(server.url(path), limits(), only(server), proc)
    took = time.monotonic() - t0
    assert out.code == EXPECTED[path], out.message
    assert took < DEADLINE + 0.5, f"{path} ran {took:.2f}s past a {DEADLINE}s deadline"
    if out.code == "ok":
        assert out.data and out.meta["width"] == out.meta["height"] == 32


def test_endless_body_stops_at_the_cap_or_the_deadline(server):
    t0 = time.monotonic()
    small = fetch(server.url("/endless"), limits(max_bytes=1 << 20), only(server))
    assert small.code == "too_large"
    huge = fetch(server.url("/endless"), limits(max_bytes=1 << 40, deadline_s=1.0), only(server))
    assert huge.code == "timeout" and time.monotonic() - t0 < 3.0


def test_transient_errors_recover_and_honour_retry_after(server):
    got = fetch(server.url("/flaky/recover"), limits(), only(server))
    assert got.code == "ok" and got.attempts == 2
    got = fetch(server.url("/ratelimit/wait"), limits(deadline_s=5), only(server))
    times = server.times["/ratelimit/wait"]
    assert got.code == "ok" and len(times) == 2 and times[1] - times[0] >= 0.95, times
    no_retry = fetch(server.url("/flaky/once"), limits(retries=0), only(server))
    assert no_retry.code == "http_5xx" and no_retry.attempts == 1


def test_opt_out_header_can_be_turned_off(server):
    assert fetch(server.url("/noai.jpg"), limits(), only(server)).code == "opted_out"
    assert fetch(server.url("/noai.jpg"), limits(disallowed_directives=frozenset()), only(server)).code == "ok"


def test_size_and_aspect_filters_read_the_header(server):
    proc = image_processor(load_config(None, ["download.min_image_size=32", "download.max_aspect_ratio=3"]).download)
    assert _fetch_one(server.url("/tiny.png"), limits(), only(server), proc).code == "too_small"
    assert _fetch_one(server.url("/wide.png"), limits(), only(server), proc).code == "bad_aspect"
    assert _fetch_one(server.url("/ok.jpg"), limits(), only(server), proc).code == "ok"


def blocked_targets(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/", f"http://localhost:{port}/", f"http://2130706433:{port}/",
        f"http://0x7f000001:{port}/", f"http://127.1:{port}/", f"http://[::1]:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/", f"http://0.0.0.0:{port}/", "http://10.0.0.1/", "http://10.255.1.2:8080/",
        "http://172.16.5.4/", "http://172.31.255.1/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/", "http://[fe80::1]/", "http://224.0.0.1/", "http://100.64.0.1/",
    ]


def test_ssrf_guard_refuses_private_targets_and_redirects_to_them(server, monkeypatch):
    connects: list[tuple] = []
    real = socket.create_connection

    def spy(address, *args, **kwargs):
        connects.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    with CanaryServer() as canary:
        targets = blocked_targets(canary.port)
        for url in targets:
            got = fetch(url, limits(), only(server))
            assert got.code == "blocked_address", (url, got.code, got.message)
        for url in ["file:///etc/passwd", f"ftp://127.0.0.1:{canary.port}/x", "gopher://127.0.0.1/", "//x/y", ""]:
            assert fetch(url, limits(), only(server)).code == "bad_url", url
        assert connects == [], "a blocked target was connected to"
        for url in targets + ["file:///etc/passwd"]:
            got = fetch(server.url("/redirect?to=" + quote(url, safe="")), limits(), only(server))
            assert got.code in ("blocked_address", "bad_url"), (url, got.code)
        assert canary.connections == 0, "a redirect reached the canary"
        assert {a[1] for a in connects} == {server.port}, "only the allowed server was ever connected to"
        # the same canary, explicitly allowed, is reachable: the guard, not a dead port, stopped the requests above
        assert fetch(canary.url("/x.jpg"), limits(), AddressPolicy(False, [f"127.0.0.1:{canary.port}"])).code == "ok"
        assert canary.connections == 1


def test_allow_private_addresses_lets_loopback_through(server):
    assert fetch(server.url("/ok.jpg"), limits(), AddressPolicy(True)).code == "ok"
    assert fetch(server.url("/ok.jpg"), limits(), AddressPolicy(False)).code == "blocked_address"
    with pytest.raises(ValueError, match="bad entry"):
        AddressPolicy(False, ["not-an-address"])


@pytest.mark.parametrize("order", ["allowed first", "allowed last"])
def test_a_name_with_one_private_address_among_allowed_ones_is_refused(server, monkeypatch, order):
    """Every address a name resolves to is vetted, not only the first: a DNS answer that mixes the allowed server
    with the cloud metadata address is an attack (the next lookup, or another client, may pick the bad one)."""
    answer = ["127.0.0.1", "169.254.169.254"] if order == "allowed first" else ["169.254.169.254", "127.0.0.1"]
    real = socket.getaddrinfo
    connects: list[tuple] = []
    real_connect = socket.create_connection

    def fake(host, port, *args, **kwargs):
        if host == "mixed.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]
        return real(host, port, *args, **kwargs)

    def spy(address, *args, **kwargs):
        connects.append(address)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(socket, "create_connection", spy)
    got = fetch(server.url("/ok.jpg", host="mixed.test"), limits(), only(server))
    assert got.code == "blocked_address" and "169.254.169.254" in got.message, (got.code, got.message)
    assert connects == [], "a name with a blocked address was connected to"
    # the same server under a name resolving to the allowed address alone is fetched: the mix, not the port, is refused
    answer[:] = ["127.0.0.1"]
    assert fetch(server.url("/ok.jpg", host="mixed.test"), limits(), only(server)).code == "ok"
    assert connects == [("127.0.0.1", server.port)]


def test_the_watchdog_shuts_a_socket_down_at_its_deadline_unless_cancelled():
    """The deadline on a whole fetch rests on this thread: a socket whose lease expires is shut down (a read on it
    ends) even when no newer lease wakes the thread; a cancelled lease is left alone."""
    from pipeline.download.connections import Watchdog

    dog = Watchdog()
    a, peer_a = socket.socketpair()
    b, peer_b = socket.socketpair()
    try:
        dog.watch(a, time.monotonic() + 0.3)
        dog.cancel(dog.watch(b, time.monotonic() + 0.2))
        a.settimeout(3.0)
        t0 = time.monotonic()
        assert a.recv(1) == b""  # shut down: the read ends without data
        assert 0.25 <= time.monotonic() - t0 < 1.5
        time.sleep(0.2)
        peer_b.sendall(b"x")
        b.settimeout(1.0)
        assert b.recv(1) == b"x", "a cancelled lease's socket was shut down"
    finally:
        for s in (a, peer_a, b, peer_b):
            s.close()
