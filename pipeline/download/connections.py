"""The sockets under ``pipeline.download.fetch``: connections pinned to a vetted address, the deadline watchdog, and
a keep-alive pool that never lets a connection serve another name or address.

- ``GuardedHTTP`` / ``GuardedHTTPS`` connect to the address the SSRF guard vetted (never a second DNS lookup); HTTPS
  verifies the certificate against the host *name* of the URL and sends it as SNI, trusting the system store or
  ``ca_bundle``. A handshake that fails on the certificate or the protocol raises ``TLSFailure``.
- ``Watchdog``: one thread that shuts a socket down when its fetch's deadline passes (a drip-feeding peer stops
  there). A pooled socket outlives one fetch, so every fetch takes a ``Lease`` and cancels it when it is done with
  the socket; only a live lease can shut the socket.
- ``Pool``: idle keep-alive connections keyed by (scheme, host name, port, vetted address, CA bundle). A connection
  is handed out only for the same key: it stays bound to the address vetted when it was opened, and a TLS connection
  whose certificate was checked for one name never carries a request for another (a redirect to a second name opens
  its own connection, with its own SNI). The caller still resolves and vets every URL before asking the pool, so a
  name that now resolves elsewhere gets a new key, not the old connection. Idle connections expire after
  ``max_idle_s`` and the pool holds at most ``max_total``; a connection the server closed while it sat idle is found
  out on its first use and the caller reconnects (see ``fetch._exchange``).
"""

from __future__ import annotations

import heapq
import http.client
import socket
import ssl
import threading
import time
from collections import OrderedDict

PoolKey = tuple[str, str, int, str, str]


class TLSFailure(Exception):
    """The TLS handshake failed on the certificate (untrusted, expired, wrong name) or the protocol: not transient."""


class Lease:
    """One fetch's claim on a socket until its deadline; ``cancel`` when the fetch is done with the socket."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket):
        self.sock: socket.socket | None = sock


class Watchdog:
    """One thread that shuts sockets down when their lease's deadline passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Lease]] = []
        self._cond = threading.Condition()
        self._seq = 0
        threading.Thread(target=self._run, name="fetch-watchdog", daemon=True).start()

    def watch(self, sock: socket.socket, deadline: float) -> Lease:
        lease = Lease(sock)
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, lease))
            if self._heap[0][2] is lease:  # only a new earliest deadline needs to wake the thread
                self._cond.notify()
        return lease

    def cancel(self, lease: Lease | None) -> None:
        if lease is not None:
            with self._cond:  # under the lock: a cancelled lease can never be shut down after this returns
                lease.sock = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, lease = heapq.heappop(self._heap)
                sock, lease.sock = lease.sock, None
                if sock is not None:
                    try:
                        if sock.fileno() != -1:
                            sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


_WATCHDOG: Watchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def watchdog() -> Watchdog:
    global _WATCHDOG
    with _WATCHDOG_LOCK:
        if _WATCHDOG is None:
            _WATCHDOG = Watchdog()
        return _WATCHDOG


class GuardedHTTP(http.client.HTTPConnection):
    """Connects to the vetted address ``ip`` (never a second DNS lookup); ``raw`` is the TCP socket under any TLS.

    ``lease(deadline, timeout)`` starts one fetch's use of the connection: the watchdog watches the socket until
    ``deadline`` (from the moment it is connected, so a TLS handshake that drips is covered too); ``release`` ends it.
    """

    def __init__(self, host: str, port: int, ip: str, timeout: float, ca_bundle: str = ""):
        super().__init__(host, port, timeout=timeout)
        self.ip, self.ca_bundle = ip, ca_bundle
        self.raw: socket.socket | None = None
        self.deadline = 0.0
        self.watch: Lease | None = None

    def lease(self, deadline: float, timeout: float) -> None:
        self.deadline, self.timeout = deadline, timeout
        if self.raw is not None:  # a pooled connection: a new lease on its socket, this fetch's timeout
            self.watch = watchdog().watch(self.raw, deadline)
            if self.sock is not None:
                self.sock.settimeout(timeout)

    def release(self) -> None:
        watchdog().cancel(self.watch)
        self.watch = None

    def discard(self) -> None:
        """Close for good (an error, or not reusable). ``close`` alone keeps the lease: http.client closes the
        connection when a response says Connection: close, while that response's body is still to be read."""
        self.release()
        self.close()

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.watch = watchdog().watch(sock, self.deadline)
        return sock

    def connect(self) -> None:
        self.sock = self.raw = self._open()


_CONTEXTS: dict[str, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def tls_context(ca_bundle: str = "") -> ssl.SSLContext:
    """One verifying client context per CA bundle ('' = the system store), shared by every connection."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(ca_bundle)
        if ctx is None:
            ctx = _CONTEXTS[ca_bundle] = ssl.create_default_context(cafile=ca_bundle or None)
        return ctx


class GuardedHTTPS(GuardedHTTP):
    def connect(self) -> None:
        self.raw = self._open()
        try:  # SNI and certificate check use the URL's host name; the TCP connection goes to the vetted address
            self.sock = tls_context(self.ca_bundle).wrap_socket(self.raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            self.raw.close()
            raise TLSFailure(f"certificate rejected: {exc.verify_message or exc.reason}") from exc
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            self.raw.close()
            raise  # the peer hung up mid-handshake: a reset, worth a retry
        except ssl.SSLError as exc:
            self.raw.close()
            raise TLSFailure(f"TLS handshake failed: {exc.reason or exc}") from exc


class Pool:
    """Idle keep-alive connections; see the module docstring for what may reuse what."""

    def __init__(self, max_per_key: int = 8, max_total: int = 256, max_idle_s: float = 20.0):
        self.max_per_key, self.max_total, self.max_idle_s = max_per_key, max_total, max_idle_s
        self._idle: OrderedDict[PoolKey, list[tuple[float, GuardedHTTP]]] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()

    def get(self, key: PoolKey) -> GuardedHTTP | None:
        stale = []
        conn = None
        with self._lock:
            idle = self._idle.get(key)
            now = time.monotonic()
            while idle:
                since, c = idle.pop()  # the most recently used one: the least likely to have been closed
                self._count -= 1
                if now - since < self.max_idle_s:
                    conn = c
                    break
                stale.append(c)
            if idle == []:
                del self._idle[key]
        for c in stale:
            c.discard()
        return conn

    def put(self, key: PoolKey, conn: GuardedHTTP) -> None:
        if conn.sock is None:
            return
        evicted = []
        with self._lock:
            idle = self._idle.setdefault(key, [])
            self._idle.move_to_end(key)
            if len(idle) >= self.max_per_key:
                evicted.append(idle.pop(0)[1])
                self._count -= 1
            idle.append((time.monotonic(), conn))
            self._count += 1
            while self._count > self.max_total:  # the least recently used host gives one up
                oldest_key = next(iter(self._idle))
                old = self._idle[oldest_key]
                evicted.append(old.pop(0)[1])
                self._count -= 1
                if not old:
                    del self._idle[oldest_key]
        for c in evicted:
            c.discard()

    def clear(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for _, c in idle]
            self._idle.clear()
            self._count = 0
        for c in conns:
            c.discard()

    def __len__(self) -> int:
        with self._lock:
            return self._count
