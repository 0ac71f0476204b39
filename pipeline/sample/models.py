"""The models sampling uses, found and checked before anything is drawn: ``load_sampler_prior`` finds the
autoregressive prior's weights (``<prior>/model.safetensors``, such a file, or a DeepSpeed checkpoint folder exported
on the fly) and refuses one that does not fit the run's tokenizer and dVAE; ``check_models`` checks the dVAE and
tokenizer actually loaded against the prior."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.dvae.model import DVAE
from pipeline.errors import InputError, NotFoundError
from pipeline.prior.checkpoints import PRIOR_REEXPORT, export_weights, load_prior
from pipeline.prior.transformer import DalleTransformer, PriorShape
from pipeline.storage import weights as store
from pipeline.storage.commit import fs_and_path
from pipeline.storage.urls import exists, join

log = logging.getLogger(__name__)


def load_sampler_prior(cfg: Any) -> tuple[DalleTransformer, dict[str, Any], str]:
    """(model in eval mode, its tokens_meta, the weights file it came from) for ``sample.checkpoint``:

    * empty: ``<prior>/model.safetensors``, the weights train-prior writes at the end;
    * a file: that ``.safetensors`` (an earlier version's ``.pt`` is refused with how to re-export it);
    * a DeepSpeed checkpoint folder (holding ``complete.json``, e.g. ``<prior>/step00000600``, any ZeRO stage and
      world size): consolidated offline by ``prior_ckpt.export_weights`` into ``<folder>/model.safetensors`` (an
      export already there is reused), then loaded; a folder holding weights but no complete.json (a prior output
      folder) loads them.

    Raises FileNotFoundError for a missing checkpoint and ValueError (naming the path) for a file that is not an
    autoregressive prior or whose vocabularies / grid disagree with its own shape or with the run's token shards
    and dVAE.
    """
    path = _sampler_weights(cfg)
    model, meta = load_prior(path, "ar")
    check_tokens_meta(model.shape, meta, path)
    for what, expected, where in _run_reference(cfg):
        got = _meta_value(meta, what)
        if got is not None and expected is not None and int(got) != int(expected):
            raise InputError(f"{path}: {_WHAT[what]} mismatch: the checkpoint was trained with {int(got)}, "
                             f"this run's {where} has {int(expected)}; sample with the run it was trained on, "
                             "or point sample.checkpoint at a prior of this run")
    return model, meta, path


_WHAT = {"text_vocab": "tokenizer vocabulary size", "image_vocab": "dVAE vocabulary size",
         "grid": "image token grid"}


def _sampler_weights(cfg: Any) -> str:
    """The weights (a path or URL) ``sample.checkpoint`` means (exporting a DeepSpeed checkpoint folder first)."""
    ckpt = cfg.sample.checkpoint
    if not ckpt:
        path = join(cfg.path("prior"), store.MODEL_FILE)
        return store.require(path, f"{path}: no prior weights (train-prior writes them at the end); run train-prior "
                                   f"or set sample.checkpoint to a {store.MODEL_FILE} or a checkpoint folder "
                                   "(<prior>/stepNNNNNNNN)", PRIOR_REEXPORT)
    fs, path = fs_and_path(ckpt)
    if fs.isdir(path):
        folder = ckpt.rstrip("/")
        if exists(join(folder, "complete.json")):
            exported = join(folder, store.MODEL_FILE)
            config = store.config_path(f"{path}/{store.MODEL_FILE}")
            if store.saved(exported) and fs.modified(config) >= fs.modified(f"{path}/complete.json"):
                log.info("sample: reusing %s, exported earlier from checkpoint %s", exported, folder)
                return exported
            parent, tag = folder.rsplit("/", 1) if "/" in folder else (".", folder)
            log.info("sample: consolidating DeepSpeed checkpoint %s into %s", folder, exported)
            return export_weights(parent, tag)
        weights = join(folder, store.MODEL_FILE)
        if store.saved(weights) or exists(store.legacy_path(weights)):
            return store.require(weights, "", PRIOR_REEXPORT)
        raise InputError(f"sample.checkpoint {ckpt}: a folder with neither complete.json (not a complete DeepSpeed "
                         f"checkpoint: an interrupted save?) nor {store.MODEL_FILE}")
    if fs.isfile(path):
        return ckpt
    raise NotFoundError(f"sample.checkpoint {ckpt}: no such file or folder")


def _meta_value(meta: dict[str, Any], what: str) -> Any:
    if what == "text_vocab":
        return (meta.get("tokenizer") or {}).get("vocab_size")
    if what == "image_vocab":
        return (meta.get("dvae") or {}).get("vocab_size")
    return meta.get("grid")


def check_tokens_meta(shape: PriorShape, meta: dict[str, Any], path: str) -> None:
    """The checkpoint's model shape agrees with the tokens it records training on."""
    have = {"text_vocab": shape.text_vocab, "image_vocab": shape.image_vocab, "grid": shape.image_grid}
    for what, size in have.items():
        recorded = _meta_value(meta, what)
        if recorded is not None and int(recorded) != size:
            raise InputError(f"{path}: {_WHAT[what]} mismatch: the model has {size}, its tokens_meta records "
                             f"{int(recorded)}")


def _run_reference(cfg: Any) -> list[tuple[str, int | None, str]]:
    """What this run's tokenizer and dVAE say: (what, size, where) from its token shards and its dVAE, for those
    that exist (a checkpoint sampled outside its run has nothing to be checked against here)."""
    from pipeline.storage import commit, schema

    refs: list[tuple[str, int | None, str]] = []
    try:
        fs, folder = commit.fs_and_path(cfg.path("tokens"))
        shards = commit.committed_shards(fs, folder)
        sid = next(iter(shards), 0)
        first = commit.shard_file(folder, sid, ".parquet", shards[sid]) if shards else ""
        meta = schema.read_metadata(fs, first) if shards else None
    except Exception as exc:  # noqa: BLE001 - an unreachable store or an unreadable shard only skips this check
        log.warning("sample: cannot read the run's token shard metadata under %s (%s); tokenizer check skipped",
                    cfg.path("tokens"), exc)
        meta = None
    if meta is not None:
        where = f"token shards ({first})"
        refs += [(w, _meta_value(meta, w), where) for w in ("text_vocab", "image_vocab", "grid")]
    dvae_path = join(cfg.path("dvae"), store.DVAE_FILE)
    if store.saved(dvae_path):
        from pipeline.dvae.model import load_dvae

        try:
            dshape = load_dvae(dvae_path).shape
        except ValueError as exc:  # sampling itself loads it again and reports it properly
            log.warning("sample: cannot read the run's dVAE %s (%s); dVAE check skipped", dvae_path, exc)
        else:
            where = f"dVAE ({dvae_path})"
            refs += [("image_vocab", dshape.vocab_size, where),
                     ("grid", dshape.grid(cfg.download.image_size), f"{where} at download.image_size "
                                                                     f"{cfg.download.image_size}")]
    return refs


def check_models(prior: DalleTransformer, source: str, dvae: DVAE, bpe: Any, image_size: int) -> None:
    """The dVAE and tokenizer actually used for sampling fit the prior (vocabularies and grid)."""
    s = prior.shape
    text_vocab = int(getattr(bpe, "vocab_size", 49408))
    checks = [("text_vocab", s.text_vocab, text_vocab, "CLIP tokenizer"),
              ("image_vocab", s.image_vocab, dvae.shape.vocab_size, "dVAE"),
              ("grid", s.image_grid, dvae.shape.grid(image_size), f"dVAE at image size {image_size}")]
    for what, have, other, name in checks:
        if have != other:
            raise InputError(f"{source}: {_WHAT[what]} mismatch: the prior has {have}, the {name} used for "
                             f"sampling has {other}")


def load_run_clip(cfg: Any, meta: dict[str, Any]) -> Any:
    """The CLIP a model's tokens_meta records (the one its embeddings came from), else the run's own."""
    from pipeline.clip import model as clip_lib

    clip_meta = meta.get("clip") or {}
    if clip_meta.get("arch"):
        return clip_lib.load_clip(clip_meta["arch"], clip_meta.get("pretrained") or "")
    return clip_lib.load_clip(clip_lib.clip_arch(cfg), cfg.clip.pretrained)
