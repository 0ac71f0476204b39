"""The demo's DALL-E 2 pieces on their own: the report section's table, the variations grid, the inputs picked."""

import numpy as np
from PIL import Image

from pipeline.config import load_config
from pipeline.demo import synth
from pipeline.demo.dalle2 import variation_inputs, with_chain
from pipeline.report.figures import variations_grid
from pipeline.report.markdown import dalle2_section
from pipeline.sample.draw import CaptionSamples

PIXELS = {"scored": 24, "samples": 192, "match": 0.5, "chance": 0.125, "position_match": 0.75,
          "position_chance": 0.25, "colour_and_position_match": 0.375, "shape_match": 0.4, "shape_chance": 1 / 3,
          "background_match": 0.9, "background_chance": 1 / 3, "all_match": 0.2, "all_chance": 1 / 288}


def _scores(clip: float, all_match: float) -> dict:
    return {"clip_to_caption": clip, "clip_to_image_emb": clip + 0.1,
            "pixels": {"scored": 8, "all_match": all_match, "colour_match": all_match + 0.1, "all_chance": 1 / 288}}


def test_section_puts_dalle2_beside_dalle1_and_chance_and_the_decoder_beside_random_images():
    d1 = {**PIXELS, "match": 0.25, "position_match": 0.5}
    ev = {"evaluated": 8, "sampler": "ddim", "steps": 25, "guidance_scale": 3.0, "pixel_all_chance": 1 / 288,
          "pixel_colour_chance": 0.125, "scores": {"true_emb": _scores(0.31, 0.5), "prior_emb": _scores(0.27, 0.25),
                                                   "random_images": _scores(0.05, 0.0), "originals": _scores(0.4, 1.0)}}
    lines = dalle2_section(d1, PIXELS, ev)
    text = "\n".join(lines)
    assert "| shape colour matches caption | 0.500 | 0.25 | 0.125 |" in lines
    assert "| position matches caption | 0.750 | 0.5 | 0.250 |" in lines
    assert "| colour and position | 0.375 | 0.375 | 0.031 |" in lines  # chance: colour × position
    assert "| all four attributes | 0.200 | 0.2 | 0.003 |" in lines
    assert "| decoded from the true image embedding | 0.310 | 0.410 | 0.5 | 0.6 |" in lines
    assert "| random dataset images (baseline) | 0.050 | 0.150 | 0 | 0.1 |" in text
    assert "Decoder on 8 held-out rows (ddim, 25 steps, guidance 3.0)" in text
    no_prior = dalle2_section(d1, None, {**ev, "scores": {k: v for k, v in ev["scores"].items() if k != "prior_emb"}})
    assert not any("prior's embedding" in line for line in no_prior) and not any("DALL-E 1" in x for x in no_prior)


def test_variations_grid_has_a_row_per_input_and_the_inputs_are_distinct_images(tmp_path):
    samples, _ = synth.make_samples(40, 0.1, seed=0)
    images = np.stack([np.asarray(synth.render(s, 16)) for s in samples])
    images[1] = images[0]  # the embedded set repeats renders: a repeat is not picked twice
    picks = variation_inputs(images, 4)
    assert len(picks) == 4 and 1 not in picks and len({images[i].tobytes() for i in picks}) == 4
    results = [CaptionSamples(f"variations of {i}", images[[i] * 3], np.array([0.9, 0.8, 0.7]), keep=1) for i in picks]
    path = variations_grid([images[i] for i in picks], results, str(tmp_path / "v" / "variations.png"))
    assert Image.open(path).size == (4 + 96 + 16 + 3 * 100, 4 * 100 + 4)


def test_with_chain_keeps_every_other_setting():
    cfg = load_config(None, ["sample.candidates=5", "sample.decoder_steps=7"])
    two = with_chain(cfg, "variations", "/x/report/variations", variations=["a.png"])
    assert two.sample.chain == "variations" and two.sample.output == "/x/report/variations"
    assert two.sample.candidates == 5 and two.sample.decoder_steps == 7 and cfg.sample.chain == "dalle1"
