"""The prior's retrievals scored by what can tell on the embedded set: CLIP similarity of the retrieved image to the
caption and the attributes read from its pixels, per source, beside chance."""

import numpy as np
import pytest

from pipeline.demo import synth
from pipeline.prior.eval import score_retrievals


def test_retrievals_of_the_right_attributes_score_one_and_random_ones_near_chance():
    samples, held = synth.make_samples(400, 0.1, seed=0)
    images = {f"k{s.index}": np.asarray(synth.render(s, 32)) for s in samples}
    by_caption: dict[str, str] = {}
    for s in samples:
        by_caption.setdefault(s.caption, f"k{s.index}")
    captions = list(by_caption)[:40]
    rng = np.random.default_rng(0)
    emb = {k: rng.normal(size=8).astype(np.float32) for k in images}
    text = np.stack([emb[by_caption[c]] for c in captions]) * 3.0  # scale must not matter: cosines
    picks = {"prior": [by_caption[c] for c in captions],  # an image of the caption itself (another render is as good)
             "random": [f"k{i}" for i in rng.integers(0, 400, len(captions))],
             "gone": ["nope"] * len(captions)}
    out = score_retrievals(picks, captions, text, images, emb)
    prior, rand = out["prior"], out["random"]
    assert prior["pixels"]["all_match"] == 1.0 and prior["clip_to_caption"] == pytest.approx(1.0, abs=1e-5)
    assert rand["pixels"]["all_match"] < 0.2 and rand["clip_to_caption"] < 0.5
    assert rand["pixels"]["colour_match"] < 0.4 and rand["pixels"]["colour_chance"] == 1 / 8
    assert out["gone"] == {"clip_to_caption": None, "missing_images": 40, "pixels": {"scored": 0}}
    # Captions from outside the embedded set: CLIP still scores, the pixel read says it scored none.
    other = score_retrievals({"prior": picks["prior"][:2]}, ["a dog", "a cat"], text[:2], images, emb)
    assert other["prior"]["pixels"] == {"scored": 0} and other["prior"]["clip_to_caption"] == pytest.approx(1.0)
