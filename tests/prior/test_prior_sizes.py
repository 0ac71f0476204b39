"""Named prior sizes have the parameter counts their names promise (built on the meta device: no memory used)."""

import pytest
import torch

from pipeline.config import PRIOR_SIZES, ConfigError, load_config
from pipeline.prior.transformer import DalleTransformer, PriorShape

NOMINAL = {"350m": 0.35e9, "1.3b": 1.3e9, "4b": 4.0e9, "12b": 12.0e9}


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_named_sizes_count_their_parameters(name):
    cfg = load_config(None, [f"prior.size={name}"]).prior
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == PRIOR_SIZES[name]
    shape = PriorShape(text_vocab=16384, text_len=256, image_vocab=8192, image_grid=32,  # DALL-E's vocabularies
                       n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    with torch.device("meta"):
        model = DalleTransformer(shape)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - NOMINAL[name]) / NOMINAL[name] < 0.06, f"{name}: {count / 1e9:.3f} B parameters"


def test_paper_12b_shape_and_unknown_size():
    assert PRIOR_SIZES["12b"] == (64, 62, 3968) and 3968 // 62 == 64
    with pytest.raises(ConfigError, match="prior.size"):
        load_config(None, ["prior.size=7b"])
