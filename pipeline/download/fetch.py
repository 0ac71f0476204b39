"""One URL → bytes, with the guards img2dataset's ``download_image`` lacks (its issues #333, #395, #437).

- a deadline on the *whole* fetch (DNS, connect, TLS handshake, headers, body, redirects, retries, Retry-After
  waits), enforced by a watchdog that shuts the socket down, so a server dripping one byte at a time cannot hold a
  worker;
- a byte cap on the body (Content-Length checked first, then counted while reading);
- http/https only, and an SSRF guard: every address a name resolves to is checked (loopback, private, link-local,
  multicast, reserved, cloud metadata, IPv4-mapped IPv6, decimal/hex IP spellings all resolve to an address first),
  the connection goes to the vetted address (no second lookup to rebind), and every redirect is checked again;
- HTTPS verified against the system store or ``ca_bundle``, SNI and the certificate check on the URL's host name;
  a rejected certificate or failed handshake is ``tls_error``, never retried;
- keep-alive: a connection whose answer was read to the end goes back to a per-process pool and serves the next URL
  of the same host name *and* vetted address (``pipeline.download.connections``), saving the TCP and TLS handshakes
  of every further URL on a CDN host;
- transient failures (5xx, 429 with Retry-After, resets, truncation, timeouts) retried within the deadline;
- X-Robots-Tag opt-outs honoured as img2dataset's ``is_disallowed`` reads them.

Every outcome is one closed code (``CODES``); nothing raises out of ``fetch``.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urljoin, urlsplit

from pipeline.download.connections import GuardedHTTP, GuardedHTTPS, Pool, PoolKey, TLSFailure

OK = "ok"
FETCH_CODES = ("bad_url", "blocked_address", "dns_error", "dns_temporary", "connect_error", "connection_reset",
               "timeout", "tls_error", "http_4xx", "http_429", "http_5xx", "redirect_loop", "too_large", "truncated",
               "opted_out", "hash_mismatch")  # hash_mismatch: the body against download.verify_hash, decided by shard
TRANSIENT = frozenset({"dns_temporary", "connect_error", "connection_reset", "timeout", "http_429", "http_5xx",
                       "truncated"})
REDIRECTS = (301, 302, 303, 307, 308)
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # img2dataset's disallowed_header_directives
USER_AGENT = "Mozilla/5.0 (compatible; dalle-pipeline/0.1; +https://github.com/rom1504/img2dataset)"


@dataclass(frozen=True)
class FetchLimits:
    deadline_s: float = 30.0
    """Wall-clock bound on one URL, all attempts and waits included."""
    io_timeout_s: float = 10.0
    """Bound on one connect or one socket read."""
    max_bytes: int = 32 << 20
    max_redirects: int = 5
    retries: int = 2
    """Extra attempts after a transient failure, inside the deadline."""
    max_retry_after_s: float = 10.0
    user_agent_token: str | None = "img2dataset"
    disallowed_directives: frozenset[str] = frozenset(OPT_OUT_DIRECTIVES)
    """X-Robots-Tag directives that opt an image out; empty to ignore opt-outs."""
    ca_bundle: str = ""
    """PEM file of the CAs HTTPS trusts; empty: the system store."""
    keep_alive: bool = True
    """Reuse connections per host name and vetted address; off: one connection per request (Connection: close)."""


class AddressPolicy:
    """Which resolved addresses may be connected to: public ones, plus ``allowed`` (CIDR, ``ip:port``, ``[v6]:port``).

    ``allow_private`` lets everything through (tests, internal mirrors); the scheme check still applies.
    """

    def __init__(self, allow_private: bool = False, allowed: list[str] | tuple[str, ...] = ()):
        self.allow_private = allow_private
        self._nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for entry in allowed:
            self._nets.append(_parse_allowed(entry))

    def permits(self, ip: str, port: int) -> bool:
        addr = _canonical(ipaddress.ip_address(ip.split("%")[0]))
        if self.allow_private or _is_public(addr):
            return True
        return any(addr in net and (p is None or p == port) for net, p in self._nets)


def _parse_allowed(entry: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    try:
        if entry.startswith("["):
            host, _, port = entry[1:].partition("]:")
            return ipaddress.ip_network(host), int(port)
        if entry.count(":") == 1:
            host, port = entry.split(":")
            return ipaddress.ip_network(host), int(port)
        return ipaddress.ip_network(entry), None
    except ValueError as exc:
        raise ValueError(f"download.allowed_addresses: bad entry {entry!r} (want CIDR, ip:port or [v6]:port)") from exc


def _canonical(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address):  # ::ffff:127.0.0.1, 2002:7f00:1::, 64:ff9b::7f00:1 embed IPv4
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.sixtofour is not None:
            return addr.sixtofour
        if addr in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


def _is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # is_global is False for loopback, private, link-local (169.254.169.254), CGNAT, unspecified and reserved ranges.
    return addr.is_global and not addr.is_multicast and not addr.is_reserved


@dataclass
class FetchResult:
    code: str
    body: bytes | None = None
    message: str = ""
    status: int | None = None
    final_url: str = ""
    attempts: int = 0
    elapsed: float = 0.0


class _Fail(Exception):
    def __init__(self, code: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.message, self.status, self.retry_after = code, message, status, retry_after


_DNS: ThreadPoolExecutor | None = None
_POOL = Pool()
_INIT = threading.Lock()


def _dns() -> ThreadPoolExecutor:
    global _DNS
    with _INIT:
        if _DNS is None:
            _DNS = ThreadPoolExecutor(16, thread_name_prefix="fetch-dns")  # getaddrinfo has no timeout of its own
        return _DNS


def close_idle() -> None:
    """Close every idle keep-alive connection of this process (tests; the end of a run)."""
    _POOL.clear()


def fetch(url: object, limits: FetchLimits, policy: AddressPolicy) -> FetchResult:
    """Fetch ``url`` within ``limits.deadline_s``; never raises, always returns one closed code."""
    start = time.monotonic()
    deadline = start + limits.deadline_s
    attempts = 0
    while True:
        attempts += 1
        try:
            result = _attempt(url, limits, policy, deadline)
            result.attempts, result.elapsed = attempts, time.monotonic() - start
            return result
        except _Fail as fail:
            wait = fail.retry_after if fail.retry_after is not None else min(0.2 * 2 ** (attempts - 1), 2.0)
            retry = fail.code in TRANSIENT and attempts <= limits.retries
            if retry and wait <= limits.max_retry_after_s and time.monotonic() + wait < deadline:
                time.sleep(wait)
                continue
            return FetchResult(fail.code, None, fail.message, fail.status, str(url), attempts, time.monotonic() - start)


def _attempt(url: object, limits: FetchLimits, policy: AddressPolicy, deadline: float) -> FetchResult:
    if not isinstance(url, str) or not url.strip():
        raise _Fail("bad_url", f"not a URL: {url!r}")
    current = url.strip()
    seen = set()
    for _ in range(limits.max_redirects + 1):
        seen.add(current)
        conn, key, resp = _request(current, limits, policy, deadline)
        if resp.status in REDIRECTS:
            location = resp.getheader("Location")
            _done(conn, key, resp, limits)
            if not location:
                raise _Fail("http_4xx", f"redirect {resp.status} without Location", resp.status)
            current = urljoin(current, location)
            if current in seen:
                raise _Fail("redirect_loop", f"redirect loop back to {current}", resp.status)
            continue
        try:
            body = _read_body(resp, limits, deadline)
        except _Fail:
            resp.close()
            conn.discard()
            raise
        _done(conn, key, resp, limits)
        return FetchResult(OK, body, "", resp.status, current)
    raise _Fail("redirect_loop", f"more than {limits.max_redirects} redirects")


def _request(url: str, limits: FetchLimits, policy: AddressPolicy,
             deadline: float) -> tuple[GuardedHTTP, PoolKey, http.client.HTTPResponse]:
    """One request on a connection to the vetted address (a pooled one for the same name and address, or a new
    one); returns the connection, its pool key and the response with its body unread (status 200 or a redirect)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _Fail("bad_url", f"scheme {parts.scheme or '(none)'!r} is not http/https")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise _Fail("bad_url", f"bad port in {url!r}") from exc
    if not host:
        raise _Fail("bad_url", f"no host in {url!r}")
    ip = _resolve(host, port, policy, deadline)
    ca = limits.ca_bundle if parts.scheme == "https" else ""
    key: PoolKey = (parts.scheme, host, port, ip, ca)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn, resp = _exchange(key, path, limits, deadline)
    if resp.status in REDIRECTS:
        return conn, key, resp
    if resp.status != 200:
        _done(conn, key, resp, limits)
        code = "http_429" if resp.status == 429 else "http_5xx" if resp.status >= 500 else "http_4xx"
        if resp.status == 408:
            code = "http_5xx"  # a server-side timeout is worth a retry
        raise _Fail(code, f"HTTP {resp.status}", resp.status, _retry_after(resp.getheader("Retry-After")))
    if limits.disallowed_directives and is_disallowed(resp.headers, limits.user_agent_token,
                                                      limits.disallowed_directives):
        _done(conn, key, resp, limits)
        raise _Fail("opted_out", f"X-Robots-Tag: {resp.getheader('X-Robots-Tag')}", resp.status)
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > limits.max_bytes:
        resp.close()
        conn.discard()
        raise _Fail("too_large", f"Content-Length {length} > cap {limits.max_bytes}", resp.status)
    return conn, key, resp


def _exchange(key: PoolKey, path: str, limits: FetchLimits,
              deadline: float) -> tuple[GuardedHTTP, http.client.HTTPResponse]:
    """Send the GET and read the status line and headers. A pooled connection the server closed while it sat idle
    fails before any byte of an answer arrives: then (once) a new connection is opened. GET is safe to resend."""
    scheme, host, port, ip, ca = key
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
    if not limits.keep_alive:
        headers["Connection"] = "close"
    conn = _POOL.get(key) if limits.keep_alive else None
    while True:
        reused = conn is not None
        timeout = min(limits.io_timeout_s, _remaining(deadline))
        if conn is None:
            conn = (GuardedHTTPS if scheme == "https" else GuardedHTTP)(host, port, ip, timeout, ca)
        conn.lease(deadline, timeout)
        try:
            conn.request("GET", path, headers=headers)
            return conn, conn.getresponse()
        except TLSFailure as exc:
            conn.discard()
            raise _Fail("tls_error", str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 — every socket/TLS/protocol failure maps to a code
            conn.discard()
            if reused and isinstance(exc, _STALE) and time.monotonic() < deadline:
                conn = None
                continue
            raise _io_fail(exc, deadline, "request") from exc


_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected,
          ssl.SSLEOFError, ssl.SSLZeroReturnError)
_DRAIN_MAX = 64 * 1024


def _done(conn: GuardedHTTP, key: PoolKey, resp: http.client.HTTPResponse, limits: FetchLimits) -> None:
    """The response is finished with: the connection goes back to the pool when its answer was read to the end (a
    short unread body — a redirect's, an error page's — is read off first) and the server keeps it open."""
    reusable = limits.keep_alive and not resp.will_close and conn.sock is not None
    if reusable and not resp.isclosed():
        if resp.length is not None and resp.length <= _DRAIN_MAX:
            try:
                resp.read()
            except Exception:  # noqa: BLE001 — a broken connection is simply not reused
                reusable = False
        reusable = reusable and resp.isclosed()
    resp.close()
    if reusable:
        conn.release()
        _POOL.put(key, conn)
    else:
        conn.discard()


def _resolve(host: str, port: int, policy: AddressPolicy, deadline: float) -> str:
    try:  # an address written out needs no lookup (other spellings such as 2130706433 go through getaddrinfo)
        addrs = [str(ipaddress.ip_address(host))]
    except ValueError:
        addrs = _lookup(host, port, deadline)
    blocked = [a for a in addrs if not policy.permits(a, port)]
    if blocked or not addrs:  # one bad address is enough: a name mixing public and private ones is an attack
        raise _Fail("blocked_address", f"{host} resolves to a non-public address {blocked[0] if blocked else '-'}")
    return addrs[0]


def _lookup(host: str, port: int, deadline: float) -> list[str]:
    future = _dns().submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=_remaining(deadline))
    except FutureTimeout as exc:
        raise _Fail("timeout", f"DNS lookup of {host} ran past the deadline") from exc
    except socket.gaierror as exc:  # EAI_AGAIN is a resolver hiccup worth a retry; NXDOMAIN is not
        code = "dns_temporary" if exc.errno == socket.EAI_AGAIN else "dns_error"
        raise _Fail(code, f"cannot resolve {host}: {exc}") from exc
    except (UnicodeError, OSError) as exc:
        raise _Fail("dns_error", f"cannot resolve {host}: {exc}") from exc
    return [info[4][0] for info in infos]


def _read_body(resp: http.client.HTTPResponse, limits: FetchLimits, deadline: float) -> bytes:
    chunks, total = [], 0
    try:
        while True:
            if time.monotonic() >= deadline:
                raise _Fail("timeout", f"body still arriving after {limits.deadline_s:g}s deadline ({total} bytes)")
            chunk = resp.read1(1 << 16)  # returns as soon as any bytes arrive, so the deadline is checked often
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_bytes:
                raise _Fail("too_large", f"body over the {limits.max_bytes}-byte cap")
            chunks.append(chunk)
    except _Fail:
        raise
    except http.client.IncompleteRead as exc:
        raise _Fail("truncated", f"body ended early ({total} bytes)") from exc
    except Exception as exc:  # noqa: BLE001
        raise _io_fail(exc, deadline, "body") from exc
    if resp.length:  # Content-Length promised more than arrived
        if time.monotonic() >= deadline:
            raise _Fail("timeout", f"body cut at the {limits.deadline_s:g}s deadline ({total} bytes)")
        raise _Fail("truncated", f"body ended after {total} bytes, {resp.length} short of Content-Length")
    return b"".join(chunks)


def _io_fail(exc: BaseException, deadline: float, phase: str) -> _Fail:
    if time.monotonic() >= deadline or isinstance(exc, (TimeoutError, socket.timeout)):
        return _Fail("timeout", f"{phase}: timed out ({type(exc).__name__})")
    if isinstance(exc, ConnectionRefusedError):
        return _Fail("connect_error", f"{phase}: connection refused")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                        http.client.IncompleteRead)):
        return _Fail("connection_reset", f"{phase}: {type(exc).__name__}: {exc}")
    if isinstance(exc, (http.client.HTTPException, ssl.SSLError)):
        return _Fail("connection_reset", f"{phase}: protocol error {type(exc).__name__}: {exc}")
    return _Fail("connect_error", f"{phase}: {type(exc).__name__}: {exc}")


def is_disallowed(headers: Message, user_agent_token: str | None, directives: frozenset[str]) -> bool:
    """img2dataset's X-Robots-Tag reading (``img2dataset.downloader.is_disallowed``, the same answers — a test holds
    them side by side): a directive applies when it names no user agent or names ``user_agent_token``. Written out
    here because importing img2dataset's downloader imports its whole CLI (wandb, webdataset, torch), seconds per
    process for a dozen lines."""
    for value in headers.get_all("X-Robots-Tag", []):
        agent_directives = value.split(":", 1)
        found = [x.strip().lower() for x in agent_directives[-1].split(",")]
        agent = agent_directives[0].lower() if len(agent_directives) == 2 else None
        if (agent is None or agent == user_agent_token) and any(x in directives for x in found):
            return True
    return False


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff


def _remaining(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())
