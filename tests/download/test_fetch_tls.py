"""HTTPS and keep-alive against the fault server over TLS (no Ray): the fault matrix again, certificate failures as
``tls_error`` (never retried), SNI and vetted-address pinning across a redirect from one host name to another, and
what the connection pool may and may not reuse."""

from __future__ import annotations

import socket
import time
from urllib.parse import quote

import pytest
from faultserver import FaultServer, make_tls
from test_fetch import DEADLINE, EXPECTED

from pipeline.config import load_config
from pipeline.download import connections
from pipeline.download.fetch import AddressPolicy, FetchLimits, close_idle, fetch
from pipeline.download.shard import _fetch_one, image_processor
from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_tls(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tls_server(certs):
    with FaultServer(tls=certs["good"]) as s:
        yield s


@pytest.fixture(autouse=True)
def fresh_pool():
    close_idle()
    yield
    close_idle()


def limits(certs, **kw) -> FetchLimits:
    return FetchLimits(**{"deadline_s": DEADLINE, "io_timeout_s": 1.0, "retries": 2, "ca_bundle": certs["good"]["ca"],
                          **kw})


def only(server) -> AddressPolicy:
    return AddressPolicy(False, [f"127.0.0.1:{server.port}"])


@pytest.fixture
def names(monkeypatch):
    """Host names resolved by the test: {name: [address for the 1st lookup, the 2nd, ...]}; lookups are logged."""
    table: dict[str, list[str]] = {}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in table:
            lookups.append(host)
            addrs = table[host]
            ip = addrs[min(lookups.count(host), len(addrs)) - 1]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return table, lookups


@pytest.fixture
def connects(monkeypatch):
    """Every (address, port) a connection was opened to."""
    seen: list[tuple] = []
    real = socket.create_connection

    def spy(address, *args, **kwargs):
        seen.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return seen


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_every_fault_gets_its_code_over_tls(tls_server, certs, path):
    proc = image_processor(load_config(None, ["download.image_size=32"]).download)
    t0 = time.monotonic()
    out = _fetch_one(tls_server.url(path), limits(certs), only(tls_server), proc)
    took = time.monotonic() - t0
    assert out.code == EXPECTED[path], out.message
    assert took < DEADLINE + 0.5, f"{path} ran {took:.2f}s past a {DEADLINE}s deadline"


def test_faults_in_a_row_on_pooled_connections(tls_server, certs):
    """The matrix again without emptying the pool between URLs: a connection left by one fault never spoils the next
    URL, and a drip still times out when it arrives on a reused connection."""
    proc = image_processor(load_config(None, ["download.image_size=32"]).download)
    for path in ["/ok.jpg", "/slow.jpg", "/ok.png", "/truncated.jpg", "/gray.jpg", "/status/404", "/ok.jpg",
                 "/redirect-chain/2", "/reset", "/big.jpg", "/cmyk.jpg", "/noai.jpg", "/ok.jpg"]:
        t0 = time.monotonic()
        out = _fetch_one(tls_server.url(path), limits(certs, retries=0), only(tls_server), proc)
        assert out.code == EXPECTED.get(path, "ok"), (path, out.message)
        assert time.monotonic() - t0 < DEADLINE + 0.5, path


@pytest.mark.parametrize("kind,why", [("untrusted", "certificate rejected"), ("expired", "certificate rejected"),
                                      ("wrong_name", "certificate rejected")])
def test_certificate_errors_are_tls_error_and_not_retried(certs, kind, why):
    with FaultServer(tls=certs[kind]) as bad:
        got = fetch(bad.url("/ok.jpg"), limits(certs, retries=3), only(bad))
        assert got.code == "tls_error" and why in got.message, got.message
        assert got.attempts == 1 and bad.hits["/ok.jpg"] == 0 and bad.connections == 1


def test_the_system_store_does_not_trust_a_private_ca(tls_server, certs):
    got = fetch(tls_server.url("/ok.jpg"), limits(certs, ca_bundle=""), only(tls_server))
    assert got.code == "tls_error" and got.attempts == 1


def test_redirect_to_another_name_gets_its_own_sni_connection_and_vetted_address(tls_server, certs, names, connects):
    table, lookups = names
    # b.test rebinds after its first lookup: a second lookup (one the guard never vetted) would send us elsewhere
    table.update({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1", "169.254.169.254"]})
    tls_server.reset_counts()
    to = quote(tls_server.url("/ok.jpg", host="b.test"), safe="")
    policy = AddressPolicy(False, [f"127.0.0.1:{tls_server.port}"])
    got = fetch(tls_server.url(f"/redirect?to={to}", host="a.test"), limits(certs), policy)
    assert got.code == "ok" and got.final_url.startswith("https://b.test:")
    assert tls_server.sni == ["a.test", "b.test"], "each name's connection sends its own name as SNI"
    assert tls_server.connections == 2, "a.test's connection (same address and port) never carries b.test"
    assert [h.split(":")[0] for h in tls_server.hosts] == ["a.test", "b.test"]
    assert lookups == ["a.test", "b.test"], "one lookup per name, the connection goes where that lookup said"
    assert connects == [("127.0.0.1", tls_server.port)] * 2
    again = fetch(tls_server.url("/ok.jpg", host="b.test"), limits(certs), policy)
    assert again.code == "blocked_address", "the rebound name is vetted again, even with a pooled connection"
    assert tls_server.connections == 2


def test_keep_alive_reuses_one_connection_per_name_and_address(tls_server, certs, names, connects):
    table, _ = names
    table.update({"a.test": ["127.0.0.1"]})
    tls_server.reset_counts()
    for _ in range(5):
        assert fetch(tls_server.url("/ok.jpg", host="a.test"), limits(certs), only(tls_server)).code == "ok"
    assert tls_server.connections == 1 and tls_server.sni == ["a.test"] and len(connects) == 1
    off = limits(certs, keep_alive=False)
    for _ in range(2):
        assert fetch(tls_server.url("/ok.jpg", host="a.test"), off, only(tls_server)).code == "ok"
    assert tls_server.connections == 3, "keep_alive=False: a connection per URL"


def test_a_name_that_moves_to_another_address_gets_a_new_connection(certs, names):
    table, _ = names
    with FaultServer(tls=certs["good"]) as one, FaultServer("127.0.0.2", one.port, tls=certs["good"]) as two:
        policy = AddressPolicy(False, [f"127.0.0.1:{one.port}", f"127.0.0.2:{one.port}"])
        table.update({"a.test": ["127.0.0.1", "127.0.0.2"]})
        assert fetch(one.url("/ok.jpg", host="a.test"), limits(certs), policy).code == "ok"
        assert fetch(one.url("/ok.jpg", host="a.test"), limits(certs), policy).code == "ok"
        assert (one.connections, one.hits["/ok.jpg"]) == (1, 1), "the pooled connection stays on its own address"
        assert (two.connections, two.hits["/ok.jpg"]) == (1, 1)


def test_a_pooled_connection_outlives_the_deadline_of_the_fetch_that_opened_it(tls_server, certs):
    tls_server.reset_counts()
    assert fetch(tls_server.url("/ok.jpg"), limits(certs, deadline_s=0.5), only(tls_server)).code == "ok"
    time.sleep(0.7)  # the first fetch's deadline has passed: its watchdog lease must not shut the pooled socket
    got = fetch(tls_server.url("/ok.png"), limits(certs), only(tls_server))
    assert got.code == "ok" and tls_server.connections == 1


def test_a_connection_the_server_dropped_while_idle_is_replaced_quietly(tls_server, certs):
    tls_server.reset_counts()
    assert fetch(tls_server.url("/ok.jpg"), limits(certs), only(tls_server)).code == "ok"
    tls_server.drop_connections()
    time.sleep(0.1)
    got = fetch(tls_server.url("/ok.jpg"), limits(certs, retries=0), only(tls_server))
    assert got.code == "ok" and got.attempts == 1 and tls_server.connections == 2


def test_pool_bounds():
    pool = connections.Pool(max_per_key=2, max_total=3, max_idle_s=0.2)
    made = []
    for i in range(5):
        c = connections.GuardedHTTP("h", 1, "127.0.0.1", 1.0)
        c.sock = socket.socket()  # stands in for an open connection
        made.append(c)
        pool.put(("http", f"h{i % 2}", 1, "127.0.0.1", ""), c)
    assert len(pool) == 3, "at most max_total idle connections"
    assert pool.get(("http", "h0", 1, "127.0.0.1", "")) is made[4], "most recently used first"
    assert pool.get(("http", "other", 1, "127.0.0.1", "")) is None
    time.sleep(0.25)
    assert pool.get(("http", "h1", 1, "127.0.0.1", "")) is None, "idle past max_idle_s: closed, not handed out"
    pool.clear()
    assert len(pool) == 0


def test_ca_bundle_is_checked_when_the_config_loads(tmp_path, certs):
    assert load_config(None, [f"download.ca_bundle={certs['good']['ca']}"]).download.ca_bundle
    (tmp_path / "junk.pem").write_text("not a certificate")
    for bad in (str(tmp_path / "junk.pem"), str(tmp_path / "absent.pem")):
        with pytest.raises(ConfigError, match="download.ca_bundle"):
            load_config(None, [f"download.ca_bundle={bad}"])
