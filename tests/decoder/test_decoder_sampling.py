"""DALL-E 2's chains in `sample`: caption → CLIP text emb → diffusion prior → decoder → CLIP rerank, and variations,
with the DALL-E 1 path's records; every model checked against the others before anything is drawn."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.clip import model as clip_lib
from pipeline.clip.train import train_clip
from pipeline.config import ClipConfig, load_config
from pipeline.decoder.model import Decoder, DecoderShape
from pipeline.demo import synth
from pipeline.errors import InputError
from pipeline.prior.checkpoints import save_prior
from pipeline.prior.diffusion import DiffusionPrior, DiffusionShape
from pipeline.sample.run import run_sample

BPE, EMBED = 49408, 16
PRIOR = DiffusionShape(text_vocab=BPE, text_len=8, embed_dim=EMBED, n_layer=1, n_head=2, n_embd=16, timesteps=50)
DECODER = DecoderShape(image_size=16, embed_dim=EMBED, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_levels=(1,), head_channels=16, context_dim=16, text_vocab=BPE, text_len=8,
                       text_layers=1, timesteps=50, prediction="v")
CAPTIONS = ["a red circle in the top left on a gray background", "a blue square in the bottom right on a black "
            "background"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding a tiny CLIP, a diffusion prior and a decoder (random weights, live outputs)."""
    root = tmp_path_factory.mktemp("chain")
    samples, _ = synth.make_samples(32, 0.1, seed=0)
    images = np.stack([np.asarray(synth.render(s, 16)) for s in samples])
    ccfg = ClipConfig(embed_dim=EMBED, width=32, layers=1, patch_size=8, context_length=32, steps=2, batch_size=16)
    train_clip(ccfg, images, [s.caption for s in samples], str(root / "clip"), seed=0)
    meta = {"embed_dim": EMBED, "clip": {"arch": f"local-dir:{root / 'clip'}", "pretrained": ""},
            "tokenizer": {"vocab_size": BPE}, "grid": 2}
    torch.manual_seed(0)
    prior = DiffusionPrior(PRIOR)
    save_prior(str(root / "run" / "prior_diffusion" / "model.safetensors"), "diffusion", dataclasses.asdict(PRIOR),
               prior.state_dict(), meta, 1)
    decoder = Decoder(DECODER)
    with torch.no_grad():
        for p in decoder.parameters():
            if (p == 0).all() and p.ndim > 1:
                p.normal_(0, 0.05)
    save_prior(str(root / "run" / "decoder" / "model.safetensors"), "decoder", dataclasses.asdict(DECODER),
               decoder.state_dict(), meta, 1)
    for i, s in enumerate(samples[:2]):
        synth.render(s, 40).save(root / f"input{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _cfg(root, *overrides):
    return load_config(None, [f"run_dir={root / 'run'}", "download.image_size=16", "sample.candidates=3",
                              "sample.keep=2", "sample.decoder_steps=4", "sample.diffusion_steps=4",
                              f"sample.output={root / 'report'}", *overrides])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dalle2_chain_writes_the_dalle1_records_reranked_by_clip(run, tmp_path):
    cfg = _cfg(run, "sample.chain=dalle2", f"sample.output={tmp_path}", f"sample.captions={json.dumps(CAPTIONS)}")
    stats, results = run_sample(cfg)
    assert stats["chain"] == "dalle2" and stats["samples"] == 6 and stats["captions"] == 2
    assert stats["prior_s"] > 0 and stats["decoder_s"] > 0 and stats["rerank_gain"] >= 0
    bundle = clip_lib.load_clip(f"local-dir:{run / 'clip'}")
    for r, caption in zip(results, CAPTIONS):
        assert r.caption == caption and r.candidates.shape == (3, 16, 16, 3) and r.keep == 2
        fresh = clip_lib.encode_images(bundle, r.candidates) @ clip_lib.encode_texts(bundle, [caption])[0]
        np.testing.assert_allclose(fresh, r.clip_scores, atol=1e-5)  # the records' scores are CLIP's, best first
        assert np.all(np.diff(r.clip_scores) <= 0)
    rows = pq.read_table(tmp_path / "samples.parquet").to_pylist()
    assert len(rows) == 6 and sum(r["kept"] for r in rows) == 4
    assert {r["chain"] for r in rows} == {"dalle2"} and rows[0]["decoder_steps"] == "4"
    assert rows[0]["decoder_checkpoint"].endswith("decoder/model.safetensors")
    assert rows[0]["checkpoint"].endswith("prior_diffusion/model.safetensors")
    assert all((tmp_path / r["image_path"]).exists() for r in rows) and (tmp_path / "samples.png").exists()
    assert stats["scored"] == 2 and 0 <= stats["match"] <= 1  # read from pixels, as for DALL-E 1

    again = run_sample(cfg)[1]
    assert all(np.array_equal(a.candidates, b.candidates) for a, b in zip(results, again))
    unguided = run_sample(_cfg(run, "sample.chain=dalle2", f"sample.output={tmp_path / 'g1'}",
                               f"sample.captions={json.dumps(CAPTIONS)}", "sample.decoder_guidance_scale=1.0"))[1]
    assert not all(np.array_equal(a.candidates, b.candidates) for a, b in zip(results, unguided))


def test_variations_of_input_images(run, tmp_path):
    cfg = _cfg(run, "sample.chain=variations", f"sample.output={tmp_path}",
               f"sample.variations=[{run / 'input0.png'}, {run / 'input1.png'}]")
    stats, results = run_sample(cfg)
    assert stats["chain"] == "variations" and stats["samples"] == 6
    assert [r.caption for r in results] == ["variations of input0.png", "variations of input1.png"]
    bundle = clip_lib.load_clip(f"local-dir:{run / 'clip'}")
    for r, name in zip(results, ("input0.png", "input1.png")):
        src = np.asarray(Image.open(run / name).convert("RGB").resize((16, 16), Image.BICUBIC))
        fresh = clip_lib.encode_images(bundle, r.candidates) @ clip_lib.encode_images(bundle, src[None])[0]
        np.testing.assert_allclose(fresh, r.clip_scores, atol=1e-4)  # scored against the input image
    rows = pq.read_table(tmp_path / "samples.parquet").to_pylist()
    assert len(rows) == 6 and {r["chain"] for r in rows} == {"variations"}
    assert "faithfulness" in stats  # not captions of the embedded set: recorded as not scorable


def test_bad_inputs_are_refused_before_drawing(run, tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(InputError, match=r"broken\.png: cannot decode the image for variations"):
        run_sample(_cfg(run, "sample.chain=variations", f"sample.variations=[{run / 'input0.png'}, "
                                                         f"{run / 'broken.png'}]"))
    with pytest.raises(InputError, match="DALL-E 2's decoder .* not a diffusion prior"):
        run_sample(_cfg(run, "sample.chain=dalle2",
                        f"sample.diffusion_checkpoint={run / 'run/decoder/model.safetensors'}", "sample.captions=[x]"))
    with pytest.raises(InputError, match="a 'diffusion' prior's weights, not a decoder's"):
        run_sample(_cfg(run, "sample.chain=dalle2", "sample.captions=[x]",
                        f"sample.decoder_checkpoint={run / 'run/prior_diffusion/model.safetensors'}"))
    wide = dataclasses.replace(DECODER, embed_dim=32)
    save_prior(str(tmp_path / "wide.safetensors"), "decoder", dataclasses.asdict(wide), Decoder(wide).state_dict(),
               {"embed_dim": 32, "clip": {"arch": f"local-dir:{run / 'clip'}", "pretrained": ""}}, 1)
    with pytest.raises(InputError, match=r"wide\.safetensors: the decoder was built for 32-d CLIP embeddings, the CL"):
        run_sample(_cfg(run, "sample.chain=dalle2", "sample.captions=[x]",
                        f"sample.decoder_checkpoint={tmp_path / 'wide.safetensors'}"))
    code = main(["sample", f"run_dir={tmp_path / 'empty'}", "sample.chain=dalle2", "sample.captions=[x]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no diffusion prior" in err[0] and err[0].startswith("error: ")
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="sample.variations"):
        load_config(None, ["sample.chain=variations"])


def test_decoder_candidates_sets_the_images_per_input_of_the_dalle2_chains(run, tmp_path):
    cfg = _cfg(run, "sample.chain=dalle2", f"sample.output={tmp_path}", f"sample.captions={json.dumps(CAPTIONS)}",
               "sample.decoder_candidates=2", "sample.keep=1")
    stats, results = run_sample(cfg)
    assert stats["samples"] == 4 and all(r.candidates.shape[0] == 2 and r.keep == 1 for r in results)
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="sample.keep"):
        load_config(None, ["sample.candidates=8", "sample.keep=3", "sample.decoder_candidates=2"])
