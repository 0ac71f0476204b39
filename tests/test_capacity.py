import pytest

from pipeline import capacity as planmod
from pipeline.config import load_config


@pytest.fixture(scope="module")
def small_cfg():
    return load_config(None, ["prior.size=350m", "download.image_size=256", "prior.text_len=64"])


@pytest.fixture(scope="module")
def small_plan(small_cfg):
    return planmod.plan(small_cfg, samples=1_000_000, gpus=16)


@pytest.fixture(scope="module")
def example():
    return planmod.worked_example()


def test_zero3_matches_deepspeed(small_plan):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total = small_plan["model"]["params"]["value"]
    largest = small_plan["model"]["largest_layer_params"]["value"]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, 2, cpu_offload=False,
                                                      cpu_offload_params=False)
    assert small_plan["memory"]["zero3_gpu_bytes"]["value"] == gpu
    assert small_plan["memory"]["zero3_gpu_bytes"]["basis"] == "measured"


def test_token_bytes_per_row_sane_and_grows_with_grid():
    small = planmod.token_bytes_per_row(grid=8, text_len=16)
    full = planmod.token_bytes_per_row(grid=32, text_len=16)
    assert 2 * 768 * 2 * 0.5 < small < full  # at least the (poorly compressible) fp16 embeddings
    assert 3000 < full < 10000               # 1024 uint16 tokens + 2×768 fp16 + strings, zstd


def test_12b_params():
    cfg = load_config(None, ["prior.size=12b", "prior.text_len=256"])
    total, largest = planmod.prior_params(cfg)
    assert total == pytest.approx(12.2e9, rel=0.01)
    assert 0 < largest < total


def test_hours_scale_linearly(small_cfg, small_plan):
    double = planmod.plan(small_cfg, samples=2_000_000, gpus=16)
    for stage in ("download", "tokenize", "train"):
        assert double["stages"][stage]["hours"]["value"] == pytest.approx(
            2 * small_plan["stages"][stage]["hours"]["value"])
        assert double["stages"][stage]["storage_bytes"]["value"] >= small_plan["stages"][stage]["storage_bytes"][
            "value"]


def test_assumed_defaults_without_results(small_cfg, tmp_path):
    p = planmod.plan(small_cfg, samples=1000, gpus=8, results_dir=tmp_path)
    assert all(v["basis"] == "assumed" for v in p["rates"].values())
    given = planmod.plan(small_cfg, samples=1000, gpus=8, results_dir=tmp_path, rates={"mfu": 0.5})
    assert given["rates"]["mfu"]["basis"] == "given"
    assert given["stages"]["train"]["hours"]["value"] == pytest.approx(
        p["stages"]["train"]["hours"]["value"] * 0.45 / 0.5)


def test_format_mentions_basis(small_plan):
    text = planmod.format_plan(small_plan)
    assert "measured" in text and "assumed" in text
    for stage in ("download", "tokenize", "train"):
        assert stage in text


def test_worked_example(example):
    assert example["samples"] == 250_000_000 and example["gpus"] == 1024 and example["gpu_mem_gb"] == 80.0
    # 12.2 B with DALL-E's 16,384 text ids; the 49,408 CLIP BPE ids train-prior embeds add 0.13 B
    assert example["model"]["params"]["value"] == pytest.approx(12.36e9, rel=0.005)
    assert example["model"]["text_vocab"] == 49408
    assert example["example"]["basis"] == "assumed"
    for stage in ("download", "tokenize", "train"):
        for key in ("storage_bytes", "hours", "gpus"):
            assert example["stages"][stage][key]["basis"] in ("measured", "assumed", "given")
    assert example["memory"]["fits"] is True
    assert example["stages"]["train"]["storage_bytes"]["value"] == 16 * example["model"]["params"]["value"]
    assert "Worked example" in planmod.format_plan(example)


def test_gpus_needed_is_the_fewest_that_fit(example):
    """The fewest GPUs on which DeepSpeed's ZeRO-3 estimate plus activations fit: that many fit, one fewer not."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total = example["model"]["params"]["value"]
    largest = example["model"]["largest_layer_params"]["value"]
    act = example["memory"]["activation_bytes"]["value"]

    def need(gpus: int) -> float:  # straight from DeepSpeed, whole nodes of 8 past the first node
        per_node = min(gpus, 8)
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, -(-gpus // per_node),
                                                          cpu_offload=False, cpu_offload_params=False)
        return gpu + act

    n = example["memory"]["gpus_needed"]["value"]
    assert need(n) <= 80e9 < need(n - 1)
    assert 2 <= n <= 8  # 12.2 B params x ~16-18 B of states do not fit one 80 GB GPU, and fit one node
    small = planmod.gpus_needed(total, largest, act, 16.0, 8)  # 16 GB GPUs: more than one node of 8
    assert small > 8 and small % 8 == 0 and need(small) <= 16e9 < need(small - 8)  # whole nodes
    assert planmod.gpus_needed(total, largest, int(100e9), 80.0, 8) is None  # activations alone exceed a GPU
    assert "GPUs needed to fit:" in planmod.format_plan(example)


def test_a_computed_download_ceiling_is_never_called_measured(tmp_path):
    """The download benchmark's cpu_limit_images_per_s is computed from per-image CPU work; the planner may call a
    rate measured only when it comes from timed runs (ours' whole-command images/s over the benchmark's pairs)."""
    import json

    machine = {"cpu_limit_cores": 2, "cpu": "test cpu"}
    (tmp_path / "download.json").write_text(json.dumps({"machine": machine, "cases": {"web": {
        "cpu_limit_images_per_s": 244.0, "http": {"pairs": []}}}}))
    rate = planmod.resolve_rates({"cores_per_node": 4}, tmp_path)["download_images_per_s_per_node"]
    assert rate["basis"] == "assumed" and "computed, not measured" in rate["note"]
    pairs = [{"ours": {"wall_images_per_s": v}} for v in (200.0, 230.0, 210.0)]
    (tmp_path / "download.json").write_text(json.dumps({"machine": machine, "cases": {"web": {
        "cpu_limit_images_per_s": 244.0, "http": {"pairs": pairs}, "https": {"pairs": pairs[:1]}}}}))
    rate = planmod.resolve_rates({"cores_per_node": 4}, tmp_path)["download_images_per_s_per_node"]
    assert rate["basis"] == "measured" and rate["value"] == pytest.approx(200.0 / 2 * 4)  # https: the slower
