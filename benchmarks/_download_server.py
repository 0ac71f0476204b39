"""The loopback image servers and image sets of ``bench_download.py``.

**web** (``--case web``): a server that answers like the web.

- **Latency:** every response waits a lognormal time (median ``median_ms``, sigma ``sigma``); a fixed ``slow_fraction``
  of the URLs (chosen by id, so both tools meet the same slow URLs) wait ``slow_factor`` times longer. A *new*
  connection first waits one round trip (``rtt_ms``: the TCP handshake) or two over TLS (TCP + the TLS 1.3 handshake),
  so a client that reuses connections saves what it saves on the web.
- **Hosts:** ``hosts`` listeners on 127.0.0.1, one port each: a few CDN-like hosts carry most URLs (Zipf weights), a
  long tail carries a few each. Every listener speaks HTTP/1.1 with keep-alive (closing when asked) and, on a second
  port, the same over TLS with a certificate signed by a CA made for the run (``make_ca``).
- **Images:** a LAION-like mix (``image_set``): shorter side lognormal with median ~450 px clipped to 150-1,500,
  common aspect ratios, ~85 % JPEG / 9 % PNG / 6 % WebP. ``bases`` distinct pictures are generated once (cached under
  benchmarks/.cache/); each URL's bytes are its base plus a metadata block holding the URL id (a JPEG COM segment, a
  PNG tEXt chunk, a WebP RIFF chunk), so every URL has distinct bytes (no tool can de-duplicate them) and decodes to
  the same pixels at the same cost.

The server runs in its own process on asyncio (no thread per connection) so its CPU share stays small and the same
for both tools; ``start`` returns the process and the port maps.

**zero** (``--case zero``, the original case): ~1024x768 photo-like JPEGs served from memory with no latency over plain
HTTP/1.0 (``zero_image_set``, ``start_zero``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SET_VERSION = 1
FORMATS = (("jpg", 0.85), ("png", 0.09), ("webp", 0.06))
ASPECTS = ((1.0, 0.25), (4 / 3, 0.30), (3 / 2, 0.20), (16 / 9, 0.10), (5 / 4, 0.05), (2.0, 0.05), (1.6, 0.05))
CTYPE = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class WebProfile:
    median_ms: float = 100.0
    sigma: float = 0.5
    slow_fraction: float = 0.03
    slow_factor: float = 10.0
    rtt_ms: float = 25.0
    hosts: int = 150
    cdn_hosts: int = 10
    cdn_share: float = 0.6
    idle_timeout_s: float = 30.0
    seed: int = 0


# ------------------------------------------------------------------------------------------------------ the images


def _picture(w: int, h: int, r: np.random.Generator, noise: float) -> np.ndarray:
    """Gradients, filled shapes and sensor-like noise: JPEG sizes near those of photos (~1-2 bits per pixel)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, px, py = r.uniform(0.5, 3, 4) * (1, 1, 2, 2)
        img[..., c] = 127 + 60 * np.sin(x / w * np.pi * fx + px) + 50 * np.cos(y / h * np.pi * fy + py)
    img = img.clip(0, 255).astype(np.uint8)
    for _ in range(30):
        colour = tuple(int(v) for v in r.integers(0, 256, 3))
        if r.random() < 0.5:
            cx, cy = int(r.integers(0, w)), int(r.integers(0, h))
            cv2.circle(img, (cx, cy), int(r.integers(5, max(6, min(w, h) // 4))), colour, -1, cv2.LINE_AA)
        else:
            p = r.integers(0, [w, h], size=(2, 2))
            cv2.rectangle(img, (int(p[0, 0]), int(p[0, 1])), (int(p[1, 0]), int(p[1, 1])), colour, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.2)
    if noise:
        img = (img + r.normal(0, noise, img.shape)).clip(0, 255).astype(np.uint8)
    return img


def _base(i: int, seed: int) -> tuple[str, bytes, int, int]:
    r = np.random.default_rng(seed * 1_000_003 + i)
    short = int(np.clip(np.exp(r.normal(np.log(450), 0.45)), 150, 1500))
    aspect = r.choice([a for a, _ in ASPECTS], p=[p for _, p in ASPECTS])
    long = int(round(short * aspect))
    w, h = (long, short) if r.random() < 0.7 else (short, long)  # most photos are landscape
    fmt = r.choice([f for f, _ in FORMATS], p=[p for _, p in FORMATS])
    if fmt == "png":  # PNGs on the web are mostly graphics (flat colour, sharp edges, no noise), some with alpha
        img = _picture(w, h, r, 0.0)
        if r.random() < 0.3:
            alpha = np.full((h, w, 1), 255, np.uint8)
            if r.random() < 0.5:
                cv2.circle(alpha, (w // 2, h // 2), min(w, h) // 2, 0, -1)
            img = np.concatenate([img, alpha], axis=2)
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    elif fmt == "webp":
        ok, buf = cv2.imencode(".webp", _picture(w, h, r, 3.0), [cv2.IMWRITE_WEBP_QUALITY, 80])
    else:
        ok, buf = cv2.imencode(".jpg", _picture(w, h, r, float(r.uniform(3.0, 7.0))),
                               [cv2.IMWRITE_JPEG_QUALITY, int(r.integers(75, 93))])
    assert ok
    return str(fmt), buf.tobytes(), w, h


def _bases_chunk(job: tuple[list[int], int]) -> list[tuple[str, bytes, int, int]]:
    cv2.setNumThreads(1)
    ids, seed = job
    return [_base(i, seed) for i in ids]


def image_set(bases: int, workers: int, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """The cached folder of ``bases`` LAION-like images (``<i>.<fmt>``) and its manifest (generated on first use)."""
    folder = os.path.join(HERE, ".cache", f"web_{bases}_s{seed}_v{SET_VERSION}")
    manifest_path = os.path.join(folder, "manifest.json")
    if os.path.isfile(manifest_path):
        manifest = json.load(open(manifest_path))
        manifest["cached"] = True
        return folder, manifest
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        made = [b for part in pool.map(_bases_chunk, [(list(range(k, bases, workers)), seed) for k in range(workers)])
                for b in part]
    order = sorted(range(bases), key=lambda i: (i % workers, i // workers))  # pool.map's chunk order → ids
    entries = [None] * bases
    for i, (fmt, blob, w, h) in zip(order, made):
        with open(os.path.join(folder, f"{i}.{fmt}"), "wb") as f:
            f.write(blob)
        entries[i] = {"fmt": fmt, "bytes": len(blob), "w": w, "h": h}
    sizes = np.array([e["bytes"] for e in entries])
    shorts = np.array([min(e["w"], e["h"]) for e in entries])
    manifest = {"bases": bases, "seed": seed, "version": SET_VERSION, "images": entries,
                "formats": {f: sum(e["fmt"] == f for e in entries) for f, _ in FORMATS},
                "short_side_px": {"min": int(shorts.min()), "median": int(np.median(shorts)), "max": int(shorts.max())},
                "bytes": {"min": int(sizes.min()), "median": int(np.median(sizes)), "mean": int(sizes.mean()),
                          "max": int(sizes.max())},
                "generate_s": round(time.perf_counter() - t0, 2)}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f)
    os.replace(manifest_path + ".tmp", manifest_path)
    manifest["cached"] = False
    return folder, manifest


def tag(fmt: str, blob: bytes, ident: int) -> tuple[bytes, bytes, bytes]:
    """``blob`` with a metadata block naming ``ident`` spliced in, as (before, block, after): distinct bytes per URL,
    the same pixels. Each format's own way of carrying ignorable metadata is used, so every decoder accepts it."""
    text = b"url-id %013d" % ident  # an even length: RIFF chunks are 2-byte aligned
    if fmt == "jpg":  # COM segment right after SOI
        return blob[:2], b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text, blob[2:]
    if fmt == "png":  # tEXt chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)
        data = b"Comment\x00" + text
        chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
        return blob[:33], chunk, blob[33:]
    # WebP: an unknown RIFF chunk at the end (decoders skip it), RIFF size fixed up
    chunk = b"ID  " + struct.pack("<I", len(text)) + text
    head = blob[:4] + struct.pack("<I", len(blob) - 8 + len(chunk)) + blob[8:]
    return head, chunk, b""


# ------------------------------------------------------------------------------------------------------------- TLS


def make_ca(folder: str, names: list[str], ips: list[str]) -> dict[str, str]:
    """A CA made for this run and a server certificate it signs (ECDSA P-256, as CDNs serve) for ``names``/``ips``.
    Returns the paths: ``ca`` (the bundle a client trusts), ``cert``, ``key``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench_download test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(folder, exist_ok=True)
    paths = {"ca": os.path.join(folder, "ca.pem"), "cert": os.path.join(folder, "server.pem"),
             "key": os.path.join(folder, "server.key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


# ---------------------------------------------------------------------------------------------------------- server


def latencies(n: int, profile: WebProfile) -> np.ndarray:
    """Seconds each URL id waits before its answer: lognormal, and ``slow_fraction`` of the ids ``slow_factor`` x."""
    r = np.random.default_rng(profile.seed + 77)
    lat = np.exp(r.normal(np.log(profile.median_ms / 1e3), profile.sigma, n))
    slow = r.random(n) < profile.slow_fraction
    lat[slow] *= profile.slow_factor
    return lat


def host_of(n: int, profile: WebProfile) -> np.ndarray:
    """The host index serving each URL id: ``cdn_share`` of the URLs on ``cdn_hosts`` (Zipf weights), the rest
    spread evenly over the long tail."""
    r = np.random.default_rng(profile.seed + 91)
    cdn = r.random(n) < profile.cdn_share
    zipf = 1.0 / np.arange(1, profile.cdn_hosts + 1)
    out = np.where(cdn, r.choice(profile.cdn_hosts, n, p=zipf / zipf.sum()),
                   r.integers(profile.cdn_hosts, profile.hosts, n))
    return out.astype(np.int32)


def _serve(folder: str, manifest: dict[str, Any], n: int, profile: dict[str, Any], tls: dict[str, str],
           conn: Any) -> None:
    import asyncio
    import ssl

    prof = WebProfile(**profile)
    entries = manifest["images"]
    blobs = [open(os.path.join(folder, f"{i}.{e['fmt']}"), "rb").read() for i, e in enumerate(entries)]
    lat = latencies(n, prof).tolist()
    hosts = host_of(n, prof).tolist()
    rtt = prof.rtt_ms / 1e3
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    counts = {"connections": 0, "tls_connections": 0, "requests": 0}

    def response(path: bytes, host: int) -> tuple[list[bytes], float]:
        try:  # /i/<id>.<fmt>
            ident = int(path[3:].split(b".")[0])
        except ValueError:
            return [not_found], 0.0
        if not path.startswith(b"/i/") or not 0 <= ident < n or hosts[ident] != host:
            return [not_found], 0.0
        b = ident % len(blobs)
        fmt = entries[b]["fmt"]
        parts = tag(fmt, blobs[b], ident)
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: {CTYPE[fmt]}\r\nContent-Length: {sum(map(len, parts))}\r\n"
                "Cache-Control: max-age=31536000\r\n").encode()
        return [head, *parts], lat[ident]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: int, secure: bool) -> None:
        counts["connections"] += 1
        counts["tls_connections"] += secure
        setup = rtt * (2 if secure else 1)  # TCP handshake, + the TLS 1.3 handshake's round trip
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), prof.idle_timeout_s)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                        ssl.SSLError):
                    return
                counts["requests"] += 1
                line, _, rest = head.partition(b"\r\n")
                parts = line.split(b" ")
                close = len(parts) < 3 or parts[2] != b"HTTP/1.1" or b"connection: close" in rest.lower()
                chunks, wait = response(parts[1] if len(parts) > 1 else b"", host)
                await asyncio.sleep(wait + setup)
                setup = 0.0
                if close:
                    chunks[0] += b"Connection: close\r\n"
                chunks[0] += b"\r\n"
                writer.writelines(chunks)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            try:
                writer.close()
            except (ConnectionError, ssl.SSLError, OSError):
                pass

    async def main() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls["cert"], tls["key"])
        http_ports, https_ports, servers = [], [], []
        for h in range(prof.hosts):
            for secure, ports in ((False, http_ports), (True, https_ports)):
                tls_args: dict[str, Any] = {"ssl": ctx, "ssl_handshake_timeout": 30} if secure else {}
                srv = await asyncio.start_server(lambda r, w, h=h, s=secure: handle(r, w, h, s), "127.0.0.1", 0,
                                                 backlog=1024, **tls_args)
                servers.append(srv)
                ports.append(srv.sockets[0].getsockname()[1])
        conn.send({"http": http_ports, "https": https_ports})
        loop = asyncio.get_running_loop()
        while True:  # answer "counts?" on the pipe, so the benchmark can read connections per run
            await loop.run_in_executor(None, conn.poll, None)
            conn.recv()
            conn.send(dict(counts))

    asyncio.run(main())


def start(folder: str, manifest: dict[str, Any], n: int, profile: WebProfile,
          tls: dict[str, str]) -> tuple[mp.process.BaseProcess, Any, dict[str, list[int]]]:
    """The server process, its pipe (send anything to get the connection/request counts back) and the port map."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_serve, args=(folder, manifest, n, asdict(profile), tls, child), daemon=True,
                       name="bench-web-server")
    proc.start()
    if not parent.poll(120):
        proc.terminate()
        raise RuntimeError("web server did not start within 120 s")
    return proc, parent, parent.recv()


def counts(pipe: Any) -> dict[str, int]:
    pipe.send("counts?")
    return pipe.recv() if pipe.poll(10) else {}


def urls(n: int, profile: WebProfile, ports: list[int], scheme: str, manifest: dict[str, Any]) -> list[str]:
    """The URL list, in a shuffled order (hosts interleave as in a real list)."""
    hosts = host_of(n, profile)
    entries = manifest["images"]
    order = np.random.default_rng(profile.seed + 5).permutation(n)
    return [f"{scheme}://127.0.0.1:{ports[hosts[i]]}/i/{i}.{entries[i % len(entries)]['fmt']}" for i in order]


# ------------------------------------------------------------------------------------------------ the zero case

ZERO_W, ZERO_H, ZERO_QUALITY, ZERO_VERSION, ZERO_BASES = 1024, 768, 90, 1, 8


def _zero_base(seed: int) -> np.ndarray:
    """A smooth two-axis gradient with random filled shapes, slightly blurred (photo-like JPEG statistics)."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:ZERO_H, 0:ZERO_W].astype(np.float32)
    img = np.empty((ZERO_H, ZERO_W, 3), np.float32)
    for c in range(3):
        fx, fy, px, py = r.uniform(0.5, 3), r.uniform(0.5, 3), r.uniform(0, 6), r.uniform(0, 6)
        img[..., c] = 127 + 60 * np.sin(x / ZERO_W * np.pi * fx + px) + 50 * np.cos(y / ZERO_H * np.pi * fy + py)
    img = img.clip(0, 255).astype(np.uint8)
    for _ in range(40):
        colour = tuple(int(v) for v in r.integers(0, 256, 3))
        if r.random() < 0.5:
            centre = (int(r.integers(0, ZERO_W)), int(r.integers(0, ZERO_H)))
            cv2.circle(img, centre, int(r.integers(10, 150)), colour, -1, cv2.LINE_AA)
        else:
            p = r.integers(0, [ZERO_W, ZERO_H], size=(2, 2))
            cv2.rectangle(img, (int(p[0, 0]), int(p[0, 1])), (int(p[1, 0]), int(p[1, 1])), colour, -1)
    return cv2.GaussianBlur(img, (0, 0), 1.5)


def _zero_chunk(job: tuple[str, list[int]]) -> list[int]:
    """Write images ``ids`` into ``folder``: a base image + per-image noise level, shift, brightness and shapes."""
    folder, ids = job
    cv2.setNumThreads(1)
    bases = [_zero_base(s) for s in range(ZERO_BASES)]
    noise = np.random.default_rng(12345).normal(0, 1, (ZERO_H + 64, ZERO_W + 64, 3)).astype(np.float32)
    sizes = []
    for i in ids:
        r = np.random.default_rng(1_000_003 + i)
        dy, dx = (int(v) for v in r.integers(0, 64, 2))
        amp = float(r.uniform(2.5, 7.0))  # noise level sets the file size: ~90-190 KB at quality 90
        img = bases[i % ZERO_BASES].astype(np.int16) + (noise[dy:dy + ZERO_H, dx:dx + ZERO_W] * amp).astype(np.int16)
        img = (img + int(r.integers(-20, 21))).clip(0, 255).astype(np.uint8)
        for _ in range(3):
            colour = tuple(int(v) for v in r.integers(0, 256, 3))
            centre = (int(r.integers(0, ZERO_W)), int(r.integers(0, ZERO_H)))
            cv2.circle(img, centre, int(r.integers(10, 100)), colour, -1, cv2.LINE_AA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, ZERO_QUALITY])
        assert ok
        with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
            f.write(buf.tobytes())
        sizes.append(len(buf))
    return sizes


def zero_image_set(n: int, workers: int) -> tuple[str, dict[str, Any]]:
    """The cached folder of ``n`` distinct 1024x768 JPEGs (generated on first use) and its manifest."""
    folder = os.path.join(HERE, ".cache", f"download_{n}_{ZERO_W}x{ZERO_H}_q{ZERO_QUALITY}_v{ZERO_VERSION}")
    manifest_path = os.path.join(folder, "manifest.json")
    if os.path.isfile(manifest_path):
        manifest = json.load(open(manifest_path))
        if manifest.get("n") == n and all(os.path.isfile(os.path.join(folder, f"{i}.jpg")) for i in range(n)):
            manifest["cached"] = True
            return folder, manifest
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    chunks = [(folder, list(range(w, n, workers))) for w in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        sizes = [s for part in pool.map(_zero_chunk, chunks) for s in part]
    manifest = {"n": n, "width": ZERO_W, "height": ZERO_H, "quality": ZERO_QUALITY, "version": ZERO_VERSION,
                "bytes_total": int(sum(sizes)), "bytes_min": int(min(sizes)), "bytes_median": int(np.median(sizes)),
                "bytes_max": int(max(sizes)), "generate_s": round(time.perf_counter() - t0, 2)}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    manifest["cached"] = False
    return folder, manifest


def _serve_zero(folder: str, n: int, conn: Any) -> None:
    """Every response (header + body) prebuilt in memory, one write, HTTP/1.0, on asyncio."""
    import asyncio

    responses: dict[bytes, bytes] = {}
    for i in range(n):
        body = open(os.path.join(folder, f"{i}.jpg"), "rb").read()
        head = f"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        responses[f"/img/{i}.jpg".encode()] = head + body
    not_found = b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b" ", 2)
            writer.write(responses.get(parts[1] if len(parts) > 1 else b"", not_found))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        conn.close()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start_zero(folder: str, n: int) -> tuple[mp.process.BaseProcess, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_serve_zero, args=(folder, n, child), daemon=True, name="bench-image-server")
    proc.start()
    if not parent.poll(120):
        proc.terminate()
        raise RuntimeError("image server did not start within 120 s")
    return proc, parent.recv()
