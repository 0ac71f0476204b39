"""report.md → a self-contained report.html: Python-Markdown (with tables), then a pass over its element tree.

The pass reads every image from disk and inlines it as a data: URI; an image that cannot be read (or is not a local
file) becomes a visible placeholder box (never an ``<img>``) and is listed in a "missing images" note at the end, so
the page never references anything outside itself. The headless-browser check of the page is test code
(tests/browser.py).
"""

from __future__ import annotations

import base64
import html
import logging
import mimetypes
import os
import re
import xml.etree.ElementTree as etree
from dataclasses import dataclass, field
from pathlib import Path

from markdown import Markdown
from markdown.treeprocessors import Treeprocessor
from markdown.util import code_escape

from pipeline.storage.commit import write_text

log = logging.getLogger(__name__)

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

_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, data:, file: ...: never fetched, so never inlined
_MIME_BY_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                  (b"RIFF", "image/webp"))
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


@dataclass
class Converted:
    """The result of converting one markdown text: the HTML page and what happened to each image reference."""

    html: str
    images: list[str] = field(default_factory=list)   # file names inlined as data URIs
    missing: list[str] = field(default_factory=list)  # file names referenced but not readable / not local


def _data_uri(path: Path) -> str | None:
    """The file as a data: URI, its MIME type from its magic bytes (the extension may lie); None if unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if not data:  # an empty file would be a broken <img>: a placeholder instead
        return None
    mime = next((m for magic, m in _MIME_BY_MAGIC if data.startswith(magic)), None)
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def _escape_text(root: etree.Element) -> None:
    """Escape every text node as ``html.escape`` does (quotes and every ``&``), which the serializer then keeps.

    Python-Markdown's serializer escapes only ``& < >`` and leaves entity references alone; code text it has already
    escaped for ``& < >``, so that only needs the quotes.
    """
    for el in root.iter():
        if el.text:
            code = el.tag == "code"
            el.text = el.text.replace('"', "&quot;").replace("'", "&#x27;") if code else html.escape(el.text)
        if el.tail:
            el.tail = html.escape(el.tail)


class _ReportTree(Treeprocessor):
    """Inlines images (or puts placeholders), makes paragraph-only images figures, sets heading ids, escapes text."""

    def __init__(self, md: Markdown, base_dir: Path) -> None:
        super().__init__(md)
        self.base_dir = base_dir
        self.inlined: list[str] = []
        self.missing: list[str] = []
        self.first_h1: str | None = None
        self._uris: dict[str, str | None] = {}  # each file is read once, however often it is referenced

    def run(self, root: etree.Element) -> None:
        parents = {child: parent for parent in root.iter() for child in parent}
        for img in list(root.iter("img")):  # document order, so images/missing list in the order they appear
            self._image(img, parents[img])
        used: set[str] = set()
        for el in root.iter():
            if el.tag in _HEADINGS:
                text = "".join(el.itertext())
                if el.tag == "h1" and self.first_h1 is None:
                    self.first_h1 = text
                el.set("id", _slug(text, used))
            elif el.tag in ("th", "td"):
                # the align attribute is obsolete in HTML5: express it as a style
                if align := el.attrib.pop("align", None):
                    el.set("style", f"text-align:{align}")
                # in a table an escaped pipe is a literal pipe, inside code spans too (as in GitHub's tables)
                for code in el.iter("code"):
                    code.text = (code.text or "").replace("\\|", "|")
        if self.missing:
            note = etree.SubElement(root, "p", {"class": "missing-note", "id": "missing-images"})
            note.text = "Missing images (not inlined): "
            for i, name in enumerate(self.missing):
                code = etree.SubElement(note, "code")  # text stored escaped, as Python-Markdown stores code spans
                code.text, code.tail = code_escape(name), (", " if i < len(self.missing) - 1 else None)
        _escape_text(root)

    def _image(self, img: etree.Element, parent: etree.Element) -> None:
        name, alt = img.get("src", ""), img.get("alt", "")
        if name not in self._uris:
            self._uris[name] = None if _SCHEME_RE.match(name) else _data_uri(self.base_dir / name)
        uri = self._uris[name]
        if uri is None:
            if name not in self.missing:
                self.missing.append(name)
                log.warning("report_html: image %r not found under %s; rendering a placeholder", name, self.base_dir)
            # a box, not an <img>: a broken image icon is easy to miss, and the page must not try to fetch anything
            new = etree.Element("span", {"class": "missing-image", "data-src-name": name})
            new.text = f"missing image: {name}"
        else:
            if name not in self.inlined:
                self.inlined.append(name)
            new = etree.Element("img", {"src": uri, "alt": alt, "data-src-name": name, "loading": "eager"})
        new.tail = img.tail
        parent[list(parent).index(img)] = new
        # a paragraph holding only an image is a figure, captioned with the alt text
        if parent.tag == "p" and len(parent) == 1 and not (parent.text or "").strip() and not (new.tail or "").strip():
            parent.tag = "figure"
            parent.text = new.tail = None
            if alt:
                etree.SubElement(parent, "figcaption").text = alt


def convert(markdown: str, base_dir: str | os.PathLike[str] = ".", title: str | None = None) -> Converted:
    """Convert a markdown text to a complete, self-contained HTML page; images resolve relative to ``base_dir``."""
    md = Markdown(extensions=["tables"], extension_configs={"tables": {"use_align_attribute": True}},
                  output_format="html")
    # Markdown text is data here, as report.md's table cells hold arbitrary names: raw HTML and entity references
    # are shown as text, never passed through (which could also smuggle in a script or a remote <img>).
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    md.inlinePatterns.deregister("entity")
    tree = _ReportTree(md, Path(base_dir))
    md.treeprocessors.register(tree, "report_html", -10)  # after Python-Markdown's own passes: text is final
    body = md.convert(markdown)

    page_title = html.escape(title or tree.first_h1 or "Run report")
    page = "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>{page_title}</title>", f"<style>\n{CSS}\n</style>", "</head>", "<body>", body,
                      "</body>", "</html>", ""])
    return Converted(page, list(tree.inlined), list(tree.missing))


def write_html(folder: str, markdown_path: str | None = None) -> str:
    """Convert ``folder/report.md`` (or ``markdown_path``) into a self-contained ``folder/report.html``.

    Images are resolved relative to the markdown file's directory and inlined as base64 data URIs; a missing one
    is rendered as a placeholder box and logged (the conversion does not fail). Written atomically; returns the path.
    """
    md = Path(markdown_path) if markdown_path is not None else Path(folder) / "report.md"
    result = convert(md.read_text(encoding="utf-8"), md.parent)
    out = Path(folder) / "report.html"
    write_text(str(out), result.html)
    return str(out)
