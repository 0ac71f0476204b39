"""A real multi-node Ray cluster on this machine (head + worker raylets), download and tokenize submitted through
the Jobs API exactly as `ray job submit --working-dir . -- python jobs/<stage>.py` does, a worker node killed
(SIGKILL, no drain) mid-job and a fresh one added: every row lands once. Canary credentials sit in every node's
environment, as the standard AWS chain would put them there, and must show up in no log, manifest or job record."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid

import pandas as pd
import pytest
from conftest import make_tiny_models

from pipeline.config import load_config
from pipeline.demo import synth
from pipeline.demo.server import ImageServer
from pipeline.storage import commit, schema, shards

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_IMAGES, SHARD = 72, 6  # 12 shards
CANARY = f"canary-{uuid.uuid4().hex}"
# Every node's dashboard agent takes HTTP port 52365 unless told otherwise; another Ray instance on this machine
# (the session's ray_cluster fixture) or another node may hold it, and a head whose agent cannot bind cannot take
# job submissions. So every node gets a free port of its own.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each worker node also gets a Ray temp folder of its own, as a real node has its own disk: otherwise every node
# of this one-machine cluster unpacks the job's working_dir into one shared session folder, and a fresh node's
# runtime-env agent rewriting that package while another node's workers import from it broke a tokenize shard
# ("cannot import name ... from pipeline.storage", once in five suite runs). Short paths: Ray's sockets live there.
NODE_TEMP_DIRS: list[str] = []


def _worker_args() -> dict:
    NODE_TEMP_DIRS.append(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    return {"num_cpus": 2, "resources": {"download": 1}, "dashboard_agent_listen_port": _free_port(),
            "temp_dir": NODE_TEMP_DIRS[-1]}


@pytest.fixture(scope="module")
def cluster(s3):
    """Head (0 CPUs: it only runs job drivers, like the AWS head) plus two worker nodes with the `download`
    resource. The canary keys are in the environment the nodes start with; nothing passes them on explicitly."""
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    secret_env = {"AWS_ACCESS_KEY_ID": f"{CANARY}-id", "AWS_SECRET_ACCESS_KEY": CANARY, "AWS_SESSION_TOKEN": CANARY}
    old = {k: os.environ.get(k) for k in secret_env}
    os.environ.update(secret_env)
    port = _free_port()
    # Node death is noticed after health_check_failure_threshold missed checks: 1 s apart here, not Ray's 3 s x 5,
    # so the test spends its time on recovery rather than on waiting to notice.
    fast_detect = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1", "dashboard_port": port,
                                                      "dashboard_agent_listen_port": _free_port(),
                                                      "_system_config": fast_detect})
    workers = [c.add_node(**_worker_args()) for _ in range(2)]
    c.wait_for_nodes()
    client = JobSubmissionClient(f"http://127.0.0.1:{port}")
    yield (c, workers, client), f"http://127.0.0.1:{port}"
    c.shutdown()
    for d in NODE_TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def served(tiny_samples):
    """The tiny set served slowly (0.15 s per image) so a shard takes long enough to be caught mid-flight."""
    samples = (tiny_samples[0] * 2)[:N_IMAGES]
    png = {i: synth.render_png(s, 32) for i, s in enumerate(samples)}

    def slow(i: int) -> bytes | None:
        time.sleep(0.15)
        return png.get(i)

    with ImageServer(slow) as server:
        yield server, samples


def _submit(client, stage: str, overrides: list[str]) -> str:
    entrypoint = shlex.join([sys.executable, f"jobs/{stage}.py", "--config", "configs/tiny.yaml", *overrides])
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": REPO})
        except RuntimeError as exc:
            # The job server answers 500 "No available agent" until the head's dashboard agent has registered,
            # which on a busy machine can be seconds after the nodes are up; it says to try again.
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)


def _wait(client, job: str, timeout: float = 240.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    client.stop_job(job)
    raise AssertionError(f"job {job} still running after {timeout}s:\n{client.get_job_logs(job)[-3000:]}")


def _kill_busy_worker(cluster, dashboard: str, job: str, committed, busy) -> str:
    """Once a shard is committed, SIGKILL (no drain) a worker node that is running ``busy`` work for the job right
    now (from Ray's state API), then add a fresh worker node. Returns what was running on the killed node."""
    from ray.util.state import list_actors, list_tasks

    c, workers, client = cluster
    deadline = time.time() + 120
    while True:
        status = str(client.get_job_status(job))
        assert time.time() < deadline and status in ("PENDING", "RUNNING"), \
            f"the job ended or stalled before the kill ({status}):\n{client.get_job_logs(job)[-4000:]}"
        if committed():
            running = [(t.node_id, t.name) for t in list_tasks(dashboard, filters=[("state", "=", "RUNNING")])]
            running += [(a.node_id, a.class_name) for a in list_actors(dashboard, filters=[("state", "=", "ALIVE")])]
            victims = [(w, name) for w in workers for node, name in running if node == w.node_id and busy in name]
            if victims:
                break
        time.sleep(0.1)
    node, name = victims[0]
    workers.remove(node)
    c.remove_node(node, allow_graceful=False)
    workers.append(c.add_node(**_worker_args()))
    return name


def test_download_and_tokenize_jobs_survive_a_node_loss(cluster, served, s3, tmp_path):
    (c, workers, client), dashboard = cluster
    server, samples = served
    run = tmp_path / "run"
    urls = "s3://laion/cluster/urls.parquet"  # read by the job driver with the nodes' (canary) credentials
    with s3.open(urls, "wb") as f:
        pd.DataFrame({"url": [server.url(i) for i in range(N_IMAGES)],
                      "caption": [s.caption for s in samples]}).to_parquet(f)
    common = [f"run_dir={run}", "download.shard_size=6", "tokenize.batch_size=4", "tokenize.num_encoders=2"]
    job = _submit(client, "download", [*common, f"download.input={urls}", "download.allow_private_addresses=true",
                                       "download.thread_count=2", "download.max_in_flight=4",
                                       "download.resources={download: 1}"])
    images = str(run / "images")
    fs, folder = commit.fs_and_path(images)
    assert _kill_busy_worker(cluster[0], dashboard, job, lambda: len(commit.committed_shards(fs, folder)) >= 1,
                             "download_shard") == "download_shard"
    killed_at = len(commit.committed_shards(fs, folder))
    assert _wait(client, job) == "SUCCEEDED", client.get_job_logs(job)[-4000:]
    assert killed_at < N_IMAGES // SHARD, "the node went away after the job had finished"
    committed = commit.committed_shards(fs, folder)
    assert sorted(committed) == list(range(N_IMAGES // SHARD))
    keys = [s["key"] for sid in committed for s in shards.read_shard_samples(images, sid)]
    assert len(keys) == len(set(keys)) == N_IMAGES  # 0 lost, 0 duplicated
    assert sum(m["successes"] for m in committed.values()) == N_IMAGES

    make_tiny_models(load_config(os.path.join(REPO, "configs", "tiny.yaml"), [*common, "clip.steps=1"]))
    job = _submit(client, "tokenize", common)
    tokens = str(run / "tokens")
    tfs, tfolder = commit.fs_and_path(tokens)
    assert "Encoder" in _kill_busy_worker(cluster[0], dashboard, job,
                                          lambda: len(commit.committed_shards(tfs, tfolder)) >= 1, "Encoder")
    killed_at = len(commit.committed_shards(tfs, tfolder))
    assert _wait(client, job) == "SUCCEEDED", client.get_job_logs(job)[-4000:]
    assert killed_at < N_IMAGES // SHARD, "the node went away after the job had finished"
    table, _ = schema.read_token_shards(tokens)
    token_keys = table.column("key").to_pylist()
    assert len(token_keys) == len(set(token_keys)) and sorted(token_keys) == sorted(keys)
    _no_canary_anywhere(c, client, run)


def _no_canary_anywhere(c, client, run) -> None:
    """Every job record and log, every file Ray wrote for this cluster, every file the run wrote."""
    places = []
    for job in client.list_jobs():
        places.append((f"job {job.submission_id} record", repr(job).encode()))
        places.append((f"job {job.submission_id} log", client.get_job_logs(job.submission_id).encode()))
    roots = [str(run), c.head_node.get_logs_dir_path()]
    roots += [logs for d in NODE_TEMP_DIRS for logs in glob.glob(os.path.join(d, "session_*", "logs"))]  # workers'
    assert len(roots) > 2
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    places.append((path, f.read()))
    assert len(places) > 20
    raylet = c.head_node.all_processes["raylet"][0].process.pid
    with open(f"/proc/{raylet}/environ", "rb") as f:  # the control: the secret really was there to leak
        assert CANARY.encode() in f.read()
    leaks = [where for where, data in places if CANARY.encode() in data]
    assert not leaks, f"the canary secret leaked into: {leaks}"
