"""The scaled-decode fast path gives the picture img2dataset's Resizer gives, and the header checks come first."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.download.imaging import ImageLimits, ImageProcessor


def photo(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    for _ in range(12):  # shapes with edges, so a wrong crop or scale shows up
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, h // 4)
        cv2.circle(img, (int(x), int(y)), int(r), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border"])
def test_fast_path_matches_img2dataset_resizer(mode):
    body = photo(1024, 768)
    fast = ImageProcessor(128, mode, "jpg", 95, ImageLimits())(body)
    slow = ImageProcessor(128, mode, "jpg", 95, ImageLimits(), reduced_decode=False)(body)
    assert fast.code == slow.code == "ok"
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert (fast.original_width, fast.original_height) == (1024, 768)
    mse = np.mean((decoded(fast.data) - decoded(slow.data)) ** 2)
    psnr = 10 * np.log10(255**2 / mse)
    assert psnr > 30, f"{mode}: fast path differs from img2dataset's resize (PSNR {psnr:.1f} dB)"


def test_header_checks_refuse_before_decoding():
    proc = ImageProcessor(64, "center_crop", "jpg", 95, ImageLimits(max_pixels=1000 * 700))
    assert proc(photo(1024, 768)).code == "too_many_pixels"
    assert proc(b"").code == "empty_body" and proc(b"<html></html>").code == "not_an_image"
    cut = photo(320, 240)[:-200]
    assert proc(cut).code == "decode_error"
