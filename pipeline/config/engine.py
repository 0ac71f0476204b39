"""What every model trained on the one DeepSpeed engine configures the same way (``prior:``, ``diffusion:`` and
``decoder:`` sections): optimizer and schedule, ZeRO, precision, offload, launcher, streaming loader, checkpoints and
logging. A section subclasses ``EngineConfig`` and names itself in ``SECTION`` for its error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.config.checks import check as _check
from pipeline.config.placement import TrainerPlacement

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass
class EngineConfig(TrainerPlacement):
    SECTION: ClassVar[str] = "prior"

    steps: int = 600
    """Optimizer steps to train."""
    micro_batch_size: int = 32
    """Rows per rank per forward/backward pass (DeepSpeed train_micro_batch_size_per_gpu)."""
    gradient_accumulation_steps: int = 1
    """Micro batches accumulated per optimizer step; global batch = micro × accumulation × ranks."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear schedules)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up from 0."""
    lr_schedule: str = "cosine"
    """cosine (to min_lr_ratio × lr), linear (to min_lr_ratio × lr) or constant, after a linear warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (fp16 with DeepSpeed's dynamic loss scaling)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
    offload_optimizer: str = "none"
    """ZeRO offload of optimizer state: none, cpu or nvme (stage 1-3; nvme needs stage 3 and nvme_path)."""
    offload_param: str = "none"
    """ZeRO-3 offload of parameters: none, cpu or nvme."""
    nvme_path: str = ""
    """Local folder for NVMe offload (offload_optimizer / offload_param: nvme)."""
    num_procs: int = 2
    """Ranks started by the deepspeed launcher (CPU ranks on a CPU machine), or Ray Train workers."""
    ds_config: str = ""
    """A DeepSpeed config JSON applied over the one built from these keys (its values win, nested sections merge)."""
    shuffle_buffer: int = 4096
    """Rows shuffled together by the streaming loader (whole row-group slices are drawn into the buffer)."""
    loader_unit_rows: int = 1024
    """Rows per loader unit: row groups are cut into slices of at most this many rows, dealt out to ranks."""
    filter: str = ""
    """The rows this run trains on: a DuckDB SQL condition over any token-shard column (and the dedup side table's
    duplicate_of/cluster/cosine), e.g. "clip_similarity >= 0.28 and punsafe < 0.1 and duplicate_of is null";
    evaluated once into the run's frozen data plan, kept/dropped per clause in data_filter.json. Empty: every row."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end). The newest complete checkpoint is what a rerun resumes."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints kept; older ones are deleted after a new one commits."""
    resume: str = "auto"
    """auto: resume the newest complete checkpoint if there is one; require: refuse to start without one;
    never: refuse to start if the folder already holds a checkpoint."""
    record_keys: bool = False
    """Write every consumed sample key per rank (keys.rank<R>.txt): an audit of exactly-once consumption."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0: looked up for known GPUs (none on CPU, MFU not reported)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under <output>/tensorboard as well as metrics.jsonl."""
    log_every: int = 20
    """Steps between metrics.jsonl lines, TensorBoard scalars and the console progress line."""
    output: str = ""
    """Checkpoint folder; empty means the section's default folder under run_dir."""

    def _check_engine(self) -> None:
        s = self.SECTION
        if self.filter:
            from pipeline.curate.filter import check_syntax  # its syntax lives with the code that evaluates it

            check_syntax(self.filter, f"{s}.filter")  # a syntax error stops the command before any work
        for name in ("steps", "micro_batch_size", "num_procs", "log_every", "gradient_accumulation_steps",
                     "shuffle_buffer", "loader_unit_rows", "keep_checkpoints"):
            _check(getattr(self, name) > 0, f"{s}.{name}", "must be > 0")
        _check(self.lr > 0, f"{s}.lr", "must be > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{s}.min_lr_ratio", "must be in [0, 1]")
        _check(self.lr_schedule in ("cosine", "linear", "constant"), f"{s}.lr_schedule",
               "must be cosine, linear or constant")
        for name in ("warmup_steps", "weight_decay", "gradient_clipping", "save_every", "peak_tflops"):
            _check(getattr(self, name) >= 0, f"{s}.{name}", "must be >= 0")
        _check(self.zero_stage in (0, 1, 2, 3), f"{s}.zero_stage", "must be 0, 1, 2 or 3")
        _check(self.precision in ("fp32", "bf16", "fp16"), f"{s}.precision", "must be fp32, bf16 or fp16")
        self.check_placement(s)
        _check(self.resume in ("auto", "require", "never"), f"{s}.resume", "must be auto, require or never")
        for name in ("offload_optimizer", "offload_param"):
            _check(getattr(self, name) in OFFLOAD_DEVICES, f"{s}.{name}", "must be none, cpu or nvme")
        _check(self.offload_optimizer == "none" or self.zero_stage >= 1, f"{s}.offload_optimizer",
               f"needs {s}.zero_stage >= 1")
        _check(self.offload_param == "none" or self.zero_stage == 3, f"{s}.offload_param", f"needs {s}.zero_stage 3")
        nvme = "nvme" in (self.offload_optimizer, self.offload_param)
        _check(not nvme or bool(self.nvme_path), f"{s}.nvme_path", "must be set for nvme offload")
        _check(self.offload_optimizer != "nvme" or self.zero_stage == 3, f"{s}.offload_optimizer",
               f"nvme needs {s}.zero_stage 3")
