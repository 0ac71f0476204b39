"""The capacity planner plans the model train-prior builds: the tokenizer's vocabulary, train-prior's own model
builder, DeepSpeed's estimator on that model; and it says which node types the autoscaler would launch."""

from __future__ import annotations

import os

import open_clip
import pytest
import torch

from pipeline import capacity
from pipeline.config import load_config
from pipeline.prior.objectives import build_objective, prior_shape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = ["prior.size=12b", "prior.text_len=256", "download.image_size=256", "prior.micro_batch_size=1",
         "prior.activation_checkpointing=true", "dvae.vocab_size=8192", "dvae.group_count=4"]


def test_the_planner_uses_the_tokenizer_tokenize_writes():
    cfg = load_config(None, PAPER)
    assert capacity.text_vocab(cfg) == open_clip.get_tokenizer("ViT-B-32").vocab_size == 49408
    assert capacity.token_meta(cfg)["grid"] == 32 and capacity.token_meta(cfg)["dvae"]["vocab_size"] == 8192


def test_zero3_figure_is_deepspeeds_on_the_model_train_prior_builds():
    """For 12b on 1,024 GPUs: the model from train-prior's builder (meta device) → DeepSpeed's own estimator. The
    text embedding (49,408 × 3,968) is the largest layer; model states come to about 1.0 GB per GPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = load_config(None, PAPER)
    meta = {"tokenizer": {"vocab_size": open_clip.get_tokenizer("ViT-B-32").vocab_size},
            "dvae": {"vocab_size": 8192}, "grid": 32, "embed_dim": 768}  # what tokenize would record
    with torch.device("meta"):
        model = build_objective(cfg, prior_shape(cfg, meta))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert largest >= 49408 * 3968
    _, per_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, 128, cpu_offload=False,
                                                          cpu_offload_params=False)
    plan = capacity.plan(cfg, samples=int(250e6), gpus=1024)
    assert plan["model"]["params"]["value"] == total
    assert plan["memory"]["zero3_gpu_bytes"]["value"] == per_gpu
    assert 0.9e9 < per_gpu < 1.1e9


def test_the_plan_names_the_node_types_each_stage_launches():
    cfg = load_config(os.path.join(REPO, "configs", "laion-cluster.yaml"))
    launches = capacity.plan(cfg, samples=1_000_000, gpus=16)["cluster"]["stages"]
    assert launches["download"]["launches"] == {"cpu_worker": 8}      # 256 shard tasks × {download: 1}
    assert launches["tokenize (encoders)"]["launches"] == {"gpu_worker": 1}
    assert launches["train-prior"]["workers"] == 16 and launches["train-prior"]["launches"] == {"gpu_worker": 2}
    big = load_config(os.path.join(REPO, "configs", "laion-cluster.yaml"), ["prior.gpus_per_worker=16"])
    refused = capacity.plan(big, samples=1000, gpus=16)["cluster"]["stages"]["train-prior"]["launches"]
    assert isinstance(refused, str) and "no node type offers it" in refused
    text = capacity.format_plan(capacity.plan(cfg, samples=1_000_000, gpus=16))
    assert "train-prior" in text and "2 × gpu_worker" in text


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_both_priors_are_planned_with_their_own_builder(kind):
    cfg = load_config(None, ["prior.size=350m", f"prior.kind={kind}"])
    total, largest = capacity.prior_params(cfg)
    assert 0 < largest < total
