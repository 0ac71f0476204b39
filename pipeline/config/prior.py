"""The prior's typed configuration (``prior:`` section): model shape, DeepSpeed engine, data loader, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.checks import check as _check

PRIOR_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (n_layer, n_head, n_embd). 12b is the DALL-E paper's (64 layers, d_model 3968, 62 heads of 64); the
    # others keep 64-wide heads. With DALL-E's vocabularies (16384 text, 8192 image, 256 + 1024 positions) they
    # count 0.34 B, 1.28 B, 4.18 B and 12.23 B parameters (tests/prior/test_prior_sizes.py).
    "tiny": (4, 4, 128), "350m": (24, 16, 1024), "1.3b": (24, 32, 2048), "4b": (36, 48, 3072), "12b": (64, 62, 3968),
}
ATTENTION_KINDS = ("dense", "row", "column", "conv")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass
class PriorConfig:
    """The DALL-E 1 autoregressive transformer over text + image tokens, trained with DeepSpeed."""

    kind: str = "ar"
    """ar: DALL-E 1's autoregressive transformer over text + image tokens; diffusion: DALL-E 2's diffusion prior from
    the CLIP text embedding (and caption tokens) to the CLIP image embedding. Same engine, loader and checkpoints."""
    size: str = ""
    """A named size (tiny, 350m, 1.3b, 4b, 12b) that sets n_layer, n_head and n_embd; empty: use those keys."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    text_len: int = 16
    dropout: float = 0.0
    attention: str = "dense"
    """Per-layer attention masks, cycled over the layers: comma-separated dense/row/column/conv. 'dalle' is the
    paper's pattern: row,column,row,row repeated, the last layer conv."""
    conv_kernel: int = 11
    """Side of the causal convolutional attention window over the image grid (DALL-E: 11)."""
    text_loss_weight: float = 0.0
    """Share of the loss on caption tokens (DALL-E: 0.125, i.e. 1/8 text and 7/8 image); 0 trains image tokens only."""
    caption_dropout: float = 0.0
    """Probability a training caption is replaced by the empty (all-pad) caption, for classifier-free guidance."""
    timesteps: int = 1000
    """Diffusion steps of the cosine noise schedule (kind: diffusion)."""
    ema_decay: float = 0.999
    """EMA of the diffusion prior's weights, saved with checkpoints and exported for sampling; 0 turns it off."""
    heldout_percent: float = 5.0
    """Diffusion: rows (chosen by key hash) never trained on, for the held-out evaluation."""
    eval_rows: int = 256
    """Diffusion: held-out rows `eval-prior` scores (the first by key)."""
    steps: int = 600
    micro_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    lr_schedule: str = "cosine"
    """cosine (to min_lr_ratio × lr), linear (to min_lr_ratio × lr) or constant, after a linear warm-up."""
    weight_decay: float = 0.01
    gradient_clipping: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off."""
    zero_stage: int = 2
    precision: str = "fp32"
    """fp32, bf16 or fp16 (fp16 with DeepSpeed's dynamic loss scaling)."""
    activation_checkpointing: bool = False
    offload_optimizer: str = "none"
    """ZeRO offload of optimizer state: none, cpu or nvme (stage 1-3; nvme needs stage 3 and nvme_path)."""
    offload_param: str = "none"
    """ZeRO-3 offload of parameters: none, cpu or nvme."""
    nvme_path: str = ""
    num_procs: int = 2
    """Ranks started by the deepspeed launcher (CPU ranks on a CPU machine), or Ray Train workers."""
    launcher: str = "deepspeed"
    """deepspeed: the deepspeed launcher (local or --hostfile); ray: Ray Train's TorchTrainer, num_procs workers."""
    ds_config: str = ""
    """A DeepSpeed config JSON applied over the one built from these keys (its values win, nested sections merge)."""
    shuffle_buffer: int = 4096
    """Rows shuffled together by the streaming loader (whole row-group slices are drawn into the buffer)."""
    loader_unit_rows: int = 1024
    """Rows per loader unit: row groups are cut into slices of at most this many rows, dealt out to ranks."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end). The newest complete checkpoint is what a rerun resumes."""
    keep_checkpoints: int = 2
    resume: str = "auto"
    """auto: resume the newest complete checkpoint if there is one; require: refuse to start without one;
    never: refuse to start if the folder already holds a checkpoint."""
    record_keys: bool = False
    """Write every consumed sample key per rank (keys.rank<R>.txt): an audit of exactly-once consumption."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0: looked up for known GPUs (none on CPU, MFU not reported)."""
    tensorboard: bool = True
    log_every: int = 20
    output: str = ""
    """Checkpoint folder; empty means <run_dir>/prior."""

    def __post_init__(self) -> None:
        if self.size:
            _check(self.size in PRIOR_SIZES, "prior.size", f"must be one of {', '.join(PRIOR_SIZES)}")
            self.n_layer, self.n_head, self.n_embd = PRIOR_SIZES[self.size]
        for name in ("n_layer", "n_head", "n_embd", "text_len", "steps", "micro_batch_size", "num_procs", "log_every",
                     "gradient_accumulation_steps", "conv_kernel", "shuffle_buffer", "loader_unit_rows",
                     "keep_checkpoints"):
            _check(getattr(self, name) > 0, f"prior.{name}", "must be > 0")
        _check(self.n_embd % self.n_head == 0, "prior.n_embd", "must be divisible by prior.n_head")
        _check(0.0 <= self.dropout < 1.0, "prior.dropout", "must be in [0, 1)")
        _check(0.0 <= self.caption_dropout < 1.0, "prior.caption_dropout", "must be in [0, 1)")
        _check(0.0 <= self.text_loss_weight < 1.0, "prior.text_loss_weight", "must be in [0, 1)")
        _check(self.lr > 0, "prior.lr", "must be > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "prior.min_lr_ratio", "must be in [0, 1]")
        _check(self.lr_schedule in ("cosine", "linear", "constant"), "prior.lr_schedule",
               "must be cosine, linear or constant")
        for name in ("warmup_steps", "weight_decay", "gradient_clipping", "save_every", "peak_tflops"):
            _check(getattr(self, name) >= 0, f"prior.{name}", "must be >= 0")
        _check(self.zero_stage in (0, 1, 2, 3), "prior.zero_stage", "must be 0, 1, 2 or 3")
        _check(self.precision in ("fp32", "bf16", "fp16"), "prior.precision", "must be fp32, bf16 or fp16")
        _check(self.kind in ("ar", "diffusion"), "prior.kind", "must be ar or diffusion")
        _check(self.timesteps > 1, "prior.timesteps", "must be > 1")
        _check(0.0 <= self.ema_decay < 1.0, "prior.ema_decay", "must be in [0, 1)")
        _check(0.0 <= self.heldout_percent < 100.0, "prior.heldout_percent", "must be in [0, 100)")
        _check(self.eval_rows > 0, "prior.eval_rows", "must be > 0")
        _check(self.launcher in ("deepspeed", "ray"), "prior.launcher", "must be deepspeed or ray")
        _check(self.resume in ("auto", "require", "never"), "prior.resume", "must be auto, require or never")
        self._check_offload()
        self.layer_attention()  # validates prior.attention

    def _check_offload(self) -> None:
        for name in ("offload_optimizer", "offload_param"):
            _check(getattr(self, name) in OFFLOAD_DEVICES, f"prior.{name}", "must be none, cpu or nvme")
        _check(self.offload_optimizer == "none" or self.zero_stage >= 1, "prior.offload_optimizer",
               "needs prior.zero_stage >= 1")
        _check(self.offload_param == "none" or self.zero_stage == 3, "prior.offload_param", "needs prior.zero_stage 3")
        nvme = "nvme" in (self.offload_optimizer, self.offload_param)
        _check(not nvme or bool(self.nvme_path), "prior.nvme_path", "must be set for nvme offload")
        _check(self.offload_optimizer != "nvme" or self.zero_stage == 3, "prior.offload_optimizer",
               "nvme needs prior.zero_stage 3")

    def layer_attention(self) -> list[str]:
        """The attention kind of each layer."""
        if self.attention == "dalle":
            kinds = [("row", "column", "row", "row")[i % 4] for i in range(self.n_layer)]
            kinds[-1] = "conv"
            return kinds
        cycle = [k.strip() for k in self.attention.split(",")]
        for k in cycle:
            _check(k in ATTENTION_KINDS, "prior.attention",
                   f"unknown kind {k!r}; use 'dalle' or a comma list of {', '.join(ATTENTION_KINDS)}")
        return [cycle[i % len(cycle)] for i in range(self.n_layer)]
