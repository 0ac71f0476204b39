"""A deterministic generator of captioned images whose captions are learnable from pixels.

Each image is one shape (circle, square, triangle) of one colour in one quadrant on one background colour, captioned
``"a red circle in the top left on a gray background"``. Colour and position can be read back from pixels, which is
how the demo scores whether sampled images are faithful to their captions.
"""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 225, 30),
    "magenta": (215, 40, 215),
    "cyan": (40, 215, 225),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (115, 115, 115),
    "brown": (95, 60, 35),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")


@dataclass(frozen=True)
class Sample:
    index: int
    shape: str
    colour: str
    position: str
    background: str
    jitter: tuple[int, int]

    @property
    def caption(self) -> str:
        return caption_of(self.shape, self.colour, self.position, self.background)


def caption_of(shape: str, colour: str, position: str, background: str) -> str:
    return f"a {colour} {shape} in the {position} on a {background} background"


def all_combinations() -> list[tuple[str, str, str, str]]:
    return list(itertools.product(SHAPES, COLOURS, POSITIONS, BACKGROUNDS))


def split_combinations(heldout_fraction: float, seed: int) -> tuple[list[tuple], list[tuple]]:
    """Hold out a fixed fraction of caption combinations; every colour keeps training examples."""
    combos = all_combinations()
    rng = random.Random(seed)
    rng.shuffle(combos)
    n_held = max(1, int(round(len(combos) * heldout_fraction)))
    return combos[n_held:], combos[:n_held]


def make_samples(num_images: int, heldout_fraction: float, seed: int) -> tuple[list[Sample], list[str]]:
    """Training samples (drawn only from training combinations) and the held-out captions."""
    train, held = split_combinations(heldout_fraction, seed)
    rng = random.Random(seed + 1)
    samples = []
    for i in range(num_images):
        shape, colour, position, background = train[rng.randrange(len(train))]
        samples.append(Sample(i, shape, colour, position, background, (rng.randint(-2, 2), rng.randint(-2, 2))))
    return samples, [caption_of(*c) for c in held]


def render(sample: Sample, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[sample.background])
    draw = ImageDraw.Draw(img)
    half = size // 2
    cx = (half // 2 if "left" in sample.position else half + half // 2) + sample.jitter[0] * size // 64
    cy = (half // 2 if "top" in sample.position else half + half // 2) + sample.jitter[1] * size // 64
    r = int(size * 0.19)
    fill = COLOURS[sample.colour]
    if sample.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif sample.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def render_png(sample: Sample, size: int) -> bytes:
    buf = io.BytesIO()
    render(sample, size).save(buf, format="PNG")
    return buf.getvalue()


_PALETTE_NAMES = list(COLOURS) + [f"bg:{b}" for b in BACKGROUNDS]
_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)


def read_attributes(image: np.ndarray) -> tuple[str | None, str | None]:
    """(shape colour, quadrant) read from an HxWx3 uint8 image, or None where no shape pixels are found.

    Every pixel goes to its nearest palette entry; the most frequent shape colour wins and its pixels' centre of
    mass gives the quadrant.
    """
    pix = image.reshape(-1, 3).astype(np.float32)
    dist = ((pix[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)
    nearest = dist.argmin(1)
    counts = np.bincount(nearest, minlength=len(_PALETTE))[: len(COLOURS)]
    h, w = image.shape[:2]
    if counts.max() < max(2, h * w // 100):
        return None, None
    best = int(counts.argmax())
    ys, xs = np.divmod(np.flatnonzero(nearest == best), w)
    vert = "top" if ys.mean() < h / 2 else "bottom"
    horiz = "left" if xs.mean() < w / 2 else "right"
    return _PALETTE_NAMES[best], f"{vert} {horiz}"


def parse_caption(caption: str) -> dict[str, str] | None:
    """Attributes named by a caption of this dataset, or None for a caption it did not make."""
    for shape, colour, position, background in all_combinations():
        if caption == caption_of(shape, colour, position, background):
            return {"shape": shape, "colour": colour, "position": position, "background": background}
    return None
