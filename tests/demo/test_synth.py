import numpy as np
import pytest

from pipeline.demo import synth


def test_deterministic_and_heldout_disjoint():
    a, held_a = synth.make_samples(200, 0.1, seed=3)
    b, held_b = synth.make_samples(200, 0.1, seed=3)
    assert a == b and held_a == held_b
    train_captions = {s.caption for s in a}
    assert not train_captions & set(held_a)
    assert len(held_a) == round(len(synth.all_combinations()) * 0.1)


def test_attributes_read_back_from_pixels_for_every_combination():
    for i, (shape, colour, position, background) in enumerate(synth.all_combinations()):
        s = synth.Sample(i, shape, colour, position, background, (2, -2))
        for size in (32, 64):
            got_colour, got_pos = synth.read_attributes(np.asarray(synth.render(s, size)))
            assert (got_colour, got_pos) == (colour, position), (s.caption, size)


def test_blank_image_has_no_shape():
    img = np.full((32, 32, 3), synth.BACKGROUNDS["gray"], dtype=np.uint8)
    assert synth.read_attributes(img) == (None, None)


def test_parse_caption():
    assert synth.parse_caption("a red circle in the top left on a gray background") == {
        "shape": "circle", "colour": "red", "position": "top left", "background": "gray"}
    assert synth.parse_caption("a photo of a dog") is None


@pytest.mark.parametrize("size", [16, 32, 64])
def test_every_attribute_reads_back_from_pixels_for_every_combination_and_jitter(size):
    rng = np.random.default_rng(0)
    for i, (shape, colour, position, background) in enumerate(synth.all_combinations()):
        s = synth.Sample(i, shape, colour, position, background, tuple(int(v) for v in rng.integers(-2, 3, 2)))
        want = {"shape": shape, "colour": colour, "position": position, "background": background}
        assert synth.read_image(np.asarray(synth.render(s, size))) == want, (s, size)


def test_reading_survives_the_noise_of_a_generated_image():
    """Decoded images are noisy: per-pixel noise and a few stray pixels of another colour must not change the read."""
    rng = np.random.default_rng(1)
    wrong = 0
    for i, combo in enumerate(synth.all_combinations()):
        s = synth.Sample(i, *combo, (0, 0))
        img = np.asarray(synth.render(s, 32)).astype(np.float32) + rng.normal(0, 20, (32, 32, 3))
        img[rng.integers(0, 32, 6), rng.integers(0, 32, 6)] = synth.COLOURS["white"]
        got = synth.read_image(np.clip(img, 0, 255).astype(np.uint8))
        wrong += got != dict(zip(("shape", "colour", "position", "background"), combo))
    assert wrong <= 5, wrong  # of 288


def test_scores_are_one_on_own_renders_and_near_chance_on_shuffled_ones():
    samples, _ = synth.make_samples(600, 0.1, seed=0)
    images = [np.asarray(synth.render(s, 32)) for s in samples]
    captions = [s.caption for s in samples]
    own = synth.score_attributes(images, captions)
    assert own["scored"] == 600 and all(own[f"{a}_match"] == 1.0 for a in (*synth.ATTRIBUTES, "all"))
    shuffled = synth.score_attributes(images, captions[1:] + captions[:1])
    for a in synth.ATTRIBUTES:  # a different sample's caption: about chance (attributes are drawn independently)
        assert abs(shuffled[f"{a}_match"] - shuffled[f"{a}_chance"]) < 0.1, (a, shuffled)
    assert shuffled["colour_chance"] == 1 / 8 and shuffled["all_chance"] == 1 / (8 * 3 * 4 * 3)
    assert synth.score_attributes(images[:2], ["a photo of a dog", "x"]) == {"scored": 0}
    blank = np.full((32, 32, 3), synth.BACKGROUNDS["brown"], dtype=np.uint8)
    got = synth.score_attributes([blank], [captions[0].replace(" on a black ", " on a brown ")
                                           .replace(" on a gray ", " on a brown ")])
    assert got["colour_match"] == 0.0 and got["background_match"] == 1.0
