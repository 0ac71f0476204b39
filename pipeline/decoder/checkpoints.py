"""The decoder's weights: the shape a config and its data give, and the one loader of its ``model.safetensors`` (the
priors' format, kind ``decoder``: EMA weights in ``state_dict``, the trained ones in ``raw_state_dict``), which refuses
a prior given in its place, as the priors' loader refuses a decoder."""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.decoder.model import Decoder, DecoderShape
from pipeline.errors import InputError, NotFoundError
from pipeline.prior.checkpoints import DECODER_REEXPORT, export_weights, read_weights
from pipeline.storage import weights as store
from pipeline.storage.urls import join

log = logging.getLogger(__name__)


def decoder_shape(cfg: Any, meta: dict[str, Any], image_size: int) -> DecoderShape:
    """The U-Net of the ``decoder`` section over the token shards' CLIP width and (caption conditioning) BPE vocab."""
    d = cfg.decoder
    mult, levels = d.levels()
    text = {"text_vocab": int(meta["tokenizer"]["vocab_size"]), "text_len": d.text_len,
            "text_layers": d.text_layers} if d.caption else {}
    return DecoderShape(image_size=image_size, embed_dim=int(meta["embed_dim"]), channels=d.channels,
                        channel_mult=mult, num_res_blocks=d.num_res_blocks, attention_levels=levels,
                        head_channels=d.head_channels, context_tokens=d.context_tokens, context_dim=d.context_dim,
                        dropout=d.dropout, timesteps=d.timesteps, prediction=d.prediction, **text)


def load_decoder(path: str) -> tuple[Decoder, dict[str, Any]]:
    """(decoder in eval mode with its EMA weights, the tokens_meta it was trained on) from a decoder
    ``model.safetensors``."""
    blob = read_weights(path, "decoder")
    try:
        model = Decoder(DecoderShape.from_dict(blob["shape"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{store.config_path(path)}: shape {blob['shape']} is not a decoder's ({exc})") from exc
    store.fit(model, blob["state_dict"], path)
    return model.eval(), dict(blob.get("tokens_meta") or {})


def decoder_weights(cfg: Any) -> str:
    """The decoder weights ``sample.decoder_checkpoint`` means: empty → ``<decoder>/model.safetensors``; a file; a
    complete checkpoint folder (``<decoder>/stepNNNNNNNN``), consolidated into ``<folder>/model.safetensors`` on
    first use."""
    ckpt = cfg.sample.decoder_checkpoint
    if not ckpt:
        path = join(cfg.path("decoder"), store.MODEL_FILE)  # the run's storage: a folder or a URL
        return store.require(path, f"{path}: no decoder weights (train-decoder writes them at the end); run "
                                   "train-decoder or set sample.decoder_checkpoint", DECODER_REEXPORT)
    if os.path.isdir(ckpt):
        folder = os.path.abspath(ckpt).rstrip(os.sep)
        weights = os.path.join(folder, store.MODEL_FILE)
        if os.path.isfile(os.path.join(folder, "complete.json")):
            if not store.saved(weights):
                log.info("sample: consolidating decoder checkpoint %s", folder)
                export_weights(*os.path.split(folder))
            return weights
        if store.saved(weights) or os.path.isfile(store.legacy_path(weights)):
            return store.require(weights, "", DECODER_REEXPORT)
        raise InputError(f"sample.decoder_checkpoint {ckpt}: a folder with neither complete.json nor "
                         f"{store.MODEL_FILE}")
    if os.path.isfile(ckpt):
        return ckpt
    raise NotFoundError(f"sample.decoder_checkpoint {ckpt}: no such file or folder")
