import numpy as np
import pytest
import torch

from pipeline.config import DVAEConfig
from pipeline.data import synth
from pipeline.dvae import DVAE, DVAEShape, load_dvae, save_dvae, temperature_at
from pipeline.train_dvae import train_dvae


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


def test_training_reduces_loss_and_roundtrips(tmp_path):
    samples, _ = synth.make_samples(64, 0.1, seed=0)
    images = np.stack([np.asarray(synth.render(s, 16)) for s in samples])
    cfg = DVAEConfig(vocab_size=32, n_hid=8, group_count=2, steps=150, batch_size=16, lr=3e-3)
    result = train_dvae(cfg, images, str(tmp_path), seed=0)
    import json

    hist = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert np.mean([h["loss"] for h in hist[-10:]]) < 0.8 * np.mean([h["loss"] for h in hist[:5]])
    assert result["grid"] == 8 and np.isfinite(result["hard_recon_mse"])
    model = load_dvae(str(tmp_path / "dvae.pt"))
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(model.encode(x), model.encode(x))


def test_load_rejects_foreign_file(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"weights": 1}, p)
    with pytest.raises(ValueError, match="not a dVAE checkpoint"):
        load_dvae(str(p))
    save_dvae(DVAE(DVAEShape(vocab_size=8, n_hid=4, group_count=1, n_blk_per_group=1)), str(p))
    assert load_dvae(str(p)).shape.vocab_size == 8
