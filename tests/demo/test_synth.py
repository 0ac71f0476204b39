import numpy as np

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
