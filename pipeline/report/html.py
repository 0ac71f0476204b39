"""report.md → a self-contained report.html (images inlined as data URIs), and a headless-browser check of it.

The converter handles the small markdown subset report.py writes: ATX headings, pipe tables (header row plus a
``|---|`` separator), images ``![title](file.png)``, inline ``code``, ``- `` bullet lists and paragraphs. Every
image is read from disk and inlined; an image that cannot be read becomes a visible placeholder box (never an
``<img>``) and is listed in a "missing images" note at the end, so the page never references anything outside itself.

``render_check`` opens the page in a real headless Chromium: one run takes a screenshot, a second dumps the DOM of a
temporary copy into which a small script was injected that records, for every ``<img>``, whether it decoded.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import mimetypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "chromium not found: run .ci/install-chromium.sh"

CSS = """
body { font-family: "DejaVu Sans", system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; line-height: 1.5; background: #fff; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
code { font-family: "DejaVu Sans Mono", ui-monospace, monospace; background: #f2f2f2; padding: 0 .25em;
       border-radius: 3px; font-size: .92em; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; display: block; }
figcaption { color: #666; font-size: .9em; margin-top: .3em; }
.missing-image { display: inline-block; min-width: 240px; padding: 1.2em 1.5em; border: 2px dashed #c33;
                 background: #fff4f4; color: #a11; font-weight: bold; }
.missing-note { color: #a11; }
""".strip()

_IMG_RE = re.compile(r"!\[([^\]]*)\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_RE = re.compile(r"(`+)(.+?)\1|" + _IMG_RE.pattern)
_HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SEP_CELL_RE = re.compile(r"^\s*:?-{1,}:?\s*$")
_LIST_RE = re.compile(r"^\s*[-*]\s+(.*)$")
_MIME_BY_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                  (b"RIFF", "image/webp"))


@dataclass
class Converted:
    """The result of converting one markdown text: the HTML page and what happened to each image reference."""

    html: str
    images: list[str] = field(default_factory=list)   # file names inlined as data URIs
    missing: list[str] = field(default_factory=list)  # file names referenced but not readable / not local


class _Images:
    """Turns image references into <img src="data:..."> (or a placeholder), reading each file once."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.inlined: list[str] = []
        self.missing: list[str] = []
        self._cache: dict[str, str | None] = {}

    def _data_uri(self, name: str) -> str | None:
        if name in self._cache:
            return self._cache[name]
        uri = None
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", name):  # local path, not http:, data:, file: ...
            path = self.base_dir / name
            try:
                data = path.read_bytes()
            except OSError:
                data = None
            if data:
                mime = next((m for magic, m in _MIME_BY_MAGIC if data.startswith(magic)), None)
                mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        self._cache[name] = uri
        return uri

    def render(self, alt: str, name: str) -> str:
        uri = self._data_uri(name)
        a, n = html.escape(alt), html.escape(name)
        if uri is None:
            if name not in self.missing:
                self.missing.append(name)
                log.warning("report_html: image %r not found under %s; rendering a placeholder", name, self.base_dir)
            return (f'<span class="missing-image" role="img" aria-label="missing image {n}" data-src-name="{n}">'
                    f"missing image: {n}</span>")
        if name not in self.inlined:
            self.inlined.append(name)
        return f'<img src="{uri}" alt="{a}" data-src-name="{n}" loading="eager">'


def _inline(text: str, images: _Images) -> str:
    """Escape text, keeping `code` spans and ![alt](file) images."""
    out, pos = [], 0
    for m in _INLINE_RE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1):
            out.append(f"<code>{html.escape(m.group(2).strip())}</code>")
        else:
            out.append(images.render(m.group(3), m.group(4)))
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _split_row(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    cells = re.split(r"(?<!\\)\|", s)
    return [c.strip().replace("\\|", "|") for c in cells]


def _is_separator(line: str) -> bool:
    if "|" not in line and "-" not in line:
        return False
    cells = _split_row(line)
    return bool(cells) and all(_SEP_CELL_RE.match(c) for c in cells)


def _align(sep_cell: str) -> str:
    s = sep_cell.strip()
    if s.startswith(":") and s.endswith(":"):
        return ' style="text-align:center"'
    if s.endswith(":"):
        return ' style="text-align:right"'
    return ""


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def convert(markdown: str, base_dir: str | os.PathLike[str] = ".", title: str | None = None) -> Converted:
    """Convert a markdown text (report.md's subset) to a complete, self-contained HTML page."""
    images = _Images(Path(base_dir))
    lines = markdown.splitlines()
    body: list[str] = []
    para: list[str] = []
    used_ids: set[str] = set()
    first_h1: str | None = None

    def flush_para() -> None:
        if not para:
            return
        text = " ".join(s.strip() for s in para)
        para.clear()
        m = _IMG_RE.fullmatch(text)
        if m:  # a paragraph that is only an image: a figure with a caption
            cap = f"<figcaption>{html.escape(m.group(1))}</figcaption>" if m.group(1) else ""
            body.append(f"<figure>{images.render(m.group(1), m.group(2))}{cap}</figure>")
        else:
            body.append(f"<p>{_inline(text, images)}</p>")

    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush_para()
            i += 1
            continue
        h = _HEADING_RE.match(line)
        if h:
            flush_para()
            level, text = len(h.group(1)), h.group(2)
            if level == 1 and first_h1 is None:
                first_h1 = text
            body.append(f'<h{level} id="{_slug(text, used_ids)}">{_inline(text, images)}</h{level}>')
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _is_separator(lines[i + 1]):
            flush_para()
            header, seps = _split_row(line), _split_row(lines[i + 1])
            aligns = [_align(s) for s in seps] + [""] * max(0, len(header) - len(seps))
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip() and "|" in lines[i]:
                rows.append(_split_row(lines[i]))
                i += 1
            out = ["<table>", "<thead><tr>"]
            out += [f"<th{aligns[c]}>{_inline(cell, images)}</th>" for c, cell in enumerate(header)]
            out.append("</tr></thead>")
            if rows:
                out.append("<tbody>")
                for row in rows:
                    row = (row + [""] * len(header))[:len(header)]
                    out.append("<tr>" + "".join(f"<td{aligns[c]}>{_inline(cell, images)}</td>"
                                                for c, cell in enumerate(row)) + "</tr>")
                out.append("</tbody>")
            out.append("</table>")
            body.append("".join(out))
            continue
        if _LIST_RE.match(line):
            flush_para()
            items = []
            while i < len(lines) and (m := _LIST_RE.match(lines[i])):
                items.append(f"<li>{_inline(m.group(1), images)}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        para.append(line)
        i += 1
    flush_para()

    if images.missing:
        names = ", ".join(f"<code>{html.escape(n)}</code>" for n in images.missing)
        body.append(f'<p class="missing-note" id="missing-images">Missing images (not inlined): {names}</p>')

    page_title = html.escape(title or first_h1 or "Run report")
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{page_title}</title>",
        f"<style>\n{CSS}\n</style>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
        "",
    ])
    return Converted(page, list(images.inlined), list(images.missing))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_html(folder: str, markdown_path: str | None = None) -> str:
    """Convert ``folder/report.md`` (or ``markdown_path``) into a self-contained ``folder/report.html``.

    Images are resolved relative to the markdown file's directory and inlined as base64 data URIs; a missing one
    is rendered as a placeholder box and logged (the conversion does not fail). Written atomically; returns the path.
    """
    md = Path(markdown_path) if markdown_path is not None else Path(folder) / "report.md"
    result = convert(md.read_text(encoding="utf-8"), md.parent)
    out = Path(folder) / "report.html"
    _atomic_write(out, result.html)
    return str(out)


# ---------------------------------------------------------------------------------------------------------------
# Headless browser check

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
