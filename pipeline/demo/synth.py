"""A deterministic generator of captioned images whose captions are learnable from pixels.

Each image is one shape (circle, square, triangle) of one colour in one quadrant on one background colour, captioned
``"a red circle in the top left on a gray background"``. All four attributes can be read back from pixels
(``read_image``), which is how the demo scores whether sampled, decoded or retrieved images are faithful to their
captions (``score_attributes``, beside each attribute's chance level).
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Sequence
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


ATTRIBUTES = ("colour", "shape", "position", "background")
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS),
          "background": 1 / len(BACKGROUNDS)}
"""What guessing each attribute uniformly scores (the held-out captions' attributes are spread over all values)."""


def read_image(image: np.ndarray) -> dict[str, str | None]:
    """Colour, shape, position (quadrant) and background read from an HxWx3 uint8 image; None where no shape pixels
    are found (the background is still read).

    Every pixel goes to its nearest palette entry. The most frequent shape colour wins; its pixels near their median
    (the shape) give the quadrant by their centre of mass; the most frequent background entry is the background.
    The shape comes from those pixels' bounding box (2nd-98th percentile, so stray pixels of a generated image do not
    stretch it): a triangle's top quarter is far narrower than its bottom quarter, a square fills its box, a circle
    fills ~pi/4 of it.
    """
    pix = image.reshape(-1, 3).astype(np.float32)
    nearest = ((pix[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(_PALETTE))
    n_col = len(COLOURS)
    out: dict[str, str | None] = {"colour": None, "shape": None, "position": None,
                                  "background": list(BACKGROUNDS)[int(counts[n_col:].argmax())]}
    h, w = image.shape[:2]
    if counts[:n_col].max() < max(2, h * w // 100):
        return out
    best = int(counts[:n_col].argmax())
    mask = (nearest == best).reshape(h, w)
    ys, xs = np.nonzero(mask)
    # Only pixels near the median belong to the shape (a shape spans 0.38 of the image): stray pixels of the same
    # colour elsewhere in a generated image must not stretch its box nor move its centre.
    cy, cx = np.median(ys), np.median(xs)
    near = (np.abs(ys - cy) <= 0.3 * h) & (np.abs(xs - cx) <= 0.3 * w)
    mask = np.zeros_like(mask)
    mask[ys[near], xs[near]] = True
    ys, xs = ys[near], xs[near]
    out["colour"] = _PALETTE_NAMES[best]
    out["position"] = f"{'top' if ys.mean() < h / 2 else 'bottom'} {'left' if xs.mean() < w / 2 else 'right'}"
    y0, y1 = np.percentile(ys, [2, 98]).round().astype(int)
    x0, x1 = np.percentile(xs, [2, 98]).round().astype(int)
    box = mask[y0:y1 + 1, x0:x1 + 1]
    q = max(1, box.shape[0] // 4)
    top, bottom = box[:q].sum(1).mean(), box[-q:].sum(1).mean()
    if top < 0.6 * bottom:
        out["shape"] = "triangle"
    else:
        out["shape"] = "square" if box.mean() >= 0.93 else "circle"
    return out


def read_attributes(image: np.ndarray) -> tuple[str | None, str | None]:
    """(shape colour, quadrant) read from an HxWx3 uint8 image (``read_image``), or None where no shape is found."""
    got = read_image(image)
    return got["colour"], got["position"]


def score_attributes(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float | int]:
    """How often the attributes read from each image's pixels are the ones its caption names: per attribute, all four
    at once, and colour and position together (the DALL-E 1 section's pair), each beside its chance level. Captions
    this dataset did not make are skipped; ``scored`` counts the rest."""
    hits = {a: 0 for a in (*ATTRIBUTES, "colour_and_position", "all")}
    n = 0
    for image, caption in zip(images, captions, strict=True):
        want = parse_caption(caption)
        if want is None:
            continue
        n += 1
        got = read_image(np.asarray(image))
        ok = {a: got[a] == want[a] for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        hits["colour_and_position"] += ok["colour"] and ok["position"]
        hits["all"] += all(ok.values())
    out: dict[str, float | int] = {"scored": n}
    if not n:
        return out
    chance = {**CHANCE, "colour_and_position": CHANCE["colour"] * CHANCE["position"],
              "all": float(np.prod(list(CHANCE.values())))}
    for a, h in hits.items():
        out[f"{a}_match"], out[f"{a}_chance"] = h / n, chance[a]
    return out


def parse_caption(caption: str) -> dict[str, str] | None:
    """Attributes named by a caption of this dataset, or None for a caption it did not make."""
    for shape, colour, position, background in all_combinations():
        if caption == caption_of(shape, colour, position, background):
            return {"shape": shape, "colour": colour, "position": position, "background": background}
    return None
