"""A loopback HTTP server that misbehaves on purpose, for download tests.

Downloaders fail in the field on resets, truncation, drips, endless bodies, redirect loops, rate limits,
opt-out headers, corrupt images and decompression bombs. This server reproduces each of those deterministically
on 127.0.0.1 so tests can check the downloader's handling without the network. It counts accepted TCP
connections and request paths so tests can assert on retries and on connections that must never happen.
``CanaryServer`` is a bare TCP listener that only counts connections (to prove a blocked redirect never connects).

``FaultServer(tls=...)`` serves the same faults over TLS with a certificate from ``make_tls`` (a CA made for the
test, and server certificates signed by it — or by a second CA nobody trusts, or expired, or for other names); it
records the SNI name each TLS connection asked for (``sni``) and the host name each request carried (``hosts``).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import os
import random
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw

W, H = 320, 240
CHUNK = 64 * 1024
MAX_STREAM_S = 120.0


def _picture(variant: int = 0, size: tuple[int, int] = (W, H)) -> Image.Image:
    """An RGB gradient with a few shapes: real content, so encoders and decoders do real work."""
    w, h = size
    gx = Image.linear_gradient("L").rotate(90).resize((w, h))
    gy = Image.linear_gradient("L").resize((w, h))
    rad = Image.radial_gradient("L").resize((w, h))
    bands = (gx, gy, rad) if variant == 0 else (rad, gx, gy)
    img = Image.merge("RGB", bands)
    d = ImageDraw.Draw(img)
    d.ellipse((w * 0.1, h * 0.1, w * 0.45, h * 0.55), fill=(220, 40, 40) if variant == 0 else (40, 200, 90))
    d.rectangle((w * 0.55, h * 0.2, w * 0.9, h * 0.7), fill=(30, 60, 200), outline=(255, 255, 0), width=3)
    d.polygon([(w * 0.2, h * 0.9), (w * 0.5, h * 0.6), (w * 0.8, h * 0.95)], fill=(250, 250, 250))
    d.line((0, 0, w, h), fill=(0, 0, 0), width=4)
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_bomb_png(width: int = 30000, height: int = 30000, rows: int = 16) -> bytes:
    """A small PNG whose IHDR claims width x height 8-bit RGB; IDAT holds only ``rows`` zero rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((1 + 3 * width) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _corrupt_jpeg(jpeg: bytes) -> bytes:
    """Keep the real headers (through the SOS segment, >= 600 bytes), then random garbage to the same length."""
    sos = jpeg.find(b"\xff\xda")
    sos_end = sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0] if sos > 0 else 0
    keep = max(600, sos_end + 16)
    return jpeg[:keep] + random.Random(1234).randbytes(len(jpeg) - keep)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # a blocked read/write on a forgotten connection gives up eventually
    server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _head(self, status: int, ctype: str | None, length: int | None, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str | None = "text/plain", **headers: str) -> None:
        no_body = status in (204, 304) or status < 200
        self._head(status, ctype, None if no_body else len(body), {k.replace("_", "-"): v for k, v in headers.items()})
        if no_body:
            self.close_connection = True
        elif self.command != "HEAD":
            self.wfile.write(body)

    def _jpeg(self, **headers: str) -> None:
        self._send(200, self.server.blobs["/ok.jpg"][0], "image/jpeg", **headers)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", None, Location=location)

    def _stream(self, length: int | None, chunk: bytes, pause: float) -> None:
        """Headers, then ``chunk`` repeatedly until the client leaves, the server stops, or MAX_STREAM_S passes."""
        self._head(200, "image/jpeg", length)
        self.close_connection = True
        if self.command == "HEAD":
            return
        stop, deadline, sent = self.server.stop_event, time.monotonic() + MAX_STREAM_S, 0
        try:
            while not stop.is_set() and time.monotonic() < deadline and (length is None or sent < length):
                piece = chunk if length is None else chunk[: length - sent]
                self.wfile.write(piece)
                sent += len(piece)
                if pause and stop.wait(pause):
                    break
        except OSError:
            pass  # client went away

    def _reset(self) -> None:
        """Close with SO_LINGER (on, 0): the kernel sends RST, so the client's read fails with ECONNRESET."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the makefile reference so close() really closes the fd now
        self.connection.close()

    def _dispatch(self) -> None:
        srv = self.server
        parts = urlsplit(self.path)
        path = parts.path
        n = srv._record(path, self.headers.get("Host", ""))
        if path in srv.blobs:
            body, ctype, extra = srv.blobs[path]
            self._send(200, body, ctype, **extra)
        elif path.startswith("/img/") and path.endswith(".jpg"):
            self._jpeg()
        elif path.startswith("/status/"):
            code = path[len("/status/"):]
            if code.isdigit() and 100 <= int(code) <= 599:
                self._send(int(code), f"status {code}\n".encode())
            else:
                self._send(400, b"bad status code\n")
        elif path.startswith("/flaky/"):
            self._send(500, b"flaky: first try fails\n") if n == 1 else self._jpeg()
        elif path.startswith("/ratelimit/"):
            self._send(429, b"slow down\n", Retry_After="1") if n == 1 else self._jpeg()
        elif path == "/reset":
            self._reset()
        elif path == "/truncated.jpg":
            full = srv.blobs["/ok.jpg"][0]
            self._head(200, "image/jpeg", len(full))
            self.close_connection = True
            if self.command != "HEAD":
                self.wfile.write(full[:200])
        elif path == "/slow.jpg":
            self._stream(100_000, b"\xff", 0.2)
        elif path == "/endless":
            self._stream(None, srv.noise, 0.0)
        elif path == "/big.jpg":
            self._stream(200_000_000, bytes(CHUNK), 0.0)
        elif path == "/redirect-loop":
            self._redirect("/redirect-loop2")
        elif path == "/redirect-loop2":
            self._redirect("/redirect-loop")
        elif path == "/redirect":
            to = parse_qs(parts.query).get("to")
            self._redirect(to[0]) if to else self._send(400, b"missing ?to=\n")
        elif path.startswith("/redirect-chain/") and path[len("/redirect-chain/"):].isdigit():
            left = int(path[len("/redirect-chain/"):])
            self._redirect(f"/redirect-chain/{left - 1}") if left > 0 else self._jpeg()
        elif path == "/html":
            self._send(200, b"<!doctype html><html><body><p>not an image</p></body></html>", "text/html; charset=utf-8")
        elif path == "/empty":
            self._send(200, b"", "image/jpeg")
        else:
            self._send(404, b"not found\n")

    do_GET = do_HEAD = _dispatch


class FaultServer(ThreadingHTTPServer):
    """Context manager: ``with FaultServer() as fs: fs.url("/ok.jpg")``. Serves from a daemon thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: dict[str, str] | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.host: str = host
        self.port: int = self.server_address[1]
        self.base: str = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self.sni: list[str | None] = []
        self.hosts: list[str] = []
        self._tls: ssl.SSLContext | None = None
        if tls:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(tls["cert"], tls["key"])
            self._tls.sni_callback = lambda sock, name, ctx: self._note_sni(name)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._connections = 0
        self.hits: Counter[str] = Counter()
        self.times: defaultdict[str, list[float]] = defaultdict(list)
        self._thread: threading.Thread | None = None

        img = _picture(0)
        ok_jpg = _encode(img, "JPEG")
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").rotate(90).resize((W, H)).point(lambda v: 40 + v * 215 // 255))
        dup = _encode(_picture(1), "JPEG")
        self.noise: bytes = random.Random(7).randbytes(CHUNK)
        self.blobs: dict[str, tuple[bytes, str, dict[str, str]]] = {
            "/ok.jpg": (ok_jpg, "image/jpeg", {}),
            "/ok.png": (_encode(img, "PNG"), "image/png", {}),
            "/rgba.png": (_encode(rgba, "PNG"), "image/png", {}),
            "/gray.jpg": (_encode(img.convert("L"), "JPEG"), "image/jpeg", {}),
            "/cmyk.jpg": (_encode(img.convert("CMYK"), "JPEG"), "image/jpeg", {}),
            "/tiny.png": (_encode(_picture(0, (8, 8)), "PNG"), "image/png", {}),
            "/wide.png": (_encode(_picture(0, (1000, 50)), "PNG"), "image/png", {}),
            "/dup-a.jpg": (dup, "image/jpeg", {}),
            "/dup-b.jpg": (dup, "image/jpeg", {}),
            "/noai.jpg": (ok_jpg, "image/jpeg", {"X-Robots-Tag": "noai, noimageai"}),
            "/robots-other.jpg": (ok_jpg, "image/jpeg", {"X-Robots-Tag": "otherbot: noai"}),
            "/corrupt.jpg": (_corrupt_jpeg(ok_jpg), "image/jpeg", {}),
            "/bomb.png": (make_bomb_png(), "image/png", {}),
        }

    def _note_sni(self, name: str | None) -> None:
        with self._lock:
            self.sni.append(name)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Over TLS the handshake runs here, in the connection's own thread (a slow client holds no one else up)."""
        if self._tls is None:
            super().finish_request(request, client_address)
            return
        try:
            request.settimeout(10)
            tls_sock = self._tls.wrap_socket(request, server_side=True)  # takes over the file descriptor
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate, or hung up: nothing to serve
        with self._lock:
            self._open.discard(request)
            self._open.add(tls_sock)
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            with self._lock:
                self._open.discard(tls_sock)
            with contextlib.suppress(OSError):
                tls_sock.close()

    def drop_connections(self) -> None:
        """Close every connection the server holds open (what a server does to keep-alive connections left idle)."""
        with self._lock:
            open_socks = list(self._open)
        for s in open_socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Called at accept time, before the handler thread starts: count and track the socket."""
        with self._lock:
            self._connections += 1
            self._open.add(request)
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response is the point here; keep test output clean

    def _record(self, path: str, host: str = "") -> int:
        with self._lock:
            self.hosts.append(host)
            self.hits[path] += 1
            self.times[path].append(time.monotonic())
            return self.hits[path]

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (counted at accept time)."""
        with self._lock:
            return self._connections

    def reset_counts(self) -> None:
        """Zero connections, hits and times (this also re-arms /flaky/ and /ratelimit/ tokens)."""
        with self._lock:
            self._connections = 0
            self.hits.clear()
            self.times.clear()
            self.sni.clear()
            self.hosts.clear()

    def url(self, path: str, host: str | None = None) -> str:
        """The URL of ``path``; ``host`` puts a name in place of the address (tests resolve it themselves)."""
        base = self.base if host is None else f"{self.base.split(':')[0]}://{host}:{self.port}"
        return base + (path if path.startswith("/") else "/" + path)

    def __enter__(self) -> FaultServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FaultServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.shutdown()
        with self._lock:
            open_socks = list(self._open)
        for s in open_socks:  # wake handlers blocked in read/write on idle keep-alive or stalled connections
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class CanaryServer:
    """A bare TCP listener that counts accepted connections and answers anything with a 200 JPEG."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self.base = f"http://{host}:{self.port}"
        self.body = _encode(_picture(0, (32, 32)), "JPEG")
        self._lock = threading.Lock()
        self._connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"CanaryServer:{self.port}", daemon=True)

    connections = property(lambda self: self._connections, doc="TCP connections accepted so far.")
    url = FaultServer.url

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    data += piece
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(self.body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
                conn.sendall(head + (b"" if data.startswith(b"HEAD ") else self.body))
            except OSError:
                pass

    def __enter__(self) -> CanaryServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def make_tls(folder: str, names: tuple[str, ...] = ("localhost", "a.test", "b.test"),
             ips: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")) -> dict[str, dict[str, str]]:
    """Certificates for TLS tests, written into ``folder``. Returns {kind: {"ca", "cert", "key"} paths}:

    - ``good``: signed by the test CA, for ``names`` and ``ips``, valid now;
    - ``untrusted``: the same names, signed by a second CA that no bundle holds;
    - ``expired``: the test CA's, expired yesterday;
    - ``wrong_name``: the test CA's, for ``other.test`` only.

    Every kind's ``ca`` is the *test* CA's bundle (what a client is told to trust)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def ca(cn: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - day).not_valid_after(now + day)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(issuer: tuple[Any, Any], dns: tuple[str, ...], addrs: tuple[str, ...], start: datetime.datetime,
             end: datetime.datetime) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addrs]
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
                .issuer_name(issuer[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[0].public_key()), False)
                .sign(issuer[0], hashes.SHA256()))
        return key, cert

    def pem(obj: Any) -> bytes:
        if hasattr(obj, "private_bytes"):
            return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return obj.public_bytes(serialization.Encoding.PEM)

    os.makedirs(folder, exist_ok=True)
    test_ca, other_ca = ca("faultserver test CA"), ca("nobody's CA")
    ca_path = os.path.join(folder, "ca.pem")
    with open(ca_path, "wb") as f:
        f.write(pem(test_ca[1]))
    kinds = {"good": leaf(test_ca, names, ips, now - day, now + day),
             "untrusted": leaf(other_ca, names, ips, now - day, now + day),
             "expired": leaf(test_ca, names, ips, now - 3 * day, now - day),
             "wrong_name": leaf(test_ca, ("other.test",), (), now - day, now + day)}
    out = {}
    for kind, (key, cert) in kinds.items():
        paths = {"ca": ca_path, "cert": os.path.join(folder, f"{kind}.pem"), "key": os.path.join(folder, f"{kind}.key")}
        with open(paths["cert"], "wb") as f:
            f.write(pem(cert))
        with open(paths["key"], "wb") as f:
            f.write(pem(key))
        out[kind] = paths
    return out
