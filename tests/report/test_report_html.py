"""report.html: a self-contained page (images inlined) that really renders in a headless Chromium.

The browser tests are never skipped: without a chromium on PATH they fail with the install hint
(.ci/install-chromium.sh), so CI has to provide the browser.
"""

from __future__ import annotations

import re

import browser
import numpy as np
import pytest
from browser import INSTALL_HINT, find_chromium, render_check
from PIL import Image

from pipeline.report.html import convert, write_html

REPORT_MD = """# Run report

Run of `tiny` on 3 < 4 & "quotes" stay text.

## Scores

| measure | value | chance |
|---|---:|:---:|
| shape colour matches caption | 0.875 | 0.125 |
| <b>not bold</b> | `x\\|y` | 0.250 |

## Stages

- download: `16.7` s
- train-dvae: 153.5 s

## Samples

![Samples (CLIP-reranked)](samples.png)

## dVAE reconstructions

![dVAE reconstructions](dvae_reconstructions.png)

## Loss curves

![Loss curves](loss_curves.png)

## Diffusion retrieval

![Diffusion retrieval](diffusion_retrieval.png)
"""

REAL = ["samples.png", "dvae_reconstructions.png", "loss_curves.png"]
MISSING = "diffusion_retrieval.png"


def _png(path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    rng.integers(0, 256, (h, w))], axis=-1).astype(np.uint8)
    Image.fromarray(img).save(path)


@pytest.fixture
def report_folder(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    for i, (name, size) in enumerate(zip(REAL, [(360, 240), (300, 80), (400, 150)])):
        _png(folder / name, *size, seed=i)
    (folder / "report.md").write_text(REPORT_MD)
    return folder


def _require_chromium() -> str:
    """The browser, or a test failure (never a skip) telling how to install it."""
    try:
        return find_chromium()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the headless-browser check of report.html needs it; CI must install it)", pytrace=False)


def test_write_html_is_self_contained(report_folder):
    path = write_html(str(report_folder))
    assert path == str(report_folder / "report.html")
    page = (report_folder / "report.html").read_text()
    assert not [p.name for p in report_folder.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing

    # nothing outside the page: every src= is a data: URI, no links/stylesheets/url() to fetch
    srcs = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert len(srcs) == len(REAL)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs]
    assert not re.search(r"\b(href|srcset)\s*=", page, re.I)
    assert "url(" not in page and "@import" not in page
    assert "<script" not in page.lower()

    # each real image inlined once, with alt and its original file name
    for name in REAL:
        assert len(re.findall(rf'<img [^>]*data-src-name="{re.escape(name)}"', page)) == 1
    assert 'alt="Samples (CLIP-reranked)"' in page

    # the missing image: a visible placeholder naming it (not an <img>), and listed at the end
    assert re.search(rf'<span class="missing-image"[^>]*data-src-name="{MISSING}"[^>]*>missing image: {MISSING}<',
                     page)
    assert not re.search(rf'<img [^>]*data-src-name="{MISSING}"', page)
    assert 'id="missing-images"' in page

    # structure and escaping
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "max-width: 100%" in page
    assert "<title>Run report</title>" in page and '<h1 id="run-report">Run report</h1>' in page
    assert page.count("<table>") == 1 and len(re.findall(r"<th[ >]", page)) == 3 and page.count("<tr>") == 3
    assert '<td style="text-align:right">0.875</td>' in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>" not in page
    assert "<code>x|y</code>" in page  # an escaped pipe stays inside its cell
    assert "3 &lt; 4 &amp; &quot;quotes&quot;" in page and "<code>tiny</code>" in page
    assert "<li>download: <code>16.7</code> s</li>" in page


def test_convert_reports_images_and_rejects_remote(tmp_path):
    _png(tmp_path / "a.png", 8, 8, seed=0)
    md = "# T\n\n![a](a.png) and ![remote](http://example.com/x.png) and ![gone](gone.png)\n"
    res = convert(md, tmp_path)
    assert res.images == ["a.png"]
    assert res.missing == ["http://example.com/x.png", "gone.png"]
    srcs = re.findall(r'\bsrc="([^"]*)"', res.html)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")  # the remote one is not fetched
    assert res.html.count('class="missing-image"') == 2


def test_render_check_in_headless_chromium(report_folder, tmp_path):
    _require_chromium()
    path = write_html(str(report_folder))
    shot = tmp_path / "shot" / "report.png"
    res = render_check(path, str(shot), timeout_s=60)
    assert res["images"] == len(REAL), res
    assert res["loaded"] == res["images"] and res["broken"] == [], res
    assert res["placeholders"] == 1, res  # the missing image is a box, not a broken <img>
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["screenshot_bytes"] == shot.stat().st_size > 10_000, res
    with Image.open(shot) as im:
        assert im.size == (1200, 3000)
        # not a blank page: the rendered screenshot has real variation in it
        assert np.asarray(im.convert("L")).std() > 5
    assert not (report_folder / "report.html").read_text().count("img-status")  # probe went to a temp copy


def test_render_check_detects_a_broken_image(tmp_path):
    """The loaded-check is not vacuous: an image that does not decode is reported broken by name."""
    _require_chromium()
    _png(tmp_path / "good.png", 40, 40, seed=1)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (tmp_path / "report.md").write_text("# Broken\n\n![good](good.png)\n\n![corrupt](corrupt.png)\n")
    res = render_check(write_html(str(tmp_path)), str(tmp_path / "shot.png"), timeout_s=60)
    assert res["images"] == 2 and res["loaded"] == 1 and res["broken"] == ["corrupt.png"], res


def test_missing_browser_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL_HINT)):
        render_check(str(tmp_path / "x.html"), str(tmp_path / "x.png"))
