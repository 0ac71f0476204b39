import numpy as np
import pytest
import torch

from pipeline.dvae.model import DVAE, DVAEShape, load_dvae, save_dvae, temperature_at
from pipeline.dvae.train import ShardStream, choose_heldout


def test_shapes_and_grid():
    shape = DVAEShape(vocab_size=64, n_hid=8, group_count=3, n_blk_per_group=1)
    model = DVAE(shape)
    x = torch.rand(2, 3, 32, 32)
    assert model.encoder(x).shape == (2, 64, 8, 8)
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8) and codes.max() < 64
    assert model.decode(codes).shape == (2, 3, 32, 32)
    assert shape.grid(256) == 64 and DVAEShape().grid(256) == 32  # DALL-E full size: 256 px → 32x32 of 8192


def test_temperature_anneals_to_end():
    assert temperature_at(0, 100, 1.0, 1 / 16) == 1.0
    assert temperature_at(99, 100, 1.0, 1 / 16) == pytest.approx(1 / 16)


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"weights": torch.ones(1)}, str(p))  # a safetensors file, but not one of ours: no config beside it
    with pytest.raises(ValueError, match=f"no {tmp_path / 'x.json'} beside it"):
        load_dvae(str(p))
    save_dvae(DVAE(DVAEShape(vocab_size=8, n_hid=4, group_count=1, n_blk_per_group=1)), str(p))
    assert load_dvae(str(p)).shape.vocab_size == 8


def _stream_rows(counts, heldout):
    held = set(heldout)
    return {s: np.array([r for r in range(n) if (s, r) not in held], dtype=np.int64) for s, n in counts.items()}


def test_heldout_is_seeded_capped_and_drawn_from_the_first_shards():
    counts = {0: 30, 1: 30, 2: 30, 3: 30}
    held = choose_heldout(counts, 10, seed=0)
    assert held == choose_heldout(counts, 10, seed=0) and held != choose_heldout(counts, 10, seed=1)
    assert len(held) == len(set(held)) == 10 and {s for s, _ in held} <= {0, 1}
    assert len(choose_heldout(counts, 64, seed=0)) == 24  # at most a fifth of the 120 images
    assert choose_heldout(counts, 0, seed=0) == []


@pytest.mark.parametrize("counts,world", [({0: 10, 1: 7, 2: 12, 3: 5, 4: 9}, 2), ({0: 10, 1: 7}, 3),
                                          ({0: 13}, 1)])
def test_shard_stream_is_a_pure_function_covering_each_epoch_once(counts, world):
    heldout = choose_heldout(counts, 3, seed=5)
    rows = _stream_rows(counts, heldout)
    train = {(s, int(r)) for s, rr in rows.items() for r in rr}
    streams = [ShardStream(rows, seed=5, rank=r, world=world, window=2) for r in range(world)]
    epoch0 = [st.epoch_order(0) for st in streams]
    seen = [tuple(x) for order in epoch0 for x in order.tolist()]
    assert sorted(seen) == sorted(train) and not set(seen) & set(heldout)  # every training row once per epoch
    if len(counts) >= world:  # ranks read disjoint shards within an epoch
        shard_sets = [set(order[:, 0].tolist()) for order in epoch0]
        assert all(not a & b for i, a in enumerate(shard_sets) for b in shard_sets[i + 1:])
    for r, st in enumerate(streams):  # a fresh stream (a resumed rank) gives the same rows for any step
        fresh = ShardStream(rows, seed=5, rank=r, world=world, window=2)
        for step in (37, 0, 5, 36):
            assert np.array_equal(fresh.step_rows(step, 4), st.step_rows(step, 4))
        assert not np.array_equal(st.epoch_order(1), st.epoch_order(2)) or len(st.epoch_order(1)) < 2


def test_shard_stream_runs_on_across_epochs():
    rows = {0: np.arange(5), 1: np.arange(4)}
    st = ShardStream(rows, seed=0, rank=0, world=1, window=1)
    a, b = st.epoch_order(0), st.epoch_order(1)
    assert np.array_equal(st.take(7, 4), np.concatenate([a[7:], b[:2]]))
    # each window of one shard is one shard's rows, shuffled: a rank reads one shard at a time
    assert len(set(a[:5, 0].tolist())) == 1 or len(set(a[:4, 0].tolist())) == 1


def test_evaluate_figures_match_the_codes_the_model_gives():
    """The eval figures recomputed from the model's own codes and reconstructions: a histogram, MSE or perplexity
    bug shows here (codes_used + dead_codes = vocab alone holds whatever ``used`` is)."""
    from pipeline.dvae.eval import evaluate, psnr

    torch.manual_seed(0)
    model = DVAE(DVAEShape(vocab_size=16, n_hid=8, group_count=2, n_blk_per_group=1))
    images = torch.rand(5, 3, 16, 16)
    figures, rec = evaluate(model, images, batch=2)  # batches of 2: the figures must not depend on the batching
    codes = model.encode(images)
    want = model.decode(codes).float().clamp(0, 1)
    assert torch.allclose(rec, want, atol=1e-6)
    mse = float(torch.mean((want - images) ** 2))
    assert figures["heldout_mse"] == pytest.approx(mse, rel=1e-5)
    assert figures["heldout_psnr"] == pytest.approx(psnr(mse))
    _, counts = np.unique(codes.numpy(), return_counts=True)
    p = counts / counts.sum()
    assert figures["codes_used"] == len(counts) and figures["dead_codes"] == 16 - len(counts)
    assert figures["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    assert figures["constant_baseline_mse"] == pytest.approx(float(((images - images.mean(0)) ** 2).mean()), rel=1e-5)
