"""A headless-Chromium check of a report.html, for the tests: does the page really render, does every image decode.

``render_check`` opens the page in a real headless Chromium: one run takes a screenshot, a second dumps the DOM of a
temporary copy into which a small script was injected that records, for every ``<img>``, whether it decoded.
Test code, not pipeline code: imported by the tests as ``from browser import render_check`` (tests/ is on sys.path,
like ``faultserver``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "chromium not found: run .ci/install-chromium.sh"

_STATUS_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var status = imgs.map(function (img, i) {
    return {name: img.getAttribute("data-src-name") || img.getAttribute("alt") || ("#" + i),
            ok: !!(img.complete && img.naturalWidth > 0), w: img.naturalWidth, h: img.naturalHeight};
  });
  var pre = document.createElement("pre");
  pre.id = "img-status";
  pre.textContent = JSON.stringify({images: status,
                                    placeholders: document.querySelectorAll(".missing-image").length});
  document.body.appendChild(pre);
});
</script>"""

_STATUS_RE = re.compile(r'<pre id="img-status">(.*?)</pre>', re.S)


def find_chromium() -> str:
    """The first of chromium / chromium-browser / google-chrome on PATH; FileNotFoundError with the install hint."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(INSTALL_HINT)


def _run_browser(args: list[str], timeout_s: float) -> tuple[int, str, str]:
    """Run chromium in its own process group; on timeout kill that whole group (renderers, zygote, gpu...)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise TimeoutError(f"chromium did not finish within {timeout_s:.0f}s: {' '.join(args[:3])} ...") from None
    return proc.returncode, out, err


def _base_args(binary: str, profile: str) -> list[str]:
    return [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--mute-audio", "--hide-scrollbars",
            "--allow-file-access-from-files"]


def render_check(html_path: str, screenshot_path: str, timeout_s: float = 60) -> dict:
    """Open ``html_path`` in headless Chromium: screenshot it, and report which <img> elements actually decoded.

    Returns ``{"images": n, "loaded": k, "broken": [names], "screenshot_bytes": size, "placeholders": p,
    "elapsed_s": t}``. Raises FileNotFoundError (with the install hint) when no browser is on PATH,
    TimeoutError past ``timeout_s`` (whole call), RuntimeError when the browser fails.
    """
    binary = find_chromium()
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    src = Path(html_path).resolve()
    shot = Path(screenshot_path).resolve()
    shot.parent.mkdir(parents=True, exist_ok=True)
    if shot.exists():
        shot.unlink()

    with tempfile.TemporaryDirectory(prefix="report-html-check-") as tmp:
        tmpdir = Path(tmp)
        # (a) screenshot of the report itself
        args = _base_args(binary, str(tmpdir / "profile-shot")) + [
            f"--screenshot={shot}", "--window-size=1200,3000", src.as_uri()]
        rc, _, err = _run_browser(args, deadline - time.monotonic())
        if rc != 0 or not shot.exists():
            raise RuntimeError(f"chromium screenshot failed (rc={rc}): {err[-2000:]}")

        # (b) DOM dump of a copy with the status script injected before </body>
        page = src.read_text(encoding="utf-8")
        idx = page.lower().rfind("</body>")
        page = page[:idx] + _STATUS_SCRIPT + page[idx:] if idx >= 0 else page + _STATUS_SCRIPT
        probe = tmpdir / "probe.html"
        probe.write_text(page, encoding="utf-8")
        args = _base_args(binary, str(tmpdir / "profile-dom")) + [
            "--virtual-time-budget=5000", "--window-size=1200,3000", "--dump-dom", probe.as_uri()]
        rc, dom, err = _run_browser(args, deadline - time.monotonic())
        found = _STATUS_RE.findall(dom)  # the injected <pre> is the last element of <body>
        if not found:
            raise RuntimeError(f"chromium --dump-dom gave no #img-status (rc={rc}, {len(dom)} chars of DOM): "
                               f"{err[-2000:]}")
        status = json.loads(html.unescape(found[-1]))

    imgs = status["images"]
    return {"images": len(imgs), "loaded": sum(1 for s in imgs if s["ok"]),
            "broken": [s["name"] for s in imgs if not s["ok"]], "screenshot_bytes": shot.stat().st_size,
            "placeholders": status.get("placeholders", 0), "elapsed_s": round(time.monotonic() - t0, 2)}
