"""Tokenize on a real local Ray cluster with tiny models: exact schema, same keys, rejects, exactly once under kills."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny_models

from pipeline.config import load_config
from pipeline.download.run import run_download
from pipeline.storage import commit, schema, shards
from pipeline.tokenize.encode import encoder_spec
from pipeline.tokenize.run import run_tokenize
from pipeline.tokenize.worker import DecodeShard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_cluster, image_server, tiny_samples):
    """Committed image shards downloaded from the loopback server, a random tiny dVAE and a 1-step tiny CLIP."""
    root = tmp_path_factory.mktemp("tok")
    samples = tiny_samples[0][:48]
    pd.DataFrame({"url": [image_server.url(s.index) for s in samples],
                  "caption": [s.caption for s in samples]}).to_parquet(root / "urls.parquet")
    cfg = load_config("configs/tiny.yaml", [f"run_dir={root / 'run'}", f"download.input={root / 'urls.parquet'}",
                                            "download.allow_private_addresses=true", "download.shard_size=16",
                                            "clip.steps=1", "tokenize.batch_size=8"])
    run_download(cfg)
    make_tiny_models(cfg)
    return cfg


def with_tokens(cfg, name: str):
    c = load_config("configs/tiny.yaml", [f"run_dir={cfg.run_dir}", f"tokenize.output={cfg.run_dir}/{name}",
                                          "tokenize.batch_size=8"])
    return c, encoder_spec(c)


def test_schema_and_keys_match_the_download(workspace):
    cfg, spec = with_tokens(workspace, "tokens_schema")
    summary = run_tokenize(cfg, spec)
    assert summary["rows"] == summary["rows_in"] == 48 and summary["rejects"] == 0
    table, meta = schema.read_token_shards(cfg.path("tokens"))
    want = schema.token_schema(meta["grid"], meta["embed_dim"])
    assert table.schema.remove_metadata() == want, table.schema
    assert table.schema.field("image_tokens").type == pa.list_(pa.uint16(), meta["grid"] ** 2)
    assert table.schema.field("clip_image_emb").type == pa.list_(pa.float16(), meta["embed_dim"])
    assert table.schema.field("text_tokens").type == pa.list_(pa.uint16())
    keys = sorted(k for k, _, _ in shards.iter_images(cfg.path("tokens_input"), 16))
    assert sorted(table.column("key").to_pylist()) == keys
    emb = np.stack(table.column("clip_image_emb").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    marker = json.loads(open(cfg.path("tokens") + "/00000.done.json").read())
    assert marker["rows"] == 16 and marker["rejects"] == {} and marker["images_per_s"] > 0


def test_bad_samples_become_rejects_and_a_tampered_shard_is_named(workspace, tmp_path, capsys):
    """Copy the image shards, break some samples (and one whole shard), tokenize: rows + rejects = input."""
    src = workspace.path("images")
    dst = tmp_path / "images"
    dst.mkdir()
    for name in os.listdir(src):
        if name.endswith((".tar", ".parquet", "_stats.json", ".done.json")) or name == "_run.json":
            (dst / name).write_bytes(open(os.path.join(src, name), "rb").read())
    tar0 = dst / "00000.tar"
    members = []
    with tarfile.open(tar0) as t:
        for m in t.getmembers():
            members.append((m.name, t.extractfile(m).read()))
    keys = sorted({n.split(".")[0] for n, _ in members})
    broken = {keys[0]: "jpg", keys[1]: "txt", keys[2]: "txt"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            key, ext = name.split(".", 1)
            if key == keys[0] and ext == "jpg":
                data = b"\xff\xd8 not really a jpeg"
            if key == keys[1] and ext == "txt":
                data = b"   "
            if key == keys[2] and ext == "txt":
                data = b"caf\xe9"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    tar0.write_bytes(buf.getvalue())
    marker = json.loads((dst / "00000.done.json").read_text())  # re-commit the edited shard (as if it came so)
    marker["files"]["00000.tar"]["sha256"] = commit.sha256_file(*commit.fs_and_path(str(tar0)))
    marker["files"]["00000.tar"]["bytes"] = tar0.stat().st_size
    (dst / "00000.done.json").write_text(json.dumps(marker))
    tar1 = dst / "00001.tar"
    tar1.write_bytes(tar1.read_bytes()[:5000])  # truncated after commit: its marker's sha256 no longer matches
    cfg = load_config("configs/tiny.yaml", [f"run_dir={workspace.run_dir}", f"tokenize.input={dst}",
                                            f"tokenize.output={tmp_path / 'tokens'}", "tokenize.batch_size=8"])
    summary = run_tokenize(cfg, encoder_spec(cfg))
    assert list(summary["shards_failed"]) == ["00001"] and "00001.tar changed since it was committed" in \
        summary["shards_failed"]["00001"]
    done = json.loads((tmp_path / "tokens" / "00000.done.json").read_text())
    assert done["rejects"] == {"bad_caption": 1, "decode_error": 1, "empty_caption": 1}
    assert set(done["rejected_keys"]) == set(broken)
    t0 = pq.read_table(tmp_path / "tokens" / "00000.parquet")
    assert t0.num_rows + len(done["rejected_keys"]) == 16
    assert not (tmp_path / "tokens" / "00001.done.json").exists()
    from pipeline.cli import main  # the command says so with its exit code: a script must not carry on

    code = main(["tokenize", "--config", "configs/tiny.yaml", f"run_dir={workspace.run_dir}", f"tokenize.input={dst}",
                 f"tokenize.output={tmp_path / 'tokens'}", "tokenize.batch_size=8"])
    assert code == 3 and "tokenize finished with failures: 1 shard(s) failed (00001)" in capsys.readouterr().err


def _encoder_pids() -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::Encoder"):  # an encoder actor (idle, or running a shard)
            out.append(p.pid)
    return out


class _ReplayingDecode(DecodeShard):
    """A decode task that yields its first batch twice, as Ray does when it re-executes a streaming task whose first
    output already reached the encoder: the dedup path must run in the real stage, not only in its own tests. Each
    replay leaves a file in ``self.note`` (the task runs in another process)."""

    note = ""

    def __call__(self, item):
        for i, batch in enumerate(super().__call__(item)):
            yield batch
            if i == 0:
                open(os.path.join(self.note, f"replay-{item['shard_id']}-{os.getpid()}-{time.time_ns()}"), "w").write(
                    str(len(batch["key"])))
                yield {k: v.copy() for k, v in batch.items()}


def test_killed_encoder_actors_lose_and_duplicate_nothing(workspace, monkeypatch):
    clean_cfg, spec = with_tokens(workspace, "tokens_clean")
    run_tokenize(clean_cfg, spec)
    clean = {sid: open(f"{clean_cfg.path('tokens')}/{sid:05d}.parquet", "rb").read() for sid in range(3)}
    cfg, _ = with_tokens(workspace, "tokens_killed")
    fs, out = commit.fs_and_path(cfg.path("tokens"))
    import ray.cloudpickle

    from pipeline.tokenize import run as tokenize_run

    notes = workspace.run_dir + "/replays"
    os.makedirs(notes, exist_ok=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the subclass travels to the decode tasks
    monkeypatch.setattr(_ReplayingDecode, "note", notes)
    monkeypatch.setattr(tokenize_run, "DecodeShard", _ReplayingDecode)
    rng = random.Random(1234)
    killed: list[int] = []
    errors: list[BaseException] = []
    outcome: dict = {}

    def run() -> None:
        try:
            outcome.update(run_tokenize(cfg, spec))
        except BaseException as exc:  # noqa: BLE001 — a run may give up after kills; the rerun below resumes it
            errors.append(exc)

    job = threading.Thread(target=run)
    job.start()
    deadline = time.monotonic() + 180
    while job.is_alive() and len(killed) < 3 and time.monotonic() < deadline:
        pids = [p for p in _encoder_pids() if p not in killed]
        if pids:
            time.sleep(rng.uniform(0.0, 1.0))  # seeded: sometimes while loading models, sometimes mid-batch
            try:
                psutil.Process(pids[0]).kill()
                killed.append(pids[0])
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    job.join(240)
    assert not job.is_alive(), "tokenize hung after actors were killed"
    assert len(killed) >= 3
    # What the interrupted run itself left: each shard it committed is the clean run's, byte for byte (a duplicate
    # key would have been refused or written twice), nothing half-written, and its summary (if it got that far)
    # counts every row once.
    own = commit.committed_shards(fs, out)
    for sid in own:
        assert open(f"{out}/{sid:05d}.parquet", "rb").read() == clean[sid], f"shard {sid} differs from the clean run"
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    if not errors:
        assert sorted(own) == [0, 1, 2] and outcome["rows"] == outcome["rows_in"] == 48, outcome
    again = run_tokenize(cfg, spec)  # finish whatever the last kill interrupted, and only that (replaying too)
    assert again["shards_skipped"] == len(own) and again["shards_written"] == 3 - len(own), again
    for sid in range(3):
        assert open(f"{out}/{sid:05d}.parquet", "rb").read() == clean[sid], f"shard {sid} differs from the clean run"
    table, _ = schema.read_token_shards(cfg.path("tokens"))
    assert table.num_rows == 48 and len(set(table.column("key").to_pylist())) == 48
    replays = [int(open(os.path.join(notes, n)).read()) for n in os.listdir(notes)]
    assert replays and min(replays) > 0, "no batch was delivered twice: the dedup path never ran"


def test_s3_input_and_output(workspace, s3):
    """The same job with s3:// input and output on the loopback S3 server; a rerun writes nothing."""
    src = workspace.path("images")
    for name in os.listdir(src):
        if name.endswith((".tar", ".parquet", "_stats.json", ".done.json")) or name == "_run.json":
            s3.put(os.path.join(src, name), f"laion/tok-images/{name}")
    cfg = load_config("configs/tiny.yaml", [f"run_dir={workspace.run_dir}", "tokenize.input=s3://laion/tok-images",
                                            "tokenize.output=s3://laion/tokens", "tokenize.batch_size=8"])
    summary = run_tokenize(cfg, encoder_spec(cfg))
    assert summary["rows"] == 48 and summary["shards_written"] == 3
    table, _ = schema.read_token_shards("s3://laion/tokens")
    assert sorted(table.column("key").to_pylist()) == sorted(k for k, _, _ in shards.iter_images(src, 16))
    again = run_tokenize(cfg, encoder_spec(cfg))
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3


def test_eval_dvae_scores_held_out_images(workspace):
    """`eval-dvae` on the same committed images: figures, a PNG, and a clear error for a checkpoint that is not one."""
    from pipeline.cli import main

    assert main(["eval-dvae", "--config", "configs/tiny.yaml", f"run_dir={workspace.run_dir}",
                 "dvae.heldout_images=8"]) == 0
    result = json.loads(open(os.path.join(workspace.path("dvae"), "eval.json")).read())
    assert result["heldout_images"] == 8 and 1 <= result["codes_used"] <= 32
    assert 1.0 <= result["perplexity"] <= result["codes_used"] and result["heldout_mse"] > 0
    assert open(result["reconstructions_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_export_command_writes_clip_retrieval_layout(workspace, tmp_path):
    from pipeline.cli import main

    cfg, spec = with_tokens(workspace, "tokens_schema")
    run_tokenize(cfg, spec)  # resumes: nothing to do if the schema test already wrote it
    assert main(["export", "--config", "configs/tiny.yaml", f"run_dir={workspace.run_dir}",
                 f"tokenize.output={cfg.path('tokens')}", f"tokenize.export={tmp_path / 'cr'}"]) == 0
    emb = np.load(tmp_path / "cr" / "img_emb" / "img_emb_00000.npy")
    meta = pq.read_table(tmp_path / "cr" / "metadata" / "metadata_00000.parquet").to_pydict()
    table, _ = schema.read_token_shards(cfg.path("tokens"))
    first = table.slice(0, 16)
    assert emb.dtype == np.float16 and emb.shape == (16, table.schema.field("clip_image_emb").type.list_size)
    assert meta["key"] == first.column("key").to_pylist()
    assert np.array_equal(emb, np.stack(first.column("clip_image_emb").to_numpy(zero_copy_only=False)))


_CLIP_BACK = """import flask, fire
_run = flask.Flask.run
flask.Flask.run = lambda self, host=None, port=None, **kw: _run(self, host="127.0.0.1", port=port, **kw)
from clip_retrieval.clip_back import clip_back
fire.Fire(clip_back)
"""  # clip back's own entry point; only the host it binds is pinned to loopback (it binds 0.0.0.0)


def _post(url: str, body: dict) -> list[dict]:
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _clip_back(folder, port: int):
    """`clip-retrieval back` from its own venv, in the export folder, on 127.0.0.1:port; returns once it answers."""
    import subprocess
    import urllib.request

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from peer_venv import peer_python

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([peer_python(), "-c", _CLIP_BACK, "--indices_paths", "indices_paths.json",
                             "--port", str(port)], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/indices-list", timeout=2) as r:
                return proc, json.loads(r.read())
        except (TimeoutError, OSError):
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"clip back did not start: {proc.communicate()[0][-3000:]}")


def test_clip_retrieval_back_serves_the_export_by_text_and_by_image(workspace, tmp_path):
    """export with the autofaiss index → `clip-retrieval back` on loopback → /knn-service by text, image and embedding
    returns our keys, captions and URLs, the query's own row first."""
    import base64
    import socket

    import faiss

    from pipeline.tokenize import export

    cfg, spec = with_tokens(workspace, "tokens_schema")
    run_tokenize(cfg, spec)  # resumes: nothing to do if the schema test already wrote it
    out = tmp_path / "cr"
    summary = export.export_clip_retrieval(cfg.path("tokens"), str(out), index=True, index_memory="100MB")
    table, _ = schema.read_token_shards(cfg.path("tokens"))
    assert summary["index"]["image.index"]["rows"] == summary["index"]["text.index"]["rows"] == table.num_rows == 48
    assert faiss.read_index(str(out / "image.index")).ntotal == 48
    spec_json = json.loads((out / "indices_paths.json").read_text())
    assert spec_json["tokens"]["clip_model"] == "open_clip:local-dir:clip/open_clip_model.safetensors"
    assert (out / "clip" / "open_clip_model.safetensors").read_bytes() == open(
        cfg.path("clip") + "/open_clip_model.safetensors", "rb").read()
    rows = {r["key"]: r for r in table.select(["key", "url", "caption"]).to_pylist()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, indices = _clip_back(out, port)
    try:
        assert indices == ["tokens"]
        knn = f"http://127.0.0.1:{port}/knn-service"
        key = sorted(rows)[5]
        by_text = _post(knn, {"text": rows[key]["caption"], "modality": "text", "num_images": 5,
                              "indice_name": "tokens"})
        by_text_img = _post(knn, {"text": rows[key]["caption"], "modality": "image", "num_images": 5,
                                  "indice_name": "tokens"})
        sid = int(key[:5])
        sample = next(x for x in shards.read_shard_samples(cfg.path("tokens_input"), sid) if x["key"] == key)
        by_image = _post(knn, {"image": base64.b64encode(sample["image"]).decode(), "modality": "image",
                               "num_images": 5, "indice_name": "tokens"})
        emb = table.column("clip_image_emb").to_pylist()[table.column("key").to_pylist().index(key)]
        by_emb = _post(knn, {"embedding_input": [float(v) for v in emb], "modality": "image", "num_images": 5,
                             "indice_name": "tokens"})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for hits in (by_text, by_text_img, by_image, by_emb):
        assert len(hits) == 5
        for h in hits:  # every hit is one of our rows, with its own caption and URL
            assert h["url"] == rows[h["key"]]["url"] and h["caption"] == rows[h["key"]]["caption"]
            assert h["image_path"] == h["key"]
    assert by_text[0]["caption"] == rows[key]["caption"] and by_text[0]["similarity"] > 0.99
    for hits in (by_image, by_emb):  # the queried image is a top hit (identical renders tie with it)
        assert hits[0]["similarity"] > 0.98
        assert key in {h["key"] for h in hits if h["similarity"] > hits[0]["similarity"] - 1e-3}, hits
