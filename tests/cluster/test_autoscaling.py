"""GPUs arrive by autoscaling and the head computes nothing (``autoscaling.AutoscalingCluster``: Ray's fake provider,
node types like cluster/config.yaml's in miniature, every worker type at zero nodes to begin with).

Each stage is a Ray job that asks for its hardware from its config; the tests read where each piece of work ran
from Ray's state API (a node's type shows in its resources), which node types the autoscaler launched and when, and
the job driver's CPU seconds against the whole cluster's."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from autoscaling import AutoscalingCluster, CpuMeter, wait_job

from pipeline.demo import synth
from pipeline.demo.server import ImageServer
from pipeline.storage import schema

pytestmark = pytest.mark.slow
RUN = "s3://laion/autoscale/run"
TYPES = {"cpu_worker": {"resources": {"CPU": 1, "download": 1}, "max_workers": 2},
         "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}}
COMMON = [f"run_dir={RUN}", "download.shard_size=30", "download.resources={download: 1}",
          "download.allow_private_addresses=true", "tokenize.batch_size=16", "clip.steps=2"]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    # The nodes' credentials come from their environment (the standard AWS chain; moto accepts any key): the
    # fixture's credentials file is under this machine's /tmp, which the cluster's namespace does not see.
    c = AutoscalingCluster(str(tmp_path_factory.mktemp("autoscale")), TYPES,
                           env={"AWS_ACCESS_KEY_ID": "autoscale-test", "AWS_SECRET_ACCESS_KEY": "autoscale-test"})
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def served(tiny_samples):
    samples, _ = tiny_samples
    with ImageServer({i: synth.render_png(s, 32) for i, s in enumerate(samples)}) as server:
        yield server, samples


def _where(cluster, kind: str, name: str) -> list[str]:
    """The node types that ran tasks (``kind=task``) or actors whose name contains ``name``."""
    from ray.util.state import list_actors, list_tasks

    if kind == "task":
        rows = [t for t in list_tasks(cluster.dashboard, limit=10000, detail=True) if name in (t.name or "")]
    else:
        rows = [a for a in list_actors(cluster.dashboard, limit=10000, detail=True) if name in (a.class_name or "")]
    return sorted({cluster.node_type(r.node_id) for r in rows if r.node_id})


def _run(cluster, stage: str, overrides: list[str], timeout: float = 600) -> tuple[str, dict, float]:
    meter = CpuMeter(cluster, f"jobs/{stage}.py")
    t = time.time()
    job = cluster.submit(stage, [*COMMON, *overrides])
    status = wait_job(cluster, job, timeout, meter)
    logs = cluster.client().get_job_logs(job)
    assert status == "SUCCEEDED", f"{stage}: {status}\n{logs[-5000:]}"
    return logs, meter.figures(), round(time.time() - t, 1)


def test_each_stage_asks_for_its_hardware_and_the_autoscaler_brings_it(cluster, served, s3, tmp_path):
    server, samples = served
    assert [cluster.node_type(n.node_id) for n in cluster.nodes()] == ["head"]  # every worker type starts at zero
    with s3.open("s3://laion/autoscale/urls.parquet", "wb") as f:
        pd.DataFrame({"url": [server.url(i) for i in range(len(samples))],
                      "caption": [s.caption for s in samples]}).to_parquet(f)
    s3.pipe(f"{RUN}/dataset.json", json.dumps({"num_images": len(samples), "heldout_captions": []}).encode())
    report: dict[str, dict] = {}

    # Download: shard tasks only where the `download` resource is.
    _, cpu, secs = _run(cluster, "download", ["download.input=s3://laion/autoscale/urls.parquet"])
    assert _where(cluster, "task", "download_shard") == ["cpu_worker"]
    report["download"] = {"ran_on": ["cpu_worker"], "s": secs, **cpu}

    # train-clip runs whole as one task on a worker: nothing but its driver is on the head.
    _, cpu, secs = _run(cluster, "train_clip", [])
    assert "head" not in _where(cluster, "task", "run_train_clip") and _where(cluster, "task", "run_train_clip")
    report["train_clip"] = {"ran_on": _where(cluster, "task", "run_train_clip"), "s": secs, **cpu}

    # Tokenize with one GPU per encoder: a gpu_worker comes up from zero; encoders there, decode on CPU nodes.
    _upload_tiny_dvae(s3, tmp_path)
    assert "gpu_worker" not in [cluster.node_type(n.node_id) for n in cluster.nodes()]
    logs, cpu, secs = _run(cluster, "tokenize", ["tokenize.gpus_per_worker=1", "tokenize.num_encoders=1",
                                                 "tokenize.decode_resources={download: 1}"])
    assert _where(cluster, "actor", "Encoder") == ["gpu_worker"], _where(cluster, "actor", "")
    assert _where(cluster, "task", "DecodeShard") == ["cpu_worker"]
    assert "has no CUDA device" in logs  # the fake GPU node says it fell back to CPU, naming itself
    keys = schema.read_token_shards(f"{RUN}/tokens")[0].column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(samples)  # every row once, committed and readable from S3
    report["tokenize"] = {"encoders_on": ["gpu_worker"], "decode_on": ["cpu_worker"], "s": secs, **cpu}

    # train-prior on 2 Ray Train workers of one GPU each: the autoscaler brings a second gpu_worker.
    logs, cpu, secs = _run(cluster, "train_prior", ["prior.num_procs=2", "prior.gpus_per_worker=1",
                                                    "prior.steps=4", "prior.log_every=2"])
    train_nodes = _train_nodes(cluster)
    assert [cluster.node_type(n) for n in train_nodes] == ["gpu_worker", "gpu_worker"], train_nodes
    assert s3.exists(f"{RUN}/prior/model.safetensors")
    report["train_prior"] = {"ran_on": ["gpu_worker"] * 2, "s": secs, **cpu}

    # Two GPU nodes (train-prior's two workers need them), one head, and one or two CPU nodes: how many download
    # nodes the autoscaler brings up depends on how fast the first one drains the shard queue.
    types = sorted(cluster.node_type(n.node_id) for n in cluster.nodes())
    assert types.count("gpu_worker") == 2 and types.count("head") == 1, types
    assert 1 <= types.count("cpu_worker") <= 2 and len(types) <= 5, types
    events = cluster.autoscaler_events()
    print("autoscaling report:", json.dumps(report), "\nautoscaler events:\n" + "\n".join(events[-20:]))
    assert any("gpu_worker" in e for e in events), events[-20:]
    for stage, fig in report.items():  # the driver on the head keeps to bookkeeping
        assert fig["driver_share"] < 0.5, (stage, fig)


def _train_nodes(cluster) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True)
    return sorted({a.node_id for a in actors})


def _upload_tiny_dvae(s3, tmp_path) -> None:
    import torch

    from pipeline.dvae.model import DVAE, DVAEShape, save_dvae

    torch.manual_seed(0)
    path = tmp_path / "dvae.safetensors"
    save_dvae(DVAE(DVAEShape(vocab_size=32, n_hid=8, group_count=2, n_blk_per_group=1, n_init=8)), str(path))
    s3.put(str(path), f"{RUN}/dvae/dvae.safetensors")
    s3.put(str(tmp_path / "dvae.json"), f"{RUN}/dvae/dvae.json")


def test_a_request_no_node_type_offers_fails_before_any_work(cluster, s3):
    """Two GPUs per worker on a cluster whose biggest node has one: the job fails at once naming the key and the
    node types, instead of waiting forever for a node that cannot come."""
    job = cluster.submit("train_prior", [*COMMON, "prior.output=s3://laion/autoscale/never", "prior.gpus_per_worker=2",
                                         "prior.launcher=ray"])
    assert wait_job(cluster, job, 120) == "FAILED"
    logs = cluster.client().get_job_logs(job)
    assert "prior.num_procs=2 Ray Train workers" in logs and "no node type offers it" in logs, logs[-3000:]
    assert "gpu_worker ({CPU: 1, GPU: 1}, up to 2)" in logs
    assert not s3.exists("s3://laion/autoscale/never/latest_complete")
