"""The whole pipeline on a cluster whose nodes share no disk (``isolated.IsolatedCluster``): every stage submitted as
a Ray job with ``run_dir=s3://…``, checked by reading S3 only; then a worker node holding a training rank is killed
between two checkpoints and Ray Train finishes the run from the last committed one, with the losses of an
uninterrupted run.

Canary credentials are in every node's environment (the standard AWS chain; moto accepts any key) and must appear in
no object the run wrote and no job log."""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest
from isolated import IsolatedCluster

from pipeline.demo import synth
from pipeline.demo.server import ImageServer
from pipeline.prior.checkpoints import load_prior
from pipeline.storage import commit, schema, shards

pytestmark = pytest.mark.slow
RUN = "s3://laion/iso/run"
CANARY = f"canary-{uuid.uuid4().hex}"
# Sized for make test's budget: every stage still runs as configured for a cluster (Ray Train for both trainers,
# the prior on 2 workers), on fewer steps.
COMMON = [f"run_dir={RUN}", "download.shard_size=40", "tokenize.num_encoders=1", "tokenize.batch_size=16",
          "prior.log_every=5", "prior.steps=20", "dvae.steps=10", "dvae.num_procs=1"]


@pytest.fixture(scope="module")
def served(tiny_samples):
    samples, heldout = tiny_samples
    pngs = {i: synth.render_png(s, 32) for i, s in enumerate(samples)}
    with ImageServer(pngs) as server:
        yield server, samples, heldout


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """Head (0 CPUs) + 3 one-CPU workers with the ``download`` resource, each in its own namespaces."""
    c = IsolatedCluster(str(tmp_path_factory.mktemp("iso")),
                        env={"AWS_ACCESS_KEY_ID": f"{CANARY}-id", "AWS_SECRET_ACCESS_KEY": CANARY})
    try:
        yield c.start(workers=3, cpus=1, resources={"download": 1})
    finally:
        c.stop()


def _objects(s3, prefix: str) -> dict[str, int]:
    s3.invalidate_cache()
    return {k: int(v["size"]) for k, v in s3.find(prefix, detail=True).items()}


def _metrics(s3, url: str) -> list[dict]:
    with s3.open(url, "rb") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def test_nodes_really_share_no_disk(cluster):
    """The control: a file a task writes into its node's /tmp is invisible to another node and to the driver."""
    code = ("import os, ray; ray.init()\n"
            "w = ray.remote(lambda: open('/tmp/iso-probe', 'w').write('x'))\n"
            "r = ray.remote(lambda: os.path.exists('/tmp/iso-probe'))\n"
            "ray.get(w.options(resources={'iso_worker1': 1}).remote())\n"
            "same = ray.get(r.options(resources={'iso_worker1': 1}).remote())\n"
            "other = ray.get(r.options(resources={'iso_worker2': 1}).remote())\n"
            "print('PROBE', same, other, os.path.exists('/tmp/iso-probe'))\n")
    client = cluster.client()
    job = client.submit_job(entrypoint=f"{sys.executable} -c {shlex.quote(code)}")
    assert cluster.wait(job, 180) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
    assert "PROBE True False False" in client.get_job_logs(job)


def test_every_stage_as_a_job_through_s3_only(cluster, served, s3):
    server, samples, heldout = served
    with s3.open("s3://laion/iso/urls.parquet", "wb") as f:
        pd.DataFrame({"url": [server.url(i) for i in range(len(samples))],
                      "caption": [s.caption for s in samples]}).to_parquet(f)
    s3.pipe(f"{RUN}/dataset.json", json.dumps({"num_images": len(samples), "heldout_captions": heldout}).encode())
    t0, times = time.time(), {}
    for stage, extra in [("download", ["download.input=s3://laion/iso/urls.parquet",
                                       "download.allow_private_addresses=true", "download.resources={download: 1}"]),
                         ("train_dvae", []), ("train_clip", []), ("tokenize", []), ("train_prior", []),
                         ("sample", []), ("report", [])]:
        t = time.time()
        logs = cluster.run(stage, [*COMMON, *extra])
        times[stage] = round(time.time() - t, 1)
        if stage == "train_prior":
            assert "Ray Train" in logs or "ray_train" in logs or "[train-prior]" in logs
    print(f"isolated pipeline: {times}, total {time.time() - t0:.0f}s")

    objects = _objects(s3, RUN)
    names = {k.removeprefix(RUN.removeprefix("s3://") + "/") for k in objects}
    # Every stage's artefacts are in S3, committed.
    images = commit.committed_shards(*commit.fs_and_path(f"{RUN}/images"))
    keys = [s["key"] for sid in images for s in shards.read_shard_samples(f"{RUN}/images", sid)]
    assert len(images) == -(-len(samples) // 40) and len(keys) == len(set(keys)) == len(samples)
    for must in ["dvae/dvae.safetensors", "dvae/metrics.json", "dvae/metrics.jsonl", "dvae/latest_complete",
                 "clip/open_clip_model.safetensors", "clip/open_clip_config.json", "clip/metrics.json",
                 "prior/model.safetensors", "prior/metrics.jsonl", "prior/loss_curve.png", "prior/latest_complete",
                 "prior/config.yaml", "report/samples.parquet", "report/samples.png", "report/report.md",
                 "report/report.html", "report/loss_curves.png", "_summaries/sample.json"]:
        assert must in names, f"{must} missing from S3; have {sorted(names)[:60]}"
    assert any(n.startswith("dvae/tb/") for n in names) and any(n.startswith("prior/tensorboard/") for n in names)
    assert any(re.match(r"dvae/recon_step\d+\.png", n) for n in names)
    tag = s3.cat(f"{RUN}/prior/latest_complete").decode().strip()
    record = json.loads(s3.cat(f"{RUN}/prior/{tag}/complete.json"))
    assert record["world_size"] == 2 and any("zero_pp_rank_1" in f for f in record["files"])  # both ranks uploaded
    assert any(n.startswith("prior/ray_train/") for n in names), "Ray Train kept no run state in the run's storage"
    # Token shards hold the download's keys, exactly once.
    table, _ = schema.read_token_shards(f"{RUN}/tokens")
    token_keys = table.column("key").to_pylist()
    assert len(token_keys) == len(set(token_keys)) and sorted(token_keys) == sorted(keys)
    # The prior's weights load from S3 and sample.
    model, meta = load_prior(f"{RUN}/prior/model.safetensors", "ar")
    assert meta and int(model.shape.image_grid) > 0
    samples_table = pd.read_parquet(io.BytesIO(s3.cat(f"{RUN}/report/samples.parquet")))
    assert len(samples_table) > 0 and samples_table["clip_score"].notna().all()
    html = s3.cat(f"{RUN}/report/report.html").decode()
    assert "data:image/png;base64" in html and "Run report" in html
    # Ray Train's workers ran on two different nodes.
    assert _train_worker_nodes(cluster) >= 2
    # Credentials never reach what the run wrote or the job logs.
    leaks = [k for k in objects if CANARY.encode() in s3.cat(k)]
    client = cluster.client()
    leaks += [j.submission_id for j in client.list_jobs() if CANARY in client.get_job_logs(j.submission_id)]
    assert not leaks, f"the canary secret leaked into {leaks}"


def _train_worker_nodes(cluster) -> int:
    from ray.util.state import list_actors

    actors = list_actors(cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=1000,
                         detail=True)
    return len({a.node_id for a in actors})


def _live_rank_node(cluster) -> str | None:
    from ray.util.state import list_actors

    for a in list_actors(cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         limit=1000, detail=True):
        name = cluster.node_name(a.node_id)
        if name:
            return name
    return None


def test_a_killed_node_mid_training_resumes_from_the_last_commit(cluster, s3):
    """SIGKILL the node of a training rank between checkpoints; Ray Train restarts the group and the run ends at
    the configured step with the losses of the uninterrupted run (the pipeline test's prior, same settings)."""
    out = f"{RUN}/prior_kill"
    job = cluster.submit("train_prior", [*COMMON, f"prior.output={out}", "prior.save_every=5"])
    deadline, killed_after = time.time() + 420, None
    while time.time() < deadline:
        status = str(cluster.client().get_job_status(job))
        assert status in ("PENDING", "RUNNING"), cluster.client().get_job_logs(job)[-4000:]
        try:
            step = int(s3.cat(f"{out}/latest_complete").decode().strip().removeprefix("step"))
        except FileNotFoundError:
            step = 0
        # Step 10, not 5: by then the commit of step 5 has also been reported to Ray Train (rank 0 reports after
        # it commits), so the restarted group finds that report; a kill right after the first commit can beat it.
        victim = _live_rank_node(cluster) if step >= 10 else None
        if victim:
            assert step < 20, "training ended before the kill"
            cluster.kill_worker(victim)
            killed_after = step
            cluster.add_worker(1, {"download": 1})
            break
        time.sleep(0.5)
        s3.invalidate_cache()
    assert killed_after is not None, "no committed checkpoint at step >= 10 with a live rank to kill"
    assert cluster.wait(job, 600) == "SUCCEEDED", cluster.client().get_job_logs(job)[-6000:]
    logs = cluster.client().get_job_logs(job)
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", logs)]
    assert resumed and resumed[-1] >= killed_after, logs[-4000:]
    assert "restarted after a failure" in logs
    interrupted, clean = _metrics(s3, f"{out}/metrics.jsonl"), _metrics(s3, f"{RUN}/prior/metrics.jsonl")
    assert [r["step"] for r in interrupted] == [r["step"] for r in clean] == list(range(5, 21, 5))
    np.testing.assert_allclose([r["loss"] for r in interrupted], [r["loss"] for r in clean], rtol=1e-5)
    assert json.loads(s3.cat(f"{out}/model.json"))["steps"] == 20
    print(f"kill/resume: killed after committed step {killed_after}, resumed from {resumed[-1]}, final step 20, "
          f"losses after the resume equal the uninterrupted run's")
