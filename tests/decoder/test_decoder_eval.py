"""eval-decoder on held-out rows of real shards: a tiny decoder trained here (never on those rows), a tiny CLIP, a
diffusion prior; images from the true and the prior's embedding scored by CLIP and by the pixel read against random
dataset images, written through the storage helpers; refusals before anything is decoded."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from decoder_shards import EMBED, META, TEXT_VOCAB, embedding, write_joined
from PIL import Image

from pipeline.clip.train import train_clip
from pipeline.config import ClipConfig, load_config
from pipeline.decoder.eval import eval_decoder
from pipeline.decoder.model import Decoder, DecoderShape
from pipeline.demo import synth
from pipeline.errors import DataError, InputError
from pipeline.prior.checkpoints import save_prior
from pipeline.prior.diffusion import DiffusionPrior, DiffusionShape
from pipeline.prior.rows import heldout_mask

pytestmark = pytest.mark.slow  # a decoder trained in the fixture: ~30 s on an idle core
SIZE, HELDOUT = 16, 20.0
SHAPE = DecoderShape(image_size=SIZE, embed_dim=EMBED, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), head_channels=16, context_dim=16, timesteps=100, prediction="v")
PRIOR = DiffusionShape(text_vocab=TEXT_VOCAB, text_len=4, embed_dim=EMBED, n_layer=1, n_head=2, n_embd=16,
                       timesteps=50)


def _train(samples: dict[str, synth.Sample], steps: int = 300) -> Decoder:
    """The decoder on the training rows only (the held-out split by key, as train-decoder skips it)."""
    train = [s for k, s in samples.items() if not heldout_mask([k], HELDOUT)[0]]
    pixels = torch.from_numpy(np.stack([np.asarray(synth.render(s, SIZE)) for s in train])).permute(0, 3, 1, 2)
    pixels = pixels.float() / 127.5 - 1
    embs = torch.from_numpy(np.stack([embedding(s) for s in train]))
    torch.manual_seed(0)
    model = Decoder(SHAPE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (32,), generator=g)
        loss, _ = model.loss_parts(pixels[idx], embs[idx], image_drop=0.1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    samples = write_joined(root, shards=2, rows=48, size=SIZE)
    keys = list(samples)
    images = np.stack([np.asarray(synth.render(samples[k], SIZE)) for k in keys])
    ccfg = ClipConfig(embed_dim=EMBED, width=32, layers=1, patch_size=8, context_length=32, steps=2, batch_size=16)
    train_clip(ccfg, images, [samples[k].caption for k in keys], str(root / "clip"), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: one core for the tiny models
    try:
        decoder = _train(samples)
    finally:
        torch.set_num_threads(threads)
    save_prior(str(root / "run" / "decoder" / "model.safetensors"), "decoder", dataclasses.asdict(SHAPE),
               decoder.state_dict(), META, 300)
    torch.manual_seed(1)
    save_prior(str(root / "run" / "prior_diffusion" / "model.safetensors"), "diffusion", dataclasses.asdict(PRIOR),
               DiffusionPrior(PRIOR).state_dict(), META, 1)
    return root


def _cfg(root, *overrides):
    return load_config(None, [f"run_dir={root / 'run'}", f"download.output={root / 'images'}",
                              f"download.image_size={SIZE}", f"tokenize.output={root / 'tokens'}",
                              f"clip.output={root / 'clip'}", f"decoder.heldout_percent={HELDOUT}",
                              "decoder.eval_rows=12", "sample.decoder_steps=20", "sample.diffusion_steps=4",
                              "sample.decoder_guidance_scale=2.0", *overrides])


def test_scores_from_true_and_prior_embeddings_against_random_images(run):
    result = eval_decoder(_cfg(run))
    heldout = result["keys"]
    assert result["evaluated"] == len(heldout) >= 8 and heldout == sorted(heldout)
    assert all(heldout_mask(heldout, HELDOUT))  # the rows the decoder never trained on
    sc = result["scores"]
    assert set(sc) == {"true_emb", "prior_emb", "random_images", "originals"}
    assert sc["originals"]["pixels"]["all_match"] == 1.0  # the reader is exact on the dataset's own renders
    for source in sc.values():
        assert -1 <= source["clip_to_caption"] <= 1 and source["pixels"]["scored"] == result["evaluated"]
        assert source["pixels"]["colour_chance"] == 1 / 8
    true_px, rand_px = sc["true_emb"]["pixels"], sc["random_images"]["pixels"]
    # The stand-in embedding names colour, position and background: a decoder that uses it draws them.
    assert true_px["colour_match"] > rand_px["colour_match"] + 0.25, (true_px, rand_px)
    assert true_px["background_match"] > rand_px["background_match"], (true_px, rand_px)
    assert result["clip_true_emb"] == sc["true_emb"]["clip_to_caption"] and "pixel_all_chance" in result
    assert result["prior"].endswith("prior_diffusion/model.safetensors") and "beats_random_baseline" in result

    on_disk = json.loads((run / "run" / "decoder" / "eval" / "eval.json").read_text())
    assert on_disk["scores"] == json.loads(json.dumps(sc))
    grid = Image.open(run / "run" / "decoder" / "eval" / "reconstructions.png")
    assert grid.size == (250 + 3 * 100 + 4, 16 + 8 * 100 + 4)
    assert eval_decoder(_cfg(run))["scores"] == sc  # seeded: the same figures again


def test_without_a_diffusion_prior_the_decoder_alone_is_scored(run, tmp_path):
    cfg = _cfg(run, f"diffusion.output={tmp_path / 'none'}", f"prior.output={tmp_path / 'none'}",
               f"decoder.output={tmp_path / 'dec'}",
               f"sample.decoder_checkpoint={run / 'run/decoder/model.safetensors'}",
               "decoder.eval_rows=3")
    result = eval_decoder(cfg)
    assert "prior_emb" not in result["scores"] and "no diffusion prior" in result["prior"]
    assert result["evaluated"] == 3 and (tmp_path / "dec" / "eval" / "eval.json").exists()


def test_cli_prints_the_headline_and_refuses_bad_inputs(run, tmp_path, capsys):
    from pipeline.cli import main

    args = [f"run_dir={run / 'run'}", f"download.output={run / 'images'}", f"download.image_size={SIZE}",
            f"tokenize.output={run / 'tokens'}", f"clip.output={run / 'clip'}", f"decoder.heldout_percent={HELDOUT}",
            "decoder.eval_rows=2", "sample.decoder_steps=2", "sample.diffusion_steps=2"]
    assert main(["eval-decoder", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["evaluated"] == 2 and "clip_prior_emb" in summary and "scores" not in summary

    decoder_pt = run / "run" / "decoder" / "model.safetensors"
    with pytest.raises(InputError, match="DALL-E 2's decoder .* not a diffusion prior"):
        eval_decoder(_cfg(run, f"sample.diffusion_checkpoint={decoder_pt}"))
    with pytest.raises(InputError, match="a 'diffusion' prior's weights, not a decoder's"):
        eval_decoder(_cfg(run, f"sample.decoder_checkpoint={run / 'run/prior_diffusion/model.safetensors'}"))
    wide = dataclasses.replace(PRIOR, embed_dim=32)
    save_prior(str(tmp_path / "wide.safetensors"), "diffusion", dataclasses.asdict(wide),
               DiffusionPrior(wide).state_dict(), {**META, "embed_dim": 32}, 1)
    with pytest.raises(InputError, match=r"decoder/model\.safetensors: the decoder was built for 16-d CLIP embeddings, "
                                         r"the diffusion prior .*wide\.safetensors predicts 32-d"):
        eval_decoder(_cfg(run, f"sample.diffusion_checkpoint={tmp_path / 'wide.safetensors'}"))
    none = tmp_path / "noemb"
    write_joined(none, shards=1, rows=8, size=SIZE, image_emb=False)
    with pytest.raises(DataError, match=r"00000\.parquet: token shard lacks columns \['clip_image_emb'\]"):
        eval_decoder(_cfg(run, f"tokenize.output={none / 'tokens'}"))
    code = main(["eval-decoder", *args, f"decoder.output={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no decoder weights" in err[0]
