"""The one façade: one function per command, ``Config`` in, summary dict out (with ``wall_s``). The CLI and every
``jobs/`` script call these and nothing else, so a command gives the same output however it is started.

Each function only wires: the work is in the stage's package (``pipeline.download``, ``pipeline.dvae``, ...), and
the engines behind ``pipeline.runtime``. Imports are inside the functions so that a command loads only its stage.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.runtime.progress import timed


def download(cfg: Config) -> dict[str, Any]:
    """URL list → committed image shards, one Ray task per shard."""
    from pipeline.download.run import run_download
    from pipeline.runtime import ray_seam

    ray_seam.init_ray(cfg)
    return timed(lambda: run_download(cfg))


def train_dvae(cfg: Config) -> dict[str, Any]:
    """The dVAE on ``dvae.num_procs`` ranks, or OpenAI's / a given dvae.pt imported (``dvae.weights``)."""
    if cfg.dvae.weights:  # OpenAI's published dVAE, or a checkpoint of ours: no training, same output layout
        from pipeline.dvae.openai import import_weights

        return timed(lambda: import_weights(cfg))
    from pipeline.dvae.train import launch

    return timed(lambda: launch(cfg))


def eval_dvae(cfg: Config) -> dict[str, Any]:
    from pipeline.dvae.eval import eval_dvae as run

    return timed(lambda: run(cfg))


def train_clip(cfg: Config, images: Any = None, captions: list[str] | None = None) -> dict[str, Any]:
    """The run's small CLIP (skipped when ``clip.model`` names one); ``images``/``captions`` if already loaded."""
    from pipeline.clip.train import run_train_clip

    return timed(lambda: run_train_clip(cfg, images, captions))


def tokenize(cfg: Config) -> dict[str, Any]:
    """Committed image shards → committed token shards (Ray Data)."""
    from pipeline.runtime import ray_seam
    from pipeline.storage.commit import join
    from pipeline.tokenize.encode import encoder_spec
    from pipeline.tokenize.run import run_tokenize

    def run() -> dict[str, Any]:
        if cfg.dvae.weights:  # e.g. OpenAI's: imported into <run>/dvae/dvae.pt first
            import os

            if not os.path.exists(join(cfg.path("dvae"), "dvae.pt")):
                from pipeline.dvae.openai import import_weights

                import_weights(cfg)
        ray_seam.init_ray(cfg)
        return run_tokenize(cfg, encoder_spec(cfg))

    return timed(run)


def export(cfg: Config) -> dict[str, Any]:
    """Token shards → clip-retrieval's layout."""
    from pipeline.tokenize.export import export_clip_retrieval

    return timed(lambda: export_clip_retrieval(cfg.path("tokens"), cfg.path("clip_retrieval")))


def train_prior(cfg: Config) -> dict[str, Any]:
    """Either prior (``prior.kind``) on ``prior.num_procs`` ranks (deepspeed launcher or Ray Train)."""
    from pipeline.prior.train import launch

    return timed(lambda: launch(cfg))


def export_prior(cfg: Config) -> dict[str, Any]:
    """A prior checkpoint (default: the newest complete one) → consolidated ``<tag>/model.pt``."""
    from pipeline.prior.checkpoints import export_weights

    return timed(lambda: {"model": export_weights(cfg.path("prior"))})


def eval_prior(cfg: Config) -> dict[str, Any]:
    """The diffusion prior on held-out rows: its headline figures, and where the full result and grid are."""
    from pipeline.prior.eval import eval_prior_summary

    return timed(lambda: eval_prior_summary(cfg))


def sample(cfg: Config) -> dict[str, Any]:
    """Captions → images with the autoregressive prior, CLIP-reranked; the records under ``<report>/``."""
    from pipeline.sample.run import run_sample

    return timed(lambda: run_sample(cfg)[0])


def plan(cfg: Config, samples: int, gpus: int, gpu_mem_gb: float = 80.0) -> dict[str, Any]:
    """The capacity plan: storage, hours and GPU memory per stage (arithmetic on the config: nothing runs)."""
    from pipeline.capacity import plan as capacity_plan

    return timed(lambda: capacity_plan(cfg, samples, gpus, gpu_mem_gb=gpu_mem_gb))


def demo(cfg: Config) -> dict[str, Any]:
    """Every stage on the embedded dataset served over loopback HTTP, then the report."""
    from pipeline.demo.run import run_demo

    return run_demo(cfg)
