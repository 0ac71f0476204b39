"""Shared fixtures: a local Ray cluster, the loopback image server, tiny configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.demo import synth  # noqa: E402
from pipeline.demo.server import ImageServer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shared by the tests that need one and shut down at the end."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_samples():
    samples, heldout = synth.make_samples(60, 0.1, seed=0)
    return samples, heldout


@pytest.fixture(scope="session")
def image_server(tiny_samples):
    samples, _ = tiny_samples
    with ImageServer({s.index: synth.render_png(s, 32) for s in samples}) as server:
        yield server


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    """configs/tiny.yaml with its run folder under tmp_path."""
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), [f"run_dir={tmp_path / 'run'}"])


def make_tiny_models(cfg: Config) -> None:
    """A random tiny dVAE and a CLIP trained for ``cfg.clip.steps`` on the committed images, in ``cfg``'s run:
    tokenize needs models, not good ones."""
    import numpy as np
    import torch

    from pipeline.clip.train import train_clip
    from pipeline.dvae.model import DVAE, DVAEShape, save_dvae
    from pipeline.storage import shards

    torch.manual_seed(0)
    os.makedirs(cfg.path("dvae"))
    save_dvae(DVAE(DVAEShape(vocab_size=32, n_hid=8, group_count=2, n_blk_per_group=1, n_init=8)),
              os.path.join(cfg.path("dvae"), "dvae.safetensors"))
    items = list(shards.iter_images(cfg.path("images"), 16))
    train_clip(cfg.clip, np.stack([i for _, _, i in items]), [c for _, c, _ in items], cfg.path("clip"), 0)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1. The endpoint and region go in AWS_* env (the Ray seam passes those on to
    tasks); the keys only in a shared credentials file, the standard AWS chain, as on a real cluster node."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    creds = tmp_path_factory.mktemp("aws") / "credentials"
    creds.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    old = {k: os.environ.get(k) for k in env}
    _set_env(env)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("laion")
    yield fs
    server.stop()
    _set_env(old)


def _set_env(env: dict) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
