"""The one façade: one function per command, ``Config`` in, summary dict out (with ``wall_s``). The CLI and every
``jobs/`` script call these and nothing else, so a command gives the same output however it is started.

Each function only wires: the work is in the stage's package (``pipeline.download``, ``pipeline.dvae``, ...), and
the engines behind ``pipeline.runtime``. Imports are inside the functions so that a command loads only its stage.

On a Ray cluster (a Ray job, or ``ray_address`` set) this process is the job driver on the head node, which
computes nothing: the stages that fan out (download, tokenize, the trainers, sample over several workers) place
their own work, and every single-process stage runs whole as one Ray task asking for its section's hardware
(``_on_worker``). Every stage reads and writes the run's storage, so where it runs changes nothing it produces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config import Config
from pipeline.runtime.progress import timed


def _on_worker(cfg: Config, key: str, request: dict[str, float], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(cfg, *args)``: on a Ray cluster as one Ray task asking for ``request`` (checked first against the
    cluster's node types, naming ``key``), elsewhere in this process."""
    from pipeline.runtime.devices import on_cluster

    if not on_cluster(cfg):
        return fn(cfg, *args)
    from pipeline.config import absolute_paths
    from pipeline.runtime import ray_seam

    ray_seam.init_ray(cfg)
    ray_seam.check_demand(cfg, key, request)
    return ray_seam.run_on_workers(fn, [(absolute_paths(cfg), *args)], request)[0]


_ONE_CPU = {"CPU": 1.0}  # bookkeeping-sized stages (export, report): one CPU on any worker


def _check_tracking(cfg: Config) -> None:
    """``logging.wandb`` set without the wandb package: refused before any work, saying how to install it."""
    from pipeline.training.tracking import require_wandb

    require_wandb(cfg.logging.wandb)


def download(cfg: Config) -> dict[str, Any]:
    """URL list → committed image shards, one Ray task per shard."""
    from pipeline.download.run import run_download
    from pipeline.runtime import ray_seam

    ray_seam.init_ray(cfg)
    d = cfg.download
    ray_seam.check_demand(cfg, "download.task_cpus / download.resources (one shard task)",
                          {"CPU": d.task_cpus, **d.resources})
    return timed(lambda: run_download(cfg))


def train_dvae(cfg: Config) -> dict[str, Any]:
    """The dVAE on ``dvae.num_procs`` ranks, or OpenAI's / a given dvae.safetensors imported (``dvae.weights``)."""
    _check_tracking(cfg)
    if cfg.dvae.weights:  # OpenAI's published dVAE, or a checkpoint of ours: no training, same output layout
        from pipeline.dvae.openai import import_weights

        return timed(lambda: import_weights(cfg))
    from pipeline.dvae.train import launch

    return timed(lambda: launch(cfg))


def eval_dvae(cfg: Config) -> dict[str, Any]:
    from pipeline.dvae.eval import eval_dvae as run

    return timed(lambda: _on_worker(cfg, "dvae.cpus_per_worker / gpus_per_worker / resources (eval-dvae)",
                                    cfg.dvae.request(), run))


def train_clip(cfg: Config, images: Any = None, captions: list[str] | None = None) -> dict[str, Any]:
    """The run's small CLIP (skipped when ``clip.model`` names one); ``images``/``captions`` if already loaded."""
    _check_tracking(cfg)
    from pipeline.clip.train import run_train_clip

    if images is not None:  # already in this process's memory (the demo): train here
        return timed(lambda: run_train_clip(cfg, images, captions))
    return timed(lambda: _on_worker(cfg, "clip.cpus_per_worker / gpus_per_worker / resources (train-clip)",
                                    cfg.clip.request(), run_train_clip))


def tokenize(cfg: Config) -> dict[str, Any]:
    """Committed image shards → committed token shards (Ray Data)."""
    from pipeline.runtime import ray_seam
    from pipeline.storage.commit import join
    from pipeline.tokenize.encode import encoder_spec
    from pipeline.tokenize.run import run_tokenize

    def run() -> dict[str, Any]:
        if cfg.dvae.weights:  # e.g. OpenAI's: imported into <run>/dvae/dvae.safetensors first
            from pipeline.storage.weights import DVAE_FILE, saved

            if not saved(join(cfg.path("dvae"), DVAE_FILE)):
                from pipeline.dvae.openai import import_weights

                import_weights(cfg)
        ray_seam.init_ray(cfg)
        return run_tokenize(cfg, encoder_spec(cfg))

    return timed(run)


def export(cfg: Config) -> dict[str, Any]:
    """Token shards → clip-retrieval's layout."""
    from pipeline.tokenize.export import export_clip_retrieval

    return timed(lambda: _on_worker(cfg, "export (one CPU)", _ONE_CPU,
                                    lambda c: export_clip_retrieval(c.path("tokens"), c.path("clip_retrieval"),
                                                                    c.tokenize.export_index,
                                                                    c.tokenize.export_index_memory)))


def dedup(cfg: Config) -> dict[str, Any]:
    """Near-duplicates among the token shards' CLIP image embeddings → the side table ``<tokens>/_dedup``."""
    from pipeline.curate.dedup import run_dedup

    return timed(lambda: _on_worker(cfg, "dedup (one CPU)", _ONE_CPU, run_dedup))


def forget(cfg: Config, files: dict[str, str], max_in_flight: int = 4, in_process: bool = False) -> dict[str, Any]:
    """A takedown list → every matching row removed from the run's shards (one Ray task per affected shard id, at
    most ``max_in_flight`` at once), the takedown record, the checkpoints that consumed them."""
    from pipeline.forget.run import in_process as here
    from pipeline.forget.run import run_forget

    if in_process:
        return timed(lambda: run_forget(cfg, files, here))
    from pipeline.runtime import ray_seam

    ray_seam.init_ray(cfg)

    def parallel(fn: Callable[..., Any], items: list[Any], done: Callable, failed: Callable) -> None:
        submit = ray_seam.task(fn, num_cpus=1)
        ray_seam.run_bounded(lambda item, attempt: submit(item), items, max_in_flight, 2, done, failed,
                             name=lambda job: f"shard {job.shard if hasattr(job, 'shard') else job.shards[0]:05d}")

    return timed(lambda: run_forget(cfg, files, parallel))


def import_embeddings(cfg: Config) -> dict[str, Any]:
    """Published embeddings (clip-retrieval layout) → token shards without image tokens."""
    from pipeline.curate.imports import run_import

    return timed(lambda: _on_worker(cfg, "import-embeddings (one CPU)", _ONE_CPU, run_import))


def train_prior(cfg: Config) -> dict[str, Any]:
    """Either prior (``prior.kind``) on ``prior.num_procs`` ranks (deepspeed launcher or Ray Train)."""
    _check_tracking(cfg)
    from pipeline.prior.train import launch

    return timed(lambda: launch(cfg))


def train_decoder(cfg: Config) -> dict[str, Any]:
    """DALL-E 2's decoder (CLIP image embedding → pixels) on ``decoder.num_procs`` ranks, the priors' engine."""
    _check_tracking(cfg)
    from pipeline.decoder.train import launch

    return timed(lambda: launch(cfg))


def export_prior(cfg: Config) -> dict[str, Any]:
    """A prior checkpoint (default: the newest complete one) → consolidated ``<tag>/model.safetensors``."""
    from pipeline.prior.checkpoints import export_weights

    return timed(lambda: _on_worker(cfg, "export-prior (one CPU)", _ONE_CPU,
                                    lambda c: {"model": export_weights(c.path("prior"))}))


def eval_prior(cfg: Config) -> dict[str, Any]:
    """The diffusion prior on held-out rows: its headline figures, and where the full result and grid are."""
    from pipeline.prior.eval import eval_prior_summary

    return timed(lambda: _on_worker(cfg, "prior.cpus_per_worker / gpus_per_worker / resources (eval-prior)",
                                    cfg.prior.request(), eval_prior_summary))


def eval_decoder(cfg: Config) -> dict[str, Any]:
    """DALL-E 2's decoder on held-out rows: images from the true and the prior's embedding, scored against random
    dataset images; the headline figures, and where the full result and the reconstruction grid are."""
    from pipeline.decoder.eval import eval_decoder_summary

    return timed(lambda: _on_worker(cfg, "decoder.cpus_per_worker / gpus_per_worker / resources (eval-decoder)",
                                    cfg.decoder.request(), eval_decoder_summary))


def sample(cfg: Config) -> dict[str, Any]:
    """Captions → images with the autoregressive prior, CLIP-reranked; the records under ``<report>/``."""
    from pipeline.sample.run import run_sample

    if cfg.sample.num_workers > 1:  # the draws fan out over workers; this process keeps the records
        return timed(lambda: run_sample(cfg)[0])
    return timed(lambda: _on_worker(cfg, "sample.cpus_per_worker / gpus_per_worker / resources", cfg.sample.request(),
                                    lambda c: run_sample(c)[0]))


def report(cfg: Config) -> dict[str, Any]:
    """The run report (report.md, report.html) from what the stages left in the run's storage."""
    from pipeline.report.build import run_report

    return timed(lambda: _on_worker(cfg, "report (one CPU)", _ONE_CPU, run_report))


def plan(cfg: Config, samples: int, gpus: int, gpu_mem_gb: float = 80.0) -> dict[str, Any]:
    """The capacity plan: storage, hours and GPU memory per stage (arithmetic on the config: nothing runs)."""
    from pipeline.capacity import plan as capacity_plan

    return timed(lambda: capacity_plan(cfg, samples, gpus, gpu_mem_gb=gpu_mem_gb))


def demo(cfg: Config) -> dict[str, Any]:
    """Every stage on the embedded dataset served over loopback HTTP, then the report."""
    from pipeline.demo.run import run_demo

    return run_demo(cfg)
