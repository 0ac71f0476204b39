"""A loopback HTTP server for the embedded dataset, so the download stage downloads for real.

Paths: ``/img/<index>.png`` serves a rendered image. Fault paths exercise the downloader's error handling:
``/missing/...`` answers 404, ``/garbage/...`` answers 200 with bytes that are not an image, ``/error/...`` 500.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    """Serves ``images[index]`` (PNG bytes) on 127.0.0.1 from a daemon thread; use as a context manager."""

    def __init__(self, images: dict[int, bytes] | Callable[[int], bytes | None], host: str = "127.0.0.1"):
        self._get = images.get if isinstance(images, dict) else images
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # the demo prints its own progress
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with server._lock:
                    server.requests += 1
                kind, _, name = self.path.lstrip("/").partition("/")
                if kind == "img":
                    try:
                        body = server._get(int(name.split(".")[0]))
                    except ValueError:
                        body = None
                    if body is None:
                        self._send(404, b"not found", "text/plain")
                    else:
                        self._send(200, body, "image/png")
                elif kind == "garbage":
                    self._send(200, b"this is not an image", "image/png")
                elif kind == "error":
                    self._send(500, b"server error", "text/plain")
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="image-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, index: int) -> str:
        return f"{self.base_url}/img/{index}.png"

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
