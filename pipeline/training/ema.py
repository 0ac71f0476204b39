"""The exponential moving average of a model's weights that diffusion models sample with (both DALL-E 2 models)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Exponential moving average of a module's parameters, kept as BUFFERS of a small nn.Module (``EMA.module``)
    so a training engine checkpoints it with the model state (DeepSpeed saves buffers; it must not see them as
    parameters). The average is float32 whatever the parameters' dtype: a 0.999 lerp in half precision would lose
    most updates to rounding. Buffer names are parameter names with '.' → '__'."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, _ in model.named_parameters()]
        self.module = nn.Module()
        for name, p in model.named_parameters():
            key = name.replace(".", "__")
            if hasattr(self.module, key) or key == "num_updates":
                raise ValueError(f"EMA: parameter name {name!r} collides with another buffer name")
            self.module.register_buffer(key, p.detach().float().clone())
        self.module.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(model.named_parameters())
        if list(params) != self.names:
            raise ValueError("EMA: the model's parameters differ from the ones the EMA was built from")
        return [p.detach() for p in params.values()], [getattr(self.module, n.replace(".", "__")) for n in self.names]

    def current_decay(self) -> float:
        n = int(self.module.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema ← d · ema + (1 − d) · param, d = ``current_decay()`` (warm-up counts the updates before this one)."""
        params, bufs = self._pairs(model)
        if params and bufs[0].device != params[0].device:
            self.module.to(params[0].device)  # the model moved (e.g. to the GPU) after the EMA was built
            params, bufs = self._pairs(model)
        d = self.current_decay()
        torch._foreach_lerp_(bufs, [p.to(b.dtype) for p, b in zip(params, bufs)], 1.0 - d)
        self.module.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, b in zip(*self._pairs(model)):
            p.copy_(b)

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with EMA weights in place of the parameters (each in its parameter's dtype and
        device), for ``model.load_state_dict(..., strict=True)``. If ``EMA.module`` is attached to ``model`` (so the
        engine saves it), its own buffers are left out: a fresh model has no such keys."""
        own = {id(b) for b in self.module.buffers()}
        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if id(value) in own:
                continue
            if key in params:
                out[key] = getattr(self.module, key.replace(".", "__")).to(value.device, value.dtype).clone()
            else:
                out[key] = value.detach().clone()
        return out


def update_ema(ema: EMA | None, model: nn.Module, zero_stage: int) -> None:
    """One EMA update from a model trained in the engine; under ZeRO-3 its parameters are gathered first (costly,
    but only for models small enough to keep an fp32 average of anyway)."""
    if ema is None:
        return
    if zero_stage == 3:
        from pipeline.runtime import ds_seam

        with ds_seam.gathered(list(model.parameters())):
            ema.update(model)
    else:
        ema.update(model)
