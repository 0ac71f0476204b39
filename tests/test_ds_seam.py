import pytest

from pipeline import ds_seam
from pipeline.config import PriorConfig


def test_ds_config_follows_typed_config():
    cfg = PriorConfig(zero_stage=3, micro_batch_size=4, steps=100, warmup_steps=10, bf16=True, lr=3e-4)
    ds = ds_seam.build_ds_config(cfg, world_size=8, on_gpu=True)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["torch_adam"] is False
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    cpu = ds_seam.build_ds_config(PriorConfig(zero_stage=2), world_size=2, on_gpu=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["zero_optimization"] == {"stage": 2}


def test_latest_complete_requires_completion_record(tmp_path):
    assert ds_seam.latest_complete(str(tmp_path)) is None
    (tmp_path / "step00000010").mkdir()
    (tmp_path / "latest_complete").write_text("step00000010")
    with pytest.raises(ds_seam.CheckpointError, match="has no complete.json"):
        ds_seam.latest_complete(str(tmp_path))
    (tmp_path / "step00000010" / "complete.json").write_text("{}")
    assert ds_seam.latest_complete(str(tmp_path)) == "step00000010"


def test_load_that_finds_nothing_raises():
    class Engine:
        def load_checkpoint(self, folder, tag):
            return None, None

    with pytest.raises(ds_seam.CheckpointError, match="found no checkpoint"):
        ds_seam.load_checkpoint(Engine(), "/x", "step1")
