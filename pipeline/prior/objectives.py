"""What the one training engine runs for each kind of prior: the model plus its loss, behind one interface.

``prior.kind: ar`` is DALL-E 1's transformer over text + image tokens; ``prior.kind: diffusion`` is DALL-E 2's diffusion
prior from CLIP text to CLIP image embeddings. Both objectives take the loader's batch tensors and a per-step
``torch.Generator`` (every random draw — caption dropout, noise, timesteps — comes from it, so a resumed run draws the
same), return the scalar loss, and keep the split losses of the last call in ``parts`` for logging. They are the
module DeepSpeed wraps, so ZeRO-3's hooks see every parameter use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.prior.diffusion import DiffusionPrior, DiffusionShape
from pipeline.prior.transformer import DalleTransformer, PriorShape, drop_captions
from pipeline.training import ema as ema_lib
from pipeline.training.ema import EMA


class ARObjective(nn.Module):
    kind = "ar"
    needs_embeddings = False

    def __init__(self, model: DalleTransformer, text_loss_weight: float, caption_dropout: float):
        super().__init__()
        self.model = model
        self.text_loss_weight, self.caption_dropout = text_loss_weight, caption_dropout
        self.parts: dict[str, float] = {}

    def forward(self, text: torch.Tensor, image: torch.Tensor, generator: torch.Generator | None = None,
                **_: Any) -> torch.Tensor:
        if self.caption_dropout and generator is not None:
            text = drop_captions(text.cpu(), self.caption_dropout, self.model.shape.text_vocab, generator).to(
                image.device)
        total, image_loss, text_loss = self.model.loss_parts(text, image, self.text_loss_weight)
        self.parts = {"image_loss": float(image_loss.detach())}
        if text_loss is not None:
            self.parts["text_loss"] = float(text_loss.detach())
        return total


class DiffusionObjective(nn.Module):
    kind = "diffusion"
    needs_embeddings = True

    def __init__(self, model: DiffusionPrior, cond_drop: float):
        super().__init__()
        self.model, self.cond_drop = model, cond_drop
        self.parts: dict[str, float] = {}

    def forward(self, text: torch.Tensor, image: torch.Tensor, text_emb: torch.Tensor, image_emb: torch.Tensor,
                valid: torch.Tensor, generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        loss, parts = self.model.loss_parts(text, text_emb, image_emb, valid=valid, cond_drop=self.cond_drop,
                                            generator=generator)
        self.parts = {k: float(v) for k, v in parts.items()}
        return loss


def prior_shape(cfg: Config, meta: dict[str, Any]) -> PriorShape | DiffusionShape:
    """The model shape from the config and the token shards' metadata (vocabularies, grid, embedding width)."""
    p = cfg.prior
    if p.kind == "diffusion":
        return DiffusionShape(text_vocab=int(meta["tokenizer"]["vocab_size"]), text_len=p.text_len,
                              embed_dim=int(meta["embed_dim"]), n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd,
                              dropout=p.dropout, timesteps=p.timesteps)
    if not int(meta.get("grid") or 0):
        source = (meta.get("preprocess") or {}).get("imported_from") or "published embeddings"
        raise DataError(f"{cfg.path('tokens')}: these token shards have no image tokens (imported from {source} by "
                        "import-embeddings); the autoregressive prior trains on image tokens. Train the diffusion "
                        "prior on them (prior.kind=diffusion), or tokenize the images")
    attention = tuple(p.layer_attention())
    return PriorShape(text_vocab=int(meta["tokenizer"]["vocab_size"]), text_len=p.text_len,
                      image_vocab=int(meta["dvae"]["vocab_size"]), image_grid=int(meta["grid"]),
                      n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, dropout=p.dropout,
                      attention=() if set(attention) == {"dense"} else attention, conv_kernel=p.conv_kernel)


def build_objective(cfg: Config, shape: PriorShape | DiffusionShape) -> ARObjective | DiffusionObjective:
    p = cfg.prior
    if isinstance(shape, DiffusionShape):
        return DiffusionObjective(DiffusionPrior(shape, activation_checkpointing=p.activation_checkpointing),
                                  p.caption_dropout)
    return ARObjective(DalleTransformer(shape, activation_checkpointing=p.activation_checkpointing),
                       p.text_loss_weight, p.caption_dropout)


def make_ema(cfg: Config, objective: nn.Module) -> EMA | None:
    """EMA of the diffusion prior's weights (fp32, outside the engine so bf16 training never rounds it)."""
    if cfg.prior.kind != "diffusion" or cfg.prior.ema_decay <= 0:
        return None
    return EMA(objective.model, decay=cfg.prior.ema_decay)


def update_ema(ema: EMA | None, engine, zero_stage: int) -> None:
    if ema is not None:
        ema_lib.update_ema(ema, engine.module.model, zero_stage)
