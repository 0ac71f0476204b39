"""DALL-E 2's sampling chains, for ``python -m pipeline sample`` (``sample.chain``):

* ``dalle2``: caption → CLIP text embedding → diffusion prior → CLIP image embedding → decoder (DDIM / DDPM,
  classifier-free guidance) → ``sample.candidates`` images per caption → CLIP rerank by similarity to the caption;
* ``variations``: an input image → its CLIP image embedding → the decoder → new images of the same content,
  reranked by CLIP similarity to the input image.

Both return what the DALL-E 1 path returns (``CaptionSamples`` best first, and stats), so ``pipeline.sample.run``
writes the same records (samples.parquet/json, per-caption grids, CLIP scores). Every model is loaded and checked
against the others before anything is drawn: one CLIP space, one embedding width, one tokenizer.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.clip import model as clip_lib
from pipeline.decoder.checkpoints import decoder_weights, load_decoder
from pipeline.decoder.model import Decoder, pixels_to_uint8
from pipeline.errors import InputError, NotFoundError
from pipeline.prior.checkpoints import PRIOR_REEXPORT, load_prior
from pipeline.prior.diffusion import DiffusionPrior
from pipeline.prior.transformer import pad_text
from pipeline.sample.draw import CaptionSamples, encode_captions, rerank, rerank_stats
from pipeline.sample.models import load_run_clip
from pipeline.storage import weights as store
from pipeline.storage.urls import join

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
Drawer = Callable[[Any, list[str], int], tuple[list[CaptionSamples], dict[str, Any]]]


def chain(cfg: Any, captions: Callable[[Any], list[str]]) -> tuple[Drawer, list[str]]:
    """(the drawer of ``sample.chain``, its inputs: the captions, or the variation images' paths)."""
    if cfg.sample.chain == "dalle2":
        return draw_dalle2, captions(cfg)
    return draw_variations, variation_inputs(cfg.sample.variations)


def diffusion_prior_weights(cfg: Any) -> str:
    """``sample.diffusion_checkpoint``, else the demo's ``<run_dir>/prior_diffusion/model.safetensors``, else
    ``<prior>/model.safetensors`` (a prior trained with ``prior.kind=diffusion``)."""
    if cfg.sample.diffusion_checkpoint:
        if not os.path.isfile(cfg.sample.diffusion_checkpoint):
            raise NotFoundError(f"sample.diffusion_checkpoint {cfg.sample.diffusion_checkpoint}: no such file")
        return cfg.sample.diffusion_checkpoint
    for folder in (cfg.path("prior_diffusion"), cfg.path("prior")):  # the run's storage: folders or URLs
        if store.saved(join(folder, store.MODEL_FILE)):
            return join(folder, store.MODEL_FILE)
    return store.require(join(cfg.path("prior_diffusion"), store.MODEL_FILE),
                         f"{cfg.path('prior_diffusion')}/{store.MODEL_FILE}: no diffusion prior (train-prior "
                         "prior.kind=diffusion writes one); or set sample.diffusion_checkpoint", PRIOR_REEXPORT)


def candidates(sc: Any) -> int:
    """Images decoded per input: ``sample.decoder_candidates``, else ``sample.candidates``."""
    return sc.decoder_candidates or sc.candidates


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_decoder_and_clip(cfg: Any) -> tuple[Decoder, dict[str, Any], str, Any]:
    path = decoder_weights(cfg)
    decoder, meta = load_decoder(path)
    bundle = load_run_clip(cfg, meta)
    if bundle.embed_dim != decoder.shape.embed_dim:
        raise InputError(f"{path}: the decoder was built for {decoder.shape.embed_dim}-d CLIP embeddings, the CLIP "
                         f"it samples with ({bundle.arch}) gives {bundle.embed_dim}-d")
    return decoder.to(_device()), meta, path, bundle


def check_pair(prior: DiffusionPrior, prior_meta: dict[str, Any], prior_path: str, decoder: Decoder,
               decoder_meta: dict[str, Any], decoder_path: str) -> None:
    """The prior's output is the decoder's input: same CLIP, same width."""
    if prior.shape.embed_dim != decoder.shape.embed_dim:
        raise InputError(f"{decoder_path}: the decoder was built for {decoder.shape.embed_dim}-d CLIP embeddings, the "
                         f"diffusion prior {prior_path} predicts {prior.shape.embed_dim}-d ones")
    a, b = prior_meta.get("clip"), decoder_meta.get("clip")
    if a and b and a != b:
        raise InputError(f"{decoder_path}: trained on embeddings of CLIP {b}, the diffusion prior {prior_path} on "
                         f"CLIP {a}: their embedding spaces differ")


def decode_images(decoder: Decoder, emb: torch.Tensor, text: torch.Tensor | None, cfg: Any, gen: torch.Generator,
            batch: int = 64) -> np.ndarray:
    sc, out = cfg.sample, []
    for i in range(0, len(emb), batch):
        part = None if text is None else text[i: i + batch]
        out.append(pixels_to_uint8(decoder.sample(emb[i: i + batch], part, steps=sc.decoder_steps,
                                                  sampler=sc.decoder_sampler, guidance_scale=sc.decoder_guidance_scale,
                                                  eta=sc.decoder_eta, generator=gen)))
    return np.concatenate(out)


def _settings(cfg: Any, decoder_path: str) -> dict[str, Any]:
    sc = cfg.sample
    return {"chain": sc.chain, "decoder_checkpoint": decoder_path, "decoder_sampler": sc.decoder_sampler,
            "decoder_steps": sc.decoder_steps, "decoder_guidance_scale": sc.decoder_guidance_scale}


@torch.no_grad()
def draw_dalle2(cfg: Any, captions: list[str], seed: int) -> tuple[list[CaptionSamples], dict[str, Any]]:
    """``sample.candidates`` images per caption through prior and decoder, CLIP-reranked (best first)."""
    sc, dev = cfg.sample, _device()
    prior_path = diffusion_prior_weights(cfg)
    prior, prior_meta = load_prior(prior_path, "diffusion")
    decoder, decoder_meta, decoder_path, bundle = load_decoder_and_clip(cfg)
    check_pair(prior, prior_meta, prior_path, decoder, decoder_meta, decoder_path)
    prior = prior.to(dev)
    bpe = getattr(bundle.tokenizer, "tokenizer", bundle.tokenizer)
    ids, caption_stats = encode_captions(bpe, captions, prior.shape.text_len)
    k = candidates(sc)
    text_emb = torch.from_numpy(clip_lib.encode_texts(bundle, captions))
    gen = torch.Generator(dev).manual_seed(seed)
    t0 = time.time()
    prior_text = pad_text(ids, prior.shape.text_len, prior.shape.text_vocab).repeat_interleave(k, 0).to(dev)
    image_emb = prior.sample(prior_text, text_emb.repeat_interleave(k, 0).to(dev), steps=sc.diffusion_steps,
                             sampler=sc.diffusion_sampler, guidance_scale=sc.guidance_scale,
                             candidates=sc.diffusion_candidates, generator=gen)  # one draw per candidate image
    prior_s = time.time() - t0
    s = decoder.shape
    dec_text = pad_text([t[: s.text_len] for t in ids], s.text_len, s.text_vocab).repeat_interleave(k, 0).to(dev) \
        if s.conditioned_on_text else None
    images = decode_images(decoder, image_emb, dec_text, cfg, gen)
    decode_s = time.time() - t0 - prior_s
    scores = np.einsum("ckd,cd->ck", clip_lib.encode_images(bundle, images).reshape(len(captions), k, -1),
                       text_emb.numpy())
    out = rerank(captions, images.reshape(len(captions), k, *images.shape[1:]), scores, sc.keep)
    stats = {"chain": "dalle2", "captions": len(captions), "samples": len(images), "generate_s": prior_s + decode_s,
             "prior_s": prior_s, "decoder_s": decode_s, "images_per_s": len(images) / max(decode_s, 1e-9),
             "checkpoint": prior_path, "record_settings": _settings(cfg, decoder_path), **caption_stats,
             **rerank_stats(out)}
    return out, stats


def variation_inputs(entries: list[str]) -> list[str]:
    """The image files ``sample.variations`` names (a folder adds its images, sorted)."""
    out: list[str] = []
    for entry in entries:
        if os.path.isdir(entry):
            out += sorted(os.path.join(entry, n) for n in os.listdir(entry) if n.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(entry):
            out.append(entry)
        else:
            raise NotFoundError(f"sample.variations {entry}: no such image file or folder")
    if not out:
        raise NotFoundError(f"sample.variations {entries}: no input images found")
    return out


def read_input_image(path: str, size: int) -> np.ndarray:
    """An input image as (size, size, 3) uint8: centre-cropped to a square and resized; one that cannot be decoded
    raises ``InputError`` naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(io.BytesIO(f.read()))
            img = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise InputError(f"{path}: cannot decode the image for variations ({type(exc).__name__}: {exc})") from exc
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


@torch.no_grad()
def draw_variations(cfg: Any, paths: list[str], seed: int) -> tuple[list[CaptionSamples], dict[str, Any]]:
    """``sample.candidates`` variations per input image, reranked by CLIP similarity to the input's embedding."""
    sc, dev = cfg.sample, _device()
    decoder, _, decoder_path, bundle = load_decoder_and_clip(cfg)
    s, k = decoder.shape, candidates(sc)
    inputs = np.stack([read_input_image(p, s.image_size) for p in paths])  # every file checked before drawing
    emb = torch.from_numpy(clip_lib.encode_images(bundle, inputs))
    gen = torch.Generator(dev).manual_seed(seed)
    # No caption: the empty one, the condition the decoder was trained with caption_drop of the time.
    text = pad_text([[]] * len(paths) * k, s.text_len, s.text_vocab).to(dev) if s.conditioned_on_text else None
    t0 = time.time()
    images = decode_images(decoder, emb.repeat_interleave(k, 0).to(dev), text, cfg, gen)
    decode_s = time.time() - t0
    scores = np.einsum("ckd,cd->ck", clip_lib.encode_images(bundle, images).reshape(len(paths), k, -1), emb.numpy())
    names = [f"variations of {os.path.basename(p)}" for p in paths]
    out = rerank(names, images.reshape(len(paths), k, *images.shape[1:]), scores, sc.keep)
    stats = {"chain": "variations", "captions": len(paths), "samples": len(images), "generate_s": decode_s,
             "images_per_s": len(images) / max(decode_s, 1e-9), "checkpoint": decoder_path,
             "inputs": list(paths), "record_settings": _settings(cfg, decoder_path), **rerank_stats(out)}
    return out, stats
