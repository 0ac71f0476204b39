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


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "keep_ratio_largest", "border"])
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


def encoded(img: np.ndarray, ext: str) -> bytes:
    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, 90], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 90], ".png": []}[ext]
    ok, buf = cv2.imencode(ext, img, params)
    assert ok
    return buf.tobytes()


def picture(w: int, h: int, channels: int = 3, seed: int = 1) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(photo(w, h, seed), np.uint8), cv2.IMREAD_COLOR)
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        alpha = np.full((h, w, 1), 255, np.uint8)
        cv2.circle(alpha, (w // 3, h // 2), min(w, h) // 3, 60, -1)
        alpha[: h // 4] = 0
        return np.concatenate([img, alpha], axis=2)
    return img


CASES = [("jpg 640x480", ".jpg", 640, 480, 3), ("jpg 1500x1000 (1/4 decode)", ".jpg", 1500, 1000, 3),
         ("jpg gray", ".jpg", 500, 700, 1), ("jpg small (enlarged)", ".jpg", 200, 150, 3),
         ("png rgb", ".png", 600, 400, 3), ("png rgba", ".png", 520, 600, 4), ("png rgba small", ".png", 180, 120, 4),
         ("webp", ".webp", 900, 600, 3), ("webp small", ".webp", 220, 300, 3), ("jpg exact", ".jpg", 256, 300, 3)]


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"])
@pytest.mark.parametrize("name,ext,w,h,channels", CASES, ids=[c[0] for c in CASES])
def test_every_format_matches_img2dataset_resizer(mode, name, ext, w, h, channels):
    from img2dataset.resizer import Resizer

    body = encoded(picture(w, h, channels), ext)
    ours = ImageProcessor(128, mode, "jpg", 95, ImageLimits())(body)
    img, width, height, ow, oh, err = Resizer(image_size=128, resize_mode=mode, resize_only_if_bigger=False,
                                              encode_quality=95)(io.BytesIO(body))
    assert err is None and ours.code == "ok", ours.message
    assert (ours.width, ours.height, ours.original_width, ours.original_height) == (width, height, ow, oh)
    a, b = decoded(ours.data), decoded(img)
    psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-9))
    assert psnr > 30, f"{name} {mode}: differs from img2dataset's resize (PSNR {psnr:.1f} dB)"


def test_png_and_unusual_encodings_follow_the_resizer_rules():
    from img2dataset.resizer import Resizer

    with pytest.raises(ValueError, match="between 0 and 9"):
        ImageProcessor(64, "center_crop", "png", 95, ImageLimits())
    gif = io.BytesIO()
    Image.fromarray(picture(120, 90)[:, :, ::-1]).save(gif, "GIF")
    png16 = encoded(picture(300, 200).astype(np.uint16) * 257, ".png")
    for body, fmt in ((png16, "png"), (gif.getvalue(), "jpg")):  # 16-bit samples, GIF: left to the Resizer itself
        q = 3 if fmt == "png" else 95
        ours = ImageProcessor(64, "center_crop", fmt, q, ImageLimits())(body)
        img, width, height, _, _, err = Resizer(image_size=64, resize_mode="center_crop", resize_only_if_bigger=False,
                                                encode_quality=q, encode_format=fmt)(io.BytesIO(body))
        assert (ours.code == "ok") == (err is None) and (ours.data, ours.width) == (img, width)
