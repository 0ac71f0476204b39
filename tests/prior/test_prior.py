import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.prior.transformer import DalleTransformer, PriorShape, attention_mask, drop_captions, pad_text

SHAPE = PriorShape(text_vocab=50, text_len=6, image_vocab=16, image_grid=3, n_layer=2, n_head=2, n_embd=16)
SPARSE = PriorShape(text_vocab=50, text_len=5, image_vocab=16, image_grid=4, n_layer=3, n_head=2, n_embd=16,
                    attention=("row", "column", "conv"), conv_kernel=3)


def test_pad_text_uses_per_position_pads():
    t = pad_text([[1, 2], list(range(10))], 6, 50)
    assert t[0].tolist() == [1, 2, 52, 53, 54, 55]
    assert t[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_kv_cache_sampling_equals_full_recompute():
    torch.manual_seed(0)
    model = DalleTransformer(SHAPE).eval()
    text = pad_text([[1, 2, 3], [4]], 6, 50)
    a = model.generate(text, top_k=4, generator=torch.Generator().manual_seed(1))
    b = model.generate_uncached(text, top_k=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 9)


def test_loss_learns_a_text_conditioned_mapping():
    torch.manual_seed(0)
    model = DalleTransformer(SHAPE)
    text = pad_text([[1], [2]] * 8, 6, 50)
    image = torch.tensor([[3] * 9, [7] * 9] * 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = float(model.loss(text, image, 0.125))
    for _ in range(60):
        loss = model.loss(text, image, 0.125)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first / 4
    model.eval()
    out = model.generate(pad_text([[1], [2]], 6, 50), top_k=1)
    assert out[0].tolist() == [3] * 9 and out[1].tolist() == [7] * 9


def test_activation_checkpointing_gives_same_gradients():
    for shape in (SHAPE, SPARSE):
        torch.manual_seed(0)
        a = DalleTransformer(shape)
        b = DalleTransformer(shape, activation_checkpointing=True)
        b.load_state_dict(a.state_dict())
        text = pad_text([[1, 2]], shape.text_len, 50)
        image = torch.randint(0, 16, (1, shape.image_len))
        a.loss(text, image).backward()
        b.loss(text, image).backward()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def _sharp(model: DalleTransformer) -> DalleTransformer:
    """An eval-mode model with peaked logits: at init they are near uniform, so samples would hardly depend on them
    and sampler tests could pass with wrong logits."""
    with torch.no_grad():
        model.image_head.weight.mul_(100)
        model.text_emb.weight.mul_(20)
    return model.eval()


def _allowed(kind: str, q: int, T: int, g: int, k: int) -> set[int]:
    """Reference pattern, written out position by position: which inputs sequence position q may read."""
    if q < T or kind == "dense":
        return set(range(q + 1))
    i = q - T
    keep = set(range(T))
    for j in range(i + 1):
        dr, dc = j // g - i // g, j % g - i % g
        if {"row": dr in (0, -1), "column": dc == 0, "conv": abs(dr) <= k // 2 and abs(dc) <= k // 2}[kind]:
            keep.add(T + j)
    return keep


@pytest.mark.parametrize("kind", ["dense", "row", "column", "conv"])
def test_sparse_layer_reads_exactly_its_pattern(kind):
    T, g, k = 3, 4, 3
    shape = PriorShape(text_vocab=20, text_len=T, image_vocab=8, image_grid=g, n_layer=1, n_head=2, n_embd=8,
                       attention=(kind,), conv_kernel=k)
    torch.manual_seed(0)
    model = DalleTransformer(shape).eval()
    L = shape.seq_len
    mask = attention_mask(kind, T, g, k)
    probe = torch.randn(8)
    for q in range(L):
        assert set(mask[q].nonzero().flatten().tolist()) == _allowed(kind, q, T, g, k), q
        x = torch.randn(1, L, 8, requires_grad=True)  # the input embeddings of the single layer
        h, _ = model._run(x)
        (h[0, q] * probe).sum().backward()  # a random readout: LayerNorm outputs always sum to 0
        reads = set((x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist())
        assert reads == _allowed(kind, q, T, g, k), (kind, q)  # exactly zero outside, nonzero inside


def test_row_and_conv_masks_are_sparse_on_the_image():
    full = attention_mask("dense", 4, 8).sum()
    for kind in ("row", "column", "conv"):
        assert attention_mask(kind, 4, 8, conv_kernel=3).sum() < full / 2, kind


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sparse_kv_cache_sampling_equals_full_recompute(guidance_scale):
    torch.manual_seed(0)
    model = _sharp(DalleTransformer(SPARSE))
    text = pad_text([[1, 2, 3], [4], []], 5, 50)
    a = model.generate(text, top_k=5, generator=torch.Generator().manual_seed(1), guidance_scale=guidance_scale)
    b = model.generate_uncached(text, top_k=5, generator=torch.Generator().manual_seed(1),
                                guidance_scale=guidance_scale)
    assert torch.equal(a, b) and a.shape == (3, 16)


def test_guidance_scale_one_is_plain_sampling_and_zero_is_unconditional():
    torch.manual_seed(0)
    model = _sharp(DalleTransformer(SPARSE))
    text = pad_text([[1, 2, 3], [4]], 5, 50)
    plain = model.generate(text, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(text, generator=torch.Generator().manual_seed(2), guidance_scale=1.0), plain)
    # scale 0 samples from the empty-caption logits alone
    uncond = model.generate(text, generator=torch.Generator().manual_seed(2), guidance_scale=0.0)
    empty = model.generate(pad_text([[], []], 5, 50), generator=torch.Generator().manual_seed(2))
    assert torch.equal(uncond, empty) and not torch.equal(uncond, plain)
    assert not torch.equal(model.generate(text, generator=torch.Generator().manual_seed(2), guidance_scale=3.0), plain)


def test_loss_parts_split_text_and_image():
    torch.manual_seed(0)
    model = DalleTransformer(SPARSE)
    text = pad_text([[1, 2], [3]], 5, 50)
    image = torch.randint(0, 16, (2, 16))
    total, image_loss, text_loss = model.loss_parts(text, image, 0.125)
    image_logits, text_logits = model(text, image)
    assert torch.allclose(image_loss, F.cross_entropy(image_logits.reshape(-1, 16), image.reshape(-1)))
    assert torch.allclose(text_loss, F.cross_entropy(text_logits.reshape(-1, 55), text[:, 1:].reshape(-1)))
    assert torch.allclose(total, 0.875 * image_loss + 0.125 * text_loss)
    assert torch.allclose(model.loss(text, image, 0.125), total)
    total0, image0, text0 = model.loss_parts(text, image)
    assert text0 is None and torch.equal(total0, image0) and torch.allclose(image0, image_loss)
    with pytest.raises(ValueError, match="text_loss_weight"):
        model.loss_parts(text, image, 1.0)


def test_drop_captions():
    text = pad_text([[1, 2, 3]] * 4000, 5, 50)
    assert drop_captions(text, 0.0, 50, torch.Generator().manual_seed(0)) is text
    a = drop_captions(text, 0.3, 50, torch.Generator().manual_seed(0))
    assert torch.equal(a, drop_captions(text, 0.3, 50, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, drop_captions(text, 0.3, 50, torch.Generator().manual_seed(1)))
    assert torch.equal(text, pad_text([[1, 2, 3]] * 4000, 5, 50))  # input untouched
    dropped = (a != text).any(dim=1)
    assert torch.equal(a[dropped], pad_text([[]], 5, 50).expand(int(dropped.sum()), 5))
    assert torch.equal(a[~dropped], text[~dropped])
    assert abs(dropped.float().mean().item() - 0.3) < 0.03


def test_shape_validation_names_the_field():
    base = dataclasses.asdict(SHAPE)
    with pytest.raises(ValueError, match="attention"):
        PriorShape(**{**base, "attention": ("row",)})  # 1 kind for 2 layers
    with pytest.raises(ValueError, match="attention"):
        PriorShape(**{**base, "attention": ("row", "diagonal")})
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match="conv_kernel"):
            PriorShape(**{**base, "conv_kernel": bad})


def test_old_shape_dicts_load_and_sparse_models_keep_state_dict_keys():
    old = {k: v for k, v in dataclasses.asdict(SHAPE).items() if k not in ("attention", "conv_kernel")}
    assert PriorShape(**old) == SHAPE and SHAPE.layer_kinds == ("dense", "dense")
    as_list = {**dataclasses.asdict(SPARSE), "attention": list(SPARSE.attention)}  # e.g. after a JSON round trip
    assert PriorShape(**as_list) == SPARSE and PriorShape(**dataclasses.asdict(SPARSE)) == SPARSE
    dense = DalleTransformer(dataclasses.replace(SPARSE, attention=()))
    sparse = DalleTransformer(SPARSE)
    sparse(pad_text([[1]], 5, 50), torch.zeros(1, 16, dtype=torch.long))  # builds the cached masks
    assert list(dense.state_dict()) == list(sparse.state_dict())
    sparse.load_state_dict(dense.state_dict(), strict=True)


def test_guidance_moves_the_logits_away_from_the_unconditional_ones():
    """Classifier-free guidance is uncond + s·(cond − uncond): s > 1 strengthens what the caption adds. Checked on
    the formula and on what it does: a token the caption favours gains probability beyond the conditional model's."""
    from pipeline.prior.transformer import _guide

    cond = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    uncond = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    logits = torch.cat([cond, uncond]).to(torch.bfloat16)
    guided = _guide(logits, 2, 3.0)
    assert guided.dtype == torch.float32 and guided.shape == (2, 3)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond))
    assert torch.equal(_guide(logits, 2, 1.0), logits)  # scale 1: the conditional logits untouched
    assert torch.allclose(_guide(logits, 2, 0.0), uncond)
    p_cond, p_guided = cond.softmax(-1), guided.softmax(-1)
    assert p_guided[0, 0] > p_cond[0, 0] and p_guided[1, 2] > p_cond[1, 2]


def test_top_p_keeps_the_smallest_nucleus_and_rejects_zero():
    from pipeline.prior.transformer import _sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(_sample(logits, 1.0, 0, g, top_p=0.75)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75: tokens 2 and 3 are never drawn
    assert {int(_sample(logits, 1.0, 0, g, top_p=0.4)) for _ in range(50)} == {0}  # the top token always stays
    with pytest.raises(ValueError, match="top_p"):
        _sample(logits, 1.0, 0, g, top_p=0.0)
