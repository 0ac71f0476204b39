"""Fetched bytes → checked, resized, re-encoded image, around img2dataset's ``Resizer``.

What this adds: the header is read *before* any pixel is decoded, so a decompression bomb (a small file that claims
30000×30000 pixels) is refused by its header, as are images too small or too elongated; and large JPEGs are decoded
at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled decode, ``cv2.IMREAD_REDUCED_COLOR_*``) when the target
is that much smaller, which is where most of the CPU goes when 1024×768 photos become 256×256 crops. Everything else
(PNG, WebP, alpha matting, small images) goes through img2dataset's own ``Resizer`` unchanged.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from img2dataset.resizer import Resizer  # noqa: E402

IMAGE_CODES = ("empty_body", "not_an_image", "too_many_pixels", "too_small", "bad_aspect", "decode_error")
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 50_000_000
    """Refuse images whose header claims more pixels (decompression bombs)."""
    min_image_size: int = 0
    """Refuse images whose shorter side is smaller (0: no minimum)."""
    max_aspect_ratio: float = 0.0
    """Refuse images whose long/short side ratio is larger (0: no limit)."""


@dataclass
class Processed:
    code: str
    message: str = ""
    data: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None


class ImageProcessor:
    def __init__(self, image_size: int, resize_mode: str, encode_format: str, encode_quality: int,
                 limits: ImageLimits, reduced_decode: bool = True):
        self.size, self.mode, self.limits, self.reduced_decode = image_size, resize_mode, limits, reduced_decode
        self.resizer = Resizer(image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=False,
                               encode_quality=encode_quality, encode_format=encode_format)
        self.ext = "." + encode_format

    def __call__(self, body: bytes) -> Processed:
        if not body:
            return Processed("empty_body", "the server sent no bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                head = Image.open(io.BytesIO(body))  # lazy: parses the header only
                (w, h), fmt = head.size, head.format
        except Image.DecompressionBombError as exc:
            return Processed("too_many_pixels", str(exc))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            return Processed("not_an_image", f"not a recognised image ({type(exc).__name__})")
        refused = self._check(w, h)
        if refused is not None:
            return refused
        if fmt == "JPEG" and b"\xff\xd9" not in body[-4096:]:
            return Processed("decode_error", "JPEG has no end-of-image marker (truncated or corrupt)")
        factor = self._reduction(w, h) if fmt == "JPEG" and self.reduced_decode else 1
        if factor > 1:
            return self._fast(body, factor, w, h)
        img, width, height, _, _, err = self.resizer(io.BytesIO(body))
        if err is not None:
            return Processed("decode_error", err)
        return Processed("ok", "", img, width, height, w, h)

    def _check(self, w: int, h: int) -> Processed | None:
        lim = self.limits
        if w <= 0 or h <= 0:
            return Processed("not_an_image", f"header claims {w}x{h}")
        if w * h > lim.max_pixels:
            return Processed("too_many_pixels", f"header claims {w}x{h} > {lim.max_pixels} pixels")
        if min(w, h) < lim.min_image_size:
            return Processed("too_small", f"{w}x{h} is below min_image_size {lim.min_image_size}")
        if lim.max_aspect_ratio and max(w, h) / min(w, h) > lim.max_aspect_ratio:
            return Processed("bad_aspect", f"{w}x{h} aspect ratio is above {lim.max_aspect_ratio:g}")
        return None

    def _reduction(self, w: int, h: int) -> int:
        if self.mode not in ("center_crop", "keep_ratio", "border"):
            return 1
        side = min(w, h) if self.mode != "border" else max(w, h)
        return next((k for k, _ in _REDUCED if side >= k * self.size), 1)

    def _fast(self, body: bytes, factor: int, w: int, h: int) -> Processed:
        flag = dict(_REDUCED)[factor] | cv2.IMREAD_IGNORE_ORIENTATION  # img2dataset ignores EXIF orientation too
        img = cv2.imdecode(np.frombuffer(body, np.uint8), flag)
        if img is None:
            return Processed("decode_error", "Image decoding error")
        img = self._resize(img)
        ok, enc = cv2.imencode(self.ext, img, self.resizer.encode_params)
        if not ok:
            return Processed("decode_error", "encode failed")
        return Processed("ok", "", enc.tobytes(), img.shape[1], img.shape[0], w, h)

    def _resize(self, img: np.ndarray) -> np.ndarray:
        """The geometry of img2dataset's SmallestMaxSize/LongestMaxSize + CenterCrop/pad, with area interpolation
        (centre_crop crops in source pixels first, which lands within a pixel of resize-then-crop)."""
        hh, ww = img.shape[:2]
        if self.mode == "center_crop":  # crop the square first: resizing pixels the crop would drop is wasted work
            side = min(hh, ww)
            top, left = (hh - side) // 2, (ww - side) // 2
            img = img[top:top + side, left:left + side]
            return cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        side = max(hh, ww) if self.mode == "border" else min(hh, ww)
        scale = self.size / side
        if scale != 1.0:
            img = cv2.resize(img, (round(ww * scale), round(hh * scale)), interpolation=cv2.INTER_AREA)
        hh, ww = img.shape[:2]
        if self.mode == "border":
            top, left = (self.size - hh) // 2, (self.size - ww) // 2
            img = cv2.copyMakeBorder(img, top, self.size - hh - top, left, self.size - ww - left,
                                     cv2.BORDER_CONSTANT, value=(255, 255, 255))
        return np.ascontiguousarray(img)
