"""DALL-E 2 diffusion prior: schedule, masking, dropout, samplers, guidance, candidates, EMA, sizes, learning."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.prior import PRIOR_SIZES
from pipeline.prior.checkpoints import load_prior, save_prior
from pipeline.prior.diffusion import (
    EMA,
    DiffusionPrior,
    DiffusionShape,
    cosine_betas,
    empty_caption,
    scaled,
)
from pipeline.prior.transformer import pad_text

SHAPE = DiffusionShape(text_vocab=20, text_len=5, embed_dim=8, n_layer=2, n_head=2, n_embd=16, timesteps=50)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add sync overhead, which explodes on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, shape: DiffusionShape = SHAPE, **kw) -> DiffusionPrior:
    torch.manual_seed(seed)
    return DiffusionPrior(shape, **kw)


def _batch(B: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = pad_text([torch.randint(0, 20, (i % 4 + 1,), generator=g).tolist() for i in range(B)], 5, 20)
    return text, torch.randn(B, 8, generator=g), torch.randn(B, 8, generator=g)


def test_cosine_betas():
    betas = cosine_betas(1000)
    acp = torch.cumprod(1 - betas, 0)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert float(betas.max()) <= 0.999 and float(betas.min()) > 0
    assert bool((acp[1:] < acp[:-1]).all()) and 0 < float(acp[-1]) < 1e-4 and float(acp[0]) <= 1
    assert 1 - float(acp[0]) < 1e-3  # the first step barely adds noise


def test_shape_validation_and_round_trip():
    assert DiffusionShape(**dataclasses.asdict(SHAPE)) == SHAPE
    bads = [({"text_vocab": 0}, "text_vocab"), ({"n_embd": 10, "n_head": 4}, "n_embd"), ({"dropout": 1.0}, "dropout"),
            ({"timesteps": 0}, "timesteps"), ({"embed_dim": -1}, "embed_dim")]
    for bad, field in bads:
        with pytest.raises(ValueError, match=f"DiffusionShape.{field}"):
            dataclasses.replace(SHAPE, **bad)


def test_forward_shapes_and_causality():
    model = _model().eval()
    text, te, ie = _batch()
    t = torch.tensor([0, 10, 25, 49])
    assert model(text, te, ie, t).shape == (4, 8)
    h = model.hidden_states(text, te, ie, t)
    assert h.shape == (4, SHAPE.text_len + 4, 16)
    T = SHAPE.text_len
    # Changing the noised embedding (slot T+2) leaves every earlier slot alone and changes the query's output.
    h2 = model.hidden_states(text, te, ie + 1, t)
    assert torch.equal(h[:, : T + 2], h2[:, : T + 2]) and not torch.allclose(h[:, -1], h2[:, -1])
    h3 = model.hidden_states(text, te, ie, t + 1)  # timestep slot T+1
    assert torch.equal(h[:, : T + 1], h3[:, : T + 1]) and not torch.allclose(h[:, -1], h3[:, -1])
    h4 = model.hidden_states(text, te * 2 + 1, ie, t)  # text embedding slot T
    assert torch.equal(h[:, :T], h4[:, :T]) and not torch.allclose(h[:, -1], h4[:, -1])
    text2 = text.clone()
    text2[:, 0] = (text2[:, 0] + 1) % 20  # the first caption token reaches the query
    assert not torch.allclose(model(text, te, ie, t), model(text2, te, ie, t))


def test_drop_uses_null_embedding_and_empty_caption():
    model = _model().eval()
    text, te, ie = _batch()
    t = torch.full((4,), 7)
    drop = torch.tensor([True, False, True, False])
    a = model(text, te, ie, t, drop)
    b = model(torch.randint(0, 20, (4, 5)), torch.randn(4, 8), ie, t, drop)
    assert torch.allclose(a[drop], b[drop], atol=1e-6) and not torch.allclose(a[~drop], b[~drop])
    null = model.null_text_emb.expand(4, -1)
    ref = model(empty_caption(4, 5, 20), null, ie, t)
    assert torch.allclose(a[drop], ref[drop], atol=1e-6)


def test_loss_parts_deterministic_masked_and_leaves_global_rng():
    model = _model()
    text, te, ie = _batch(6)
    valid = torch.tensor([True, False, True, True, False, True])
    state = torch.get_rng_state()
    l1, s1 = model.loss_parts(text, te.half(), ie * 3, valid, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())
    te2, ie2, text2 = te.clone(), ie.clone(), text.clone()
    te2[1], ie2[4], text2[4] = float("nan"), 100.0, -5  # junk in invalid rows changes nothing
    l2, s2 = model.loss_parts(text2, te2.half(), ie2 * 3, valid, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(l1, l2) and s1 == s2 and s1["valid"] == 4.0 and -1 <= s1["cos"] <= 1
    l2.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    l3, _ = model.loss_parts(text, te, ie * 3, valid, 0.5, torch.Generator().manual_seed(4))
    assert not torch.equal(l1, l3)


def test_loss_parts_all_invalid_is_zero_with_backward():
    model = _model()
    text, te, ie = _batch()
    loss, stats = model.loss_parts(text, te, ie, torch.zeros(4, dtype=torch.bool), generator=torch.Generator())
    loss.backward()
    assert float(loss) == 0.0 and stats["valid"] == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_activation_checkpointing_matches():
    text, te, ie = _batch()
    losses = []
    for ckpt in (False, True):
        model = _model(shape=dataclasses.replace(SHAPE, dropout=0.0), activation_checkpointing=ckpt).train()
        loss, _ = model.loss_parts(text, te, ie, generator=torch.Generator().manual_seed(0))
        loss.backward()
        losses.append((loss.detach(), model.blocks[0].qkv.weight.grad.clone()))
    assert torch.allclose(losses[0][0], losses[1][0]) and torch.allclose(losses[0][1], losses[1][1], atol=1e-6)


def test_ddim_eta0_deterministic_and_ddpm_matches_ddim_eta1():
    model = _model()
    text, te, _ = _batch()
    run = lambda seed, steps=8, **kw: model.sample(text, te, steps, generator=torch.Generator().manual_seed(seed), **kw)
    a = run(0)
    assert torch.equal(a, run(0)) and not torch.allclose(a, run(1))
    assert torch.allclose(a.norm(dim=-1), torch.ones(4), atol=1e-5) and model.training  # flag restored
    # The DDPM posterior of the respaced chain is DDIM with eta=1, given the same noise draws.
    assert torch.allclose(run(2, sampler="ddpm"), run(2, sampler="ddim", eta=1.0), atol=1e-4)
    assert run(2, steps=1).shape == (4, 8)  # a single step: the x0 prediction from pure noise


def test_guidance_scale_one_is_plain_and_guided_formula():
    model = _model().eval()
    text, te, ie = _batch()
    t = torch.full((4,), 20)
    cond = scaled(te)
    assert torch.equal(model._guided_x0(text, cond, ie, t, 1.0), model(text, cond, ie, t))
    c = model(text, cond, ie, t)
    u = model(text, cond, ie, t, torch.ones(4, dtype=torch.bool))
    assert torch.allclose(model._guided_x0(text, cond, ie, t, 3.0), u + 3.0 * (c - u), atol=1e-5)
    g = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(model.sample(text, te, 6, generator=g()), model.sample(text, te, 6, guidance_scale=1.0,
                                                                              generator=g()))
    assert not torch.allclose(model.sample(text, te, 6, generator=g()), model.sample(text, te, 6, guidance_scale=4.0,
                                                                                     generator=g()))


def test_candidates_pick_max_cosine():
    model = _model()
    text, te, _ = _batch(3)
    k = 5
    g = lambda: torch.Generator().manual_seed(9)
    # The candidate path samples the k-times repeated batch with the same draws, then keeps the best per row.
    all_k = model.sample(text.repeat_interleave(k, 0), te.repeat_interleave(k, 0), 6, "ddpm", generator=g())
    picked = model.sample(text, te, 6, "ddpm", candidates=k, generator=g())
    cos = (all_k.view(3, k, 8) * F.normalize(te, dim=-1)[:, None]).sum(-1)
    expected = all_k.view(3, k, 8)[torch.arange(3), cos.argmax(1)]
    assert torch.allclose(picked, expected) and picked.shape == (3, 8)
    assert bool(((picked * F.normalize(te, dim=-1)).sum(-1)[:, None] >= cos - 1e-6).all())


def test_ema_formula_buffers_and_state_dict():
    model = _model()
    ema = EMA(model, decay=0.9)
    assert list(ema.module.parameters()) == [] and len(list(ema.module.buffers())) == len(list(model.parameters())) + 1
    manual = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        manual = {k: d * v + (1 - d) * dict(model.named_parameters())[k].detach() for k, v in manual.items()}
    assert int(ema.module.num_updates) == 3
    sd = ema.state_dict_for(model)
    for k, v in manual.items():
        assert torch.allclose(sd[k], v, atol=1e-6) and torch.equal(getattr(ema.module, k.replace(".", "__")), sd[k])
    model.ema = ema.module  # attached so an engine saves it: still no parameters, and not in state_dict_for
    assert len(list(model.parameters())) == len(manual) and any(k.startswith("ema.") for k in model.state_dict())
    fresh = _model(seed=1)
    fresh.load_state_dict(ema.state_dict_for(model), strict=True)
    ema.copy_to(model)
    assert torch.equal(model.out_proj.weight, fresh.out_proj.weight)


def test_save_load_round_trip(tmp_path):
    model = _model()
    path = str(tmp_path / "diffusion.safetensors")
    save_prior(path, "diffusion", dataclasses.asdict(SHAPE), model.state_dict(), {"vocab": "bpe"}, steps=1)
    loaded, meta = load_prior(path, "diffusion")
    assert meta == {"vocab": "bpe"} and not loaded.training and loaded.shape == SHAPE
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    save_prior(path, "ar", {}, {}, {}, steps=1)
    with pytest.raises(ValueError, match="not a diffusion prior"):
        load_prior(path, "diffusion")


@pytest.mark.parametrize("size,low,high", [("tiny", 5e6, 1e7), ("1.3b", 1.0e9, 1.5e9)])
def test_param_counts(size, low, high):
    n_layer, n_head, n_embd = PRIOR_SIZES[size]
    shape = DiffusionShape(text_vocab=49408, text_len=77, embed_dim=768, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    with torch.device("meta"):
        model = DiffusionPrior(shape)
    count = sum(p.numel() for p in model.parameters())
    assert low <= count <= high, f"{size}: {count / 1e9:.3f} B"


def test_learns_a_linear_map():
    """image_emb = W · text_emb (D=16): sampled embeddings beat the text embedding itself as a guess."""
    D, g = 16, torch.Generator().manual_seed(0)
    W = torch.randn(D, D, generator=g)
    shape = DiffusionShape(text_vocab=10, text_len=4, embed_dim=D, n_layer=2, n_head=2, n_embd=32)
    model = _model(shape=shape)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = empty_caption(64, 4, 10)
    for step in range(200):
        te = torch.randn(64, D, generator=g)
        loss, _ = model.loss_parts(text, te, te @ W.T, cond_drop=0.1, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    te = torch.randn(256, D, generator=torch.Generator().manual_seed(123))
    target = F.normalize(te @ W.T, dim=-1)
    out = model.eval().sample(empty_caption(256, 4, 10), te, steps=16, generator=torch.Generator().manual_seed(0))
    learned = float((out * target).sum(-1).mean())
    baseline = float((F.normalize(te, dim=-1) * target).sum(-1).mean())
    assert learned > 0.9 and learned > baseline + 0.5, (learned, baseline)
    assert not math.isnan(learned)
