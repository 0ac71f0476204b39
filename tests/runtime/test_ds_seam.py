import pytest

from pipeline.config import PriorConfig
from pipeline.runtime import ds_seam
from pipeline.storage.urls import Workspace


def test_ds_config_follows_typed_config():
    cfg = PriorConfig(zero_stage=3, micro_batch_size=4, steps=100, warmup_steps=10, precision="bf16", lr=3e-4)
    ds = ds_seam.build_ds_config(cfg, world_size=8, on_gpu=True)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["torch_adam"] is False
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    cpu = ds_seam.build_ds_config(PriorConfig(zero_stage=2), world_size=2, on_gpu=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("options, expect", [
    ({"zero_stage": 1}, {"zero_optimization.stage": 1}),
    ({"precision": "fp16"}, {"fp16.enabled": True, "fp16.loss_scale": 0, "bf16.enabled": False}),
    ({"precision": "fp32"}, {"bf16.enabled": False}),
    ({"gradient_accumulation_steps": 4, "micro_batch_size": 2},
     {"gradient_accumulation_steps": 4, "train_batch_size": 2 * 4 * 4}),
    ({"gradient_clipping": 0.5}, {"gradient_clipping": 0.5}),
    ({"weight_decay": 0.1}, {"optimizer.params.weight_decay": 0.1}),
    ({"zero_stage": 2, "offload_optimizer": "cpu"},
     {"zero_optimization.offload_optimizer.device": "cpu", "zero_optimization.offload_optimizer.pin_memory": True}),
    ({"zero_stage": 3, "offload_optimizer": "nvme", "offload_param": "nvme", "nvme_path": "/nvme"},
     {"zero_optimization.offload_optimizer.nvme_path": "/nvme", "zero_optimization.offload_param.device": "nvme"}),
    ({"lr_schedule": "cosine", "min_lr_ratio": 0.05, "warmup_steps": 7},
     {"scheduler.type": "WarmupCosineLR", "scheduler.params.cos_min_ratio": 0.05,
      "scheduler.params.warmup_num_steps": 7}),
    ({"lr_schedule": "linear", "lr": 1e-3, "min_lr_ratio": 0.1},
     {"scheduler.type": "WarmupDecayLR", "scheduler.params.warmup_min_lr": 1e-4,
      "scheduler.params.warmup_max_lr": 1e-3}),
    ({"lr_schedule": "constant", "lr": 2e-4}, {"scheduler.type": "WarmupLR", "scheduler.params.warmup_max_lr": 2e-4}),
])
def test_each_engine_option_lands_in_ds_config(options, expect):
    ds = ds_seam.build_ds_config(PriorConfig(**options), world_size=4, on_gpu=True)
    for dotted, value in expect.items():
        node = ds
        for part in dotted.split("."):
            node = node[part]
        assert node == pytest.approx(value), dotted
    if options.get("offload_optimizer", "none") != "none":  # offloaded steps use DeepSpeed's CPU Adam
        assert "torch_adam" not in ds["optimizer"]["params"]


def test_one_rank_without_offload_skips_zero_partitioning():
    assert ds_seam.build_ds_config(PriorConfig(zero_stage=3), 1, True)["zero_optimization"]["stage"] == 0
    off = ds_seam.build_ds_config(PriorConfig(zero_stage=2, offload_optimizer="cpu"), 1, True)
    assert off["zero_optimization"]["stage"] == 2  # offload needs ZeRO even on one rank


def test_offload_needs_a_matching_zero_stage():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="prior.offload_param"):
        PriorConfig(zero_stage=2, offload_param="cpu")
    with pytest.raises(ConfigError, match="prior.nvme_path"):
        PriorConfig(zero_stage=3, offload_optimizer="nvme")


def test_load_that_finds_nothing_raises(tmp_path):
    # A stand-in for the engine on purpose: what is under test is our refusal when DeepSpeed's load_checkpoint
    # returns (None, None) (it logs and returns that for a folder it cannot read) and when the world size differs
    # from the checkpoint's; a real engine would need 2 and 4 ranks. Real loads: tests/prior/test_prior_train.py.
    class Engine:
        world_size = 2

        def load_checkpoint(self, folder, tag):
            return None, None

    (tmp_path / "step1").mkdir()
    (tmp_path / "step1" / "complete.json").write_text('{"world_size": 2, "files": {}}')
    with pytest.raises(ds_seam.CheckpointError, match="found no checkpoint"):
        ds_seam.load_checkpoint(Engine(), Workspace(str(tmp_path)), "step1")
    Engine.world_size = 4
    with pytest.raises(ds_seam.CheckpointError, match="written by 2 ranks, resuming on 4"):
        ds_seam.load_checkpoint(Engine(), Workspace(str(tmp_path)), "step1")


def test_user_ds_config_json_really_overrides(tmp_path):
    import json

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
                                "optimizer": {"params": {"lr": 3e-4}}}))
    ds = ds_seam.build_ds_config(PriorConfig(zero_stage=3, ds_config=str(user)), world_size=2, on_gpu=True)
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["optimizer"]["type"] == "AdamW"  # untouched keys of a merged section stay
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: top level must be a JSON object"):
        ds_seam.build_ds_config(PriorConfig(ds_config=str(tmp_path / "bad.json")), world_size=2, on_gpu=False)
