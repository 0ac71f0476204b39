"""A prior run's checkpoints and weights: which checkpoint a run resumes from, the consolidated weights it
writes (from the engine at the end, or offline from any saved checkpoint), and the one loader of that file.

The policy (``prior.resume``) is applied before any work: a folder that holds complete checkpoints is never silently
trained from scratch, and a checkpoint is resumed only with the data plan and model shape it was written with.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError, InputError, NotFoundError
from pipeline.prior.diffusion import DiffusionPrior, DiffusionShape
from pipeline.prior.loader import DataPlan
from pipeline.prior.transformer import DalleTransformer, PriorShape
from pipeline.runtime import ds_seam
from pipeline.storage import weights as store
from pipeline.storage.checkpoints import Checkpoints
from pipeline.storage.urls import join, local_copy, read_bytes

KINDS = {"ar": (DalleTransformer, PriorShape), "diffusion": (DiffusionPrior, DiffusionShape)}


@dataclass
class ResumePoint:
    tag: str
    plan: DataPlan
    shape: dict[str, Any]
    state: dict[str, Any]


def find_resume(out: str, policy: str, rank: int = 0, key: str = "prior.resume",
                prefix: str = "[train-prior]") -> ResumePoint | None:
    """The newest complete checkpoint of ``out`` to resume, or None to start fresh, as ``policy`` (config key
    ``key``) allows."""
    tag = Checkpoints(out, prefix).resume_tag(policy, key, rank)
    if tag is None:
        return None
    path = join(out, tag, "train_state.json")
    try:
        state = json.loads(read_bytes(path))
        plan = DataPlan.from_json(state["data_plan"])
    except (OSError, ValueError, KeyError, NotFoundError) as exc:
        raise CheckpointError(f"{path}: unreadable or without a data plan ({exc}); cannot resume exactly") from exc
    return ResumePoint(tag, plan, state["shape"], state)


PRIOR_REEXPORT = ("Re-export it from the run's DeepSpeed checkpoints: `python -m pipeline export-prior` with the run's "
                  "config writes <prior>/stepNNNNNNNN/model.safetensors (sample.checkpoint also takes that folder), "
                  "and rerunning train-prior with the same config rewrites <prior>/model.safetensors without "
                  "training further")
DECODER_REEXPORT = ("Re-export it from the run's DeepSpeed checkpoints: set sample.decoder_checkpoint to a checkpoint "
                    "folder <decoder>/stepNNNNNNNN (consolidated into model.safetensors on first use), or rerun "
                    "train-decoder with the same config, which rewrites <decoder>/model.safetensors without training "
                    "further")


def save_prior(path: str, kind: str, shape: dict[str, Any], weights: dict[str, torch.Tensor], meta: dict[str, Any],
               steps: int, ema_weights: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``model.safetensors`` + ``model.json`` (``{kind, shape, tokens_meta, steps}``) through the one weights
    format. With ``ema_weights`` (the diffusion prior, the decoder) the tensors models load are the EMA ones, the
    ones sampling uses, and the trained ones are kept under ``raw/``."""
    tensors = dict(weights)
    if ema_weights is not None:
        tensors = {**ema_weights, **{f"{store.RAW}{k}": v for k, v in weights.items()}}
    return store.save_weights(path, tensors, {"kind": kind, "shape": shape, "tokens_meta": meta, "steps": steps})


def read_weights(path: str, kind: str) -> dict[str, Any]:
    """The record of a ``model.safetensors`` written by ``save_prior`` (priors, and the decoder with kind
    ``decoder``): its config with ``state_dict`` (and ``raw_state_dict`` where EMA weights are kept), after checking
    it is of ``kind``. No code runs from the files; a file that is unreadable, not such a file, of another kind, or
    an earlier version's ``model.pt`` raises ``InputError`` naming the file and what it is instead."""
    what = "decoder" if kind == "decoder" else "prior"
    tensors, blob = store.load_weights(path, what, DECODER_REEXPORT if kind == "decoder" else PRIOR_REEXPORT)
    if "shape" not in blob:
        raise InputError(f"{store.config_path(path)}: not a prior or decoder config (no shape)")
    blob["state_dict"], raw = store.split_raw(tensors)
    if raw:
        blob["raw_state_dict"] = raw
    got = blob.get("kind")
    if got == "dvae":
        raise InputError(f"{path}: a dVAE checkpoint ({store.DVAE_FILE}), not a prior's {store.MODEL_FILE}; give the "
                         f"prior's weights (<prior>/{store.MODEL_FILE} or a checkpoint folder <prior>/stepNNNNNNNN)")
    if got == kind:
        return blob
    if kind == "decoder":
        raise InputError(f"{path}: a {got!r} prior's weights, not a decoder's; give DALL-E 2's decoder "
                         f"(<run_dir>/decoder/{store.MODEL_FILE}, sample.decoder_checkpoint)")
    if got == "decoder":
        raise InputError(f"{path}: DALL-E 2's decoder (CLIP image embedding → pixels), not a {kind} prior; give "
                         f"the prior's {store.MODEL_FILE} (<run_dir>/prior or prior_diffusion)")
    if got == "diffusion":
        raise InputError(f"{path}: a 'diffusion' prior (it predicts CLIP image embeddings, DALL-E 2's); "
                         "sampling images needs the autoregressive prior (prior.kind=ar, <run_dir>/prior)")
    raise InputError(f"{path}: not a {kind} prior (kind={got!r})")


def load_prior(path: str, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """The one loader of ``model.safetensors`` for either prior (``kind`` ar or diffusion): (model in eval mode,
    tokens_meta).

    A file that is unreadable, not a prior, a prior of the other kind, a decoder, or whose weights do not fit its
    recorded shape raises ``InputError`` naming the file."""
    blob = read_weights(path, kind)
    model_cls, shape_cls = KINDS[kind]
    try:
        model = model_cls(shape_cls(**blob["shape"]))
    except (TypeError, ValueError) as exc:
        what = "an autoregressive" if kind == "ar" else "a diffusion"
        raise InputError(f"{store.config_path(path)}: shape {blob['shape']} is not {what} prior's ({exc})") from exc
    store.fit(model, blob["state_dict"], path)
    return model.eval(), dict(blob.get("tokens_meta") or {})


def write_weights(engine, zero_stage: int, shape: Any, meta: dict[str, Any], steps: int, path: str,
                  ema: Any = None, kind: str | None = None) -> None:
    """Consolidated fp32 weights (gathered from ZeRO-3 shards when needed) that load without DeepSpeed; for the
    diffusion prior the EMA weights, which sampling uses."""
    state = ds_seam.consolidated_state_dict(engine, zero_stage)
    if state is None:  # not rank 0
        return
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    ema_weights = None if ema is None else with_ema(weights, dict(ema.module.named_buffers()))
    kind = kind or ("diffusion" if isinstance(shape, DiffusionShape) else "ar")
    save_prior(path, kind, asdict(shape), weights, meta, steps, ema_weights)


def export_weights(out: str, tag: str | None = None) -> str:
    """Consolidated fp32 weights of a saved checkpoint (default: the newest complete one) as
    ``<out>/<tag>/model.safetensors``, loadable by ``load_prior`` without DeepSpeed or GPUs, ZeRO-sharded or not."""
    ckpts = Checkpoints(out)
    tag = tag or ckpts.latest()
    if tag is None:
        raise CheckpointError(f"{out}: no complete checkpoint to export")
    ckpts.verify(tag)
    tag_dir = local_copy(ckpts.path(tag))  # DeepSpeed's consolidation reads a local folder
    try:
        state = json.loads(open(os.path.join(tag_dir, "train_state.json")).read())
        stage = json.loads(open(os.path.join(tag_dir, "ds_config.json")).read())["zero_optimization"]["stage"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{tag_dir}: no readable train_state.json/ds_config.json ({exc})") from exc
    if stage == 0:  # plain data parallel: rank 0's model file holds every weight
        module = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)["module"]
    else:  # ZeRO 1-3: DeepSpeed's own offline consolidation of the fp32 partitions
        module = ds_seam.fp32_state_dict_from_checkpoint(os.path.dirname(tag_dir), os.path.basename(tag_dir))
    weights = {k.removeprefix("model."): v.float() for k, v in module.items()}
    ema = _saved_ema(tag_dir)  # the diffusion prior samples with its EMA weights
    return save_prior(ckpts.path(tag, store.MODEL_FILE), state.get("kind", "ar"), state["shape"], weights,
                      state["data_plan"]["meta"], state["step"], None if ema is None else with_ema(weights, ema))


def _saved_ema(tag_dir: str) -> dict[str, torch.Tensor] | None:
    """The EMA buffers a diffusion run saved in its client state (rank 0's model-states file), if any. DeepSpeed's
    own file: it pickles more than tensors, so it is read without ``weights_only``."""
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False).get("ema")


def with_ema(weights: dict[str, torch.Tensor], ema_buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with each parameter replaced by its fp32 EMA (EMA buffers are named like the parameter, '.' → '__');
    the model's own buffers stay as they are."""
    return {k: ema_buffers.get(k.replace(".", "__"), v).float().cpu() for k, v in weights.items()}
