"""DALL-E 2's decoder U-Net: shapes, conditioning paths, guidance dropout, masking, samplers, sizes, learning."""

import dataclasses

import pytest
import torch

from pipeline.config import DECODER_SIZES, DecoderConfig
from pipeline.decoder.model import Decoder, DecoderShape, count_params, forward_flops, pixels_to_uint8
from pipeline.prior.transformer import pad_text
from pipeline.training.diffusion import ddim_step, ddpm_step, reverse_diffusion

SHAPE = DecoderShape(image_size=16, embed_dim=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), head_channels=8, context_dim=16, timesteps=100)
CAPTIONED = dataclasses.replace(SHAPE, text_vocab=30, text_len=6, text_layers=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add sync overhead on a loaded 2-core box
    yield
    torch.set_num_threads(threads)


def _live(model: Decoder) -> Decoder:
    """The zero-initialised output layers given weights, so a fresh model's output depends on its inputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all() and p.ndim > 1:
                p.normal_(0, 0.05)
    return model.eval()


def _inputs(B: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 16, 16, generator=g)
    emb = torch.randn(B, 8, generator=g)
    text = pad_text([[1, 2, 3], [4], [], [5, 6, 7, 8]][:B], 6, 30)
    return x, torch.randint(0, 100, (B,), generator=g), emb, text


def test_shape_validation_names_the_field():
    assert DecoderShape(**dataclasses.asdict(CAPTIONED)) == CAPTIONED
    assert DecoderShape.from_dict(json_round_trip(CAPTIONED)) == CAPTIONED  # lists from JSON become tuples
    bads = [({"image_size": 18, "channel_mult": (1, 2, 2)}, "image_size.*divisible by 4"),
            ({"attention_levels": (2,)}, "attention_levels"), ({"prediction": "x0"}, "prediction"),
            ({"text_vocab": 30, "text_len": 0}, "text_len"), ({"embed_dim": 0}, "embed_dim"),
            ({"channel_mult": ()}, "channel_mult"), ({"dropout": 1.0}, "dropout")]
    for change, msg in bads:
        with pytest.raises(ValueError, match=f"DecoderShape.{msg}"):
            dataclasses.replace(SHAPE, **change)


def json_round_trip(shape: DecoderShape) -> dict:
    import json

    return json.loads(json.dumps(dataclasses.asdict(shape)))


@pytest.mark.parametrize("shape", [SHAPE, CAPTIONED, dataclasses.replace(SHAPE, prediction="v",
                                                                          channel_mult=(1, 1, 2),
                                                                          attention_levels=(0, 2))],
                         ids=["image-emb", "captioned", "v-three-levels"])
def test_forward_shapes(shape):
    model = _live(Decoder(shape))
    x, t, emb, text = _inputs()
    out = model(x, t, emb, text if shape.conditioned_on_text else None)
    assert out.shape == x.shape and torch.isfinite(out).all()
    emb_ctx, ctx = model.conditioning(t, emb, text if shape.conditioned_on_text else None, None, None)
    assert emb_ctx.shape == (4, 4 * shape.channels)
    assert ctx.shape == (4, shape.context_tokens + (shape.text_len if shape.conditioned_on_text else 0),
                         shape.context_dim)


def test_a_fresh_decoder_predicts_zero_and_the_caption_is_required_when_built_for_it():
    x, t, emb, text = _inputs()
    assert torch.equal(Decoder(SHAPE)(x, t, emb), torch.zeros_like(x))  # zero-initialised output: a clean start
    with pytest.raises(ValueError, match="conditioned on captions"):
        Decoder(CAPTIONED)(x, t, emb)


def test_image_embedding_and_caption_both_condition_and_dropping_them_removes_them():
    model = _live(Decoder(CAPTIONED))
    x, t, emb, text = _inputs()
    base = model(x, t, emb, text)
    other_emb = model(x, t, torch.randn(4, 8), text)
    other_text = model(x, t, emb, pad_text([[9]] * 4, 6, 30))
    assert (base - other_emb).abs().amax() > 1e-4 and (base - other_text).abs().amax() > 1e-4
    # only its norm-free direction matters: CLIP embeddings are compared by cosine
    assert torch.allclose(model(x, t, emb * 3.0, text), base, atol=1e-5)
    drop = torch.tensor([True, False, True, False])
    a = model(x, t, emb, text, drop_image=drop)
    b = model(x, t, torch.randn(4, 8), text, drop_image=drop)
    assert torch.allclose(a[drop], b[drop], atol=1e-6) and not torch.allclose(a[~drop], b[~drop])
    c = model(x, t, emb, text, drop_text=drop)
    d = model(x, t, emb, pad_text([[9]] * 4, 6, 30), drop_text=drop)
    assert torch.allclose(c[drop], d[drop], atol=1e-6) and not torch.allclose(c[~drop], d[~drop])


def test_loss_masks_invalid_rows_before_the_forward():
    model = _live(Decoder(CAPTIONED)).train()
    x, _, emb, text = _inputs()
    pixels = x.clamp(-1, 1)
    valid = torch.tensor([True, False, True, True])
    poisoned_pixels, poisoned_emb = pixels.clone(), emb.clone()
    poisoned_pixels[1], poisoned_emb[1] = float("nan"), float("nan")
    grads = []
    for px, em in ((pixels, emb), (poisoned_pixels, poisoned_emb)):
        model.zero_grad()
        loss, parts = model.loss_parts(px, em, text, valid, 0.1, 0.5, torch.Generator().manual_seed(3))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(loss) and parts["valid"] == 3.0
    assert all(torch.allclose(a, b) for a, b in zip(*grads))
    none = model.loss_parts(pixels, emb, text, torch.zeros(4, dtype=torch.bool))[0]
    assert float(none) == 0.0
    with pytest.raises(ValueError, match="pixels of shape"):
        model.loss_parts(torch.zeros(2, 3, 8, 8), emb[:2], text[:2])
    with pytest.raises(ValueError, match="caption_drop"):
        model.loss_parts(pixels, emb, text, caption_drop=1.0)


def test_loss_draws_are_a_function_of_the_generator():
    model = _live(Decoder(SHAPE)).train()
    x, _, emb, _ = _inputs()
    a = model.loss_parts(x.clamp(-1, 1), emb, generator=torch.Generator().manual_seed(5), image_drop=0.1)[0]
    b = model.loss_parts(x.clamp(-1, 1), emb, generator=torch.Generator().manual_seed(5), image_drop=0.1)[0]
    c = model.loss_parts(x.clamp(-1, 1), emb, generator=torch.Generator().manual_seed(6), image_drop=0.1)[0]
    assert float(a) == float(b) != float(c)


def test_activation_checkpointing_gives_the_same_gradients():
    x, _, emb, text = _inputs()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _live(Decoder(CAPTIONED, activation_checkpointing=ckpt)).train()
        model.loss_parts(x.clamp(-1, 1), emb, text, generator=torch.Generator().manual_seed(2))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sampling_is_seeded_in_range_and_guidance_changes_it(prediction):
    model = _live(Decoder(dataclasses.replace(CAPTIONED, prediction=prediction)))
    _, _, emb, text = _inputs()
    run = lambda scale, seed=0, sampler="ddim": model.sample(emb, text, steps=6, sampler=sampler,  # noqa: E731
                                                             guidance_scale=scale,
                                                             generator=torch.Generator().manual_seed(seed))
    a, b, guided = run(1.0), run(1.0), run(3.0)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, guided)
    assert float(a.min()) >= -1 and float(a.max()) <= 1 and not torch.equal(a, run(1.0, seed=1))
    assert not torch.equal(run(1.0, sampler="ddpm"), a)
    assert model.training is False
    imgs = pixels_to_uint8(a)
    assert imgs.shape == (4, 16, 16, 3) and imgs.dtype.name == "uint8"
    with pytest.raises(ValueError, match="built for 8-d CLIP embeddings"):
        model.sample(torch.zeros(2, 5), text[:2])
    with pytest.raises(ValueError, match="sampler"):
        model.sample(emb, text, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        model.sample(emb, text, steps=101)


def test_the_shared_chain_ddpm_equals_ddim_at_eta_one():
    torch.manual_seed(0)
    target = torch.randn(3, 5)

    def x0_of(x, t):
        return 0.5 * x + target  # any deterministic function of (x, t) stands in for a model

    runs = [reverse_diffusion((3, 5), x0_of, 50, 10, sampler, 1.0, torch.Generator().manual_seed(4),
                              torch.device("cpu")) for sampler in ("ddpm", "ddim")]
    assert torch.allclose(runs[0], runs[1], atol=1e-5)
    x, x0, n = torch.randn(4), torch.randn(4), torch.randn(4)
    assert torch.allclose(ddpm_step(x, x0, n, 0.3, 0.6, 0.0), ddim_step(x, x0, n, 0.3, 0.6, 1.0), atol=1e-6)


def test_named_sizes_grow_to_over_a_billion_parameters_on_the_meta_device():
    counts = {}
    for name in DECODER_SIZES:
        c = DecoderConfig(size=name)
        mult, levels = c.levels()
        shape = DecoderShape(image_size=64, embed_dim=768, channels=c.channels, channel_mult=mult,
                             num_res_blocks=c.num_res_blocks, attention_levels=levels, head_channels=c.head_channels,
                             context_dim=c.context_dim, text_vocab=49408, text_len=77, text_layers=c.text_layers)
        counts[name] = count_params(shape)
    assert list(counts.values()) == sorted(counts.values())
    assert counts["tiny"] < 3e6 and 1.0e9 <= counts["1b"] < 1.5e9 and counts["3b"] > 2.5e9
    small = DecoderShape(image_size=32, embed_dim=8, channels=16, channel_mult=(1, 2), attention_levels=(1,))
    ratio = forward_flops(dataclasses.replace(small, image_size=64)) / forward_flops(small)
    assert 4.0 <= ratio < 16.0  # convolutions scale with the pixels (4x), attention with their square


def test_config_sizes_and_validation():
    from pipeline.config import ConfigError, load_config

    cfg = load_config(None, ["decoder.size=base", "decoder.prediction=v"])
    assert cfg.decoder.channels == 192 and cfg.decoder.levels() == ((1, 2, 3, 4), (2, 3))
    for bad, key in (("decoder.size=huge", "decoder.size"), ("decoder.channel_mult=1,x", "decoder.channel_mult"),
                     ("decoder.attention_levels=3", "decoder.attention_levels"), ("decoder.image_drop=1.0",
                                                                                   "decoder.image_drop"),
                     ("decoder.zero_stage=5", "decoder.zero_stage"), ("decoder.prediction=x0", "decoder.prediction")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_a_tiny_decoder_learns_to_draw_the_colour_its_embedding_names():
    """Two flat colours, two embeddings: after a short training the decoder draws the colour each embedding names
    (v prediction: an undertrained ε model's x0 blows up at high noise, see DecoderConfig.prediction)."""
    shape = DecoderShape(image_size=8, embed_dim=4, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                         attention_levels=(1,), head_channels=16, context_dim=16, timesteps=100, prediction="v")
    torch.manual_seed(0)
    model = Decoder(shape)
    colours = torch.tensor([[0.9, -0.8, -0.8], [-0.8, -0.8, 0.9]])  # red, blue in [-1, 1]
    embs = torch.eye(4)[:2]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        which = torch.randint(0, 2, (16,), generator=g)
        pixels = colours[which][:, :, None, None].expand(16, 3, 8, 8)
        loss, _ = model.loss_parts(pixels, embs[which], image_drop=0.1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.sample(embs.repeat(4, 1), steps=20, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    mean = out.mean(dim=(2, 3)).view(4, 2, 3)
    assert (mean[:, 0, 0] > mean[:, 0, 2] + 0.5).all() and (mean[:, 1, 2] > mean[:, 1, 0] + 0.5).all(), mean
