"""Self-test for tests/faultserver.py: the download tests trust each fault to be what it claims, so check them here.

Uses only the stdlib HTTP clients and Pillow (no pipeline code, no Ray), and runs in a few seconds.
"""

from __future__ import annotations

import http.client
import io
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from faultserver import CanaryServer, FaultServer
from PIL import Image


@pytest.fixture
def fs() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


def _get(url: str, timeout: float = 5) -> tuple[int, http.client.HTTPMessage, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def _raw(fs: FaultServer, path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(fs.host, fs.port, timeout=5)
    conn.request(method, path)
    return conn.getresponse()


@pytest.mark.parametrize("path,ctype,mode,size", [
    ("/ok.jpg", "image/jpeg", "RGB", (320, 240)),
    ("/ok.png", "image/png", "RGB", (320, 240)),
    ("/rgba.png", "image/png", "RGBA", (320, 240)),
    ("/gray.jpg", "image/jpeg", "L", (320, 240)),
    ("/cmyk.jpg", "image/jpeg", "CMYK", (320, 240)),
    ("/tiny.png", "image/png", "RGB", (8, 8)),
    ("/wide.png", "image/png", "RGB", (1000, 50)),
    ("/img/anything-123.jpg", "image/jpeg", "RGB", (320, 240)),
])
def test_images(fs: FaultServer, path: str, ctype: str, mode: str, size: tuple[int, int]) -> None:
    status, headers, body = _get(fs.url(path))
    assert status == 200 and headers["Content-Type"] == ctype
    assert int(headers["Content-Length"]) == len(body) > 0
    img = Image.open(io.BytesIO(body))
    img.load()
    assert (img.mode, img.size) == (mode, size)
    if mode == "RGBA":
        lo, hi = img.getchannel("A").getextrema()
        assert lo < 255 and hi == 255


def test_dups_and_robots(fs: FaultServer) -> None:
    a, b, ok = (_get(fs.url(p))[2] for p in ("/dup-a.jpg", "/dup-b.jpg", "/ok.jpg"))
    assert a == b != ok
    assert _get(fs.url("/noai.jpg"))[1]["X-Robots-Tag"] == "noai, noimageai"
    assert _get(fs.url("/robots-other.jpg"))[1]["X-Robots-Tag"] == "otherbot: noai"


def test_status_html_empty_unknown(fs: FaultServer) -> None:
    for code in (403, 404, 500):
        assert _get(fs.url(f"/status/{code}"))[0] == code
    status, headers, body = _get(fs.url("/html"))
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in body
    status, headers, body = _get(fs.url("/empty"))
    assert (status, headers["Content-Type"], headers["Content-Length"], body) == (200, "image/jpeg", "0", b"")
    assert _get(fs.url("/no/such/thing"))[0] == 404
    resp = _raw(fs, "/ok.jpg", "HEAD")
    assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0 and resp.read() == b""


def test_flaky_and_ratelimit(fs: FaultServer) -> None:
    assert [_get(fs.url("/flaky/x"))[0] for _ in range(3)] == [500, 200, 200]
    assert _get(fs.url("/flaky/y"))[0] == 500  # per token
    status, headers, _ = _get(fs.url("/ratelimit/x?attempt=1"))
    assert status == 429 and headers["Retry-After"] == "1"
    assert _get(fs.url("/ratelimit/x"))[0] == 200
    assert fs.hits["/ratelimit/x"] == 2 and len(fs.times["/ratelimit/x"]) == 2
    fs.reset_counts()
    assert fs.hits["/flaky/x"] == 0 and _get(fs.url("/flaky/x"))[0] == 500


def test_reset_and_truncated(fs: FaultServer) -> None:
    with pytest.raises(ConnectionResetError):
        _raw(fs, "/reset").read()
    resp = _raw(fs, "/truncated.jpg")
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(fs.blobs["/ok.jpg"][0])
    with pytest.raises(http.client.IncompleteRead):
        resp.read()


def test_corrupt_and_bomb(fs: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = fs.blobs["/ok.jpg"][0]
    body = _get(fs.url("/corrupt.jpg"))[2]
    assert len(body) == len(ok) and body[:600] == ok[:600] and body != ok
    with pytest.raises(OSError):  # headers parse, the entropy-coded data does not
        Image.open(io.BytesIO(body)).load()
    body = _get(fs.url("/bomb.png"))[2]
    assert len(body) < 100_000
    with pytest.raises(Image.DecompressionBombError):  # Pillow's default guard trips at open time
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(body)) as img:  # header only, nothing decoded
        assert img.size == (30000, 30000) and img.mode == "RGB"


def test_redirects(fs: FaultServer) -> None:
    resp = _raw(fs, "/redirect-loop")
    assert resp.status == 302 and resp.headers["Location"] == "/redirect-loop2"
    resp = _raw(fs, "/redirect-loop2")
    assert resp.status == 302 and resp.headers["Location"] == "/redirect-loop"
    target = fs.url("/ok.jpg")
    resp = _raw(fs, "/redirect?to=" + urllib.parse.quote(target, safe=""))
    assert resp.status == 302 and resp.headers["Location"] == target
    status, _, body = _get(fs.url("/redirect-chain/3"))
    assert status == 200 and body == fs.blobs["/ok.jpg"][0]
    assert all(fs.hits[f"/redirect-chain/{i}"] == 1 for i in range(4))


def test_streams_and_fast_shutdown() -> None:
    fs = FaultServer()
    with fs:
        slow, endless, big = (_raw(fs, p) for p in ("/slow.jpg", "/endless", "/big.jpg"))
        assert slow.headers["Content-Length"] == "100000" and slow.read(2) == b"\xff\xff"
        assert endless.headers["Content-Length"] is None and len(endless.read(256 * 1024)) == 256 * 1024
        assert big.headers["Content-Length"] == "200000000" and big.read(128 * 1024) == bytes(128 * 1024)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3  # handlers mid-drip/stream don't block shutdown
    for r in (slow, endless, big):
        r.close()


def test_connection_counting_and_canary(fs: FaultServer) -> None:
    before = fs.connections
    for _ in range(3):
        _get(fs.url("/ok.jpg"))
    assert fs.connections >= before + 3
    with CanaryServer() as canary:
        assert canary.connections == 0
        status, _, body = _get(fs.url("/redirect?to=" + urllib.parse.quote(canary.url("/x.jpg"), safe="")))
        assert status == 200 and body == canary.body
        assert canary.connections == 1
