"""The ``dvae:`` section: DALL-E's stage one, trained or imported from OpenAI's ``dall_e`` weights."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.checks import check as _check
from pipeline.config.placement import TrainerPlacement


@dataclass
class DVAEConfig(TrainerPlacement):
    """DALL-E stage-one discrete VAE (Gumbel-softmax relaxation, KL to a uniform prior)."""

    vocab_size: int = 128
    """Codebook size: the number of distinct image tokens (DALL-E: 8192)."""
    n_hid: int = 32
    """Base channel width of the encoder and decoder (DALL-E: 256)."""
    group_count: int = 3
    """Downsampling is 2 ** (group_count - 1): 3 groups turn 32x32 into an 8x8 grid."""
    n_blk_per_group: int = 1
    """Residual blocks in each group (DALL-E: 2)."""
    n_init: int = 128
    """Width of the decoder's first 1x1 convolution (OpenAI: 128)."""
    recon: str = "logit_laplace"
    """Reconstruction cost: logit_laplace (DALL-E's), mse or bce."""
    input_noise: float = 0.0
    """Std of Gaussian noise added to the encoder's input while training (denoising); 0 turns it off."""
    kl_warmup_steps: int = 0
    """Steps over which the KL weight ramps linearly from 0 to kl_weight."""
    weights: str = ""
    """Empty: train our own. 'openai': load OpenAI's dall_e encoder_path/decoder_path. Else: a dvae.safetensors."""
    encoder_path: str = ""
    """OpenAI encoder.pkl (local path or http(s) URL), for weights: openai."""
    decoder_path: str = ""
    """OpenAI decoder.pkl (local path or http(s) URL), for weights: openai."""
    steps: int = 1500
    """Optimizer steps to train."""
    batch_size: int = 64
    """Images per optimizer step, split over the ranks."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, via DeepSpeed), after warmup_steps."""
    temp_start: float = 1.0
    """Gumbel-softmax temperature at step 0, annealed to temp_end."""
    temp_end: float = 0.0625
    """Gumbel-softmax temperature at the last step (DALL-E: 1/16)."""
    kl_weight: float = 1e-3
    """Weight of the KL divergence to the uniform prior over codes (reached after kl_warmup_steps)."""
    output: str = ""
    """Checkpoint folder; empty means <run_dir>/dvae."""
    num_procs: int = 1
    """Ranks started by the deepspeed launcher (CPU ranks on a CPU machine); batch_size is split between them."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0, 1 or 2 (the dVAE is small; stage 3 is not offered)."""
    bf16: bool = False
    """Train in bfloat16 (DeepSpeed bf16); false: fp32."""
    warmup_steps: int = 10
    """Learning-rate warm-up steps before the cosine decay to lr / 20."""
    log_every: int = 10
    """Steps between metrics.jsonl lines (and TensorBoard scalars): losses averaged over the steps and ranks."""
    save_every: int = 250
    """Steps between DeepSpeed checkpoints (one is always written at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints kept in the output folder; 0 keeps every one."""
    resume: bool = True
    """Continue from the output folder's latest complete checkpoint if it has one; false starts over (and deletes
    the folder's earlier checkpoints, metrics and weights)."""
    grid_every: int = 100
    """Steps between held-out reconstruction grids recon_step{N:06d}.png and evaluations; 0: only at the end."""
    heldout_images: int = 64
    """Images held out of training for evaluation (MSE, PSNR, codebook usage) and the grids; at most a fifth of
    the images. 0: no evaluation."""
    window_shards: int = 4
    """Rows are shuffled within windows of this many shards (each rank keeps about two windows of shards read)."""
    filter: str = ""
    """The images this run trains on: a DuckDB SQL condition over the image shards' metadata columns
    (original_width/original_height, width/height = the resized size, the additional columns), e.g.
    "original_width >= 256 and punsafe < 0.1"; kept/dropped per clause in data_filter.json. Empty: every image."""
    stop_after_steps: int = 0
    """Stop (checkpointed, resumable) after this many steps, e.g. to fit a time slot; 0: train to steps."""

    def __post_init__(self) -> None:
        self.check_placement("dvae")
        _check(self.num_procs > 0, "dvae.num_procs", "must be > 0")
        _check(self.batch_size > 0, "dvae.batch_size", "must be > 0")  # the sign is the fault, not the remainder
        _check(self.batch_size % self.num_procs == 0, "dvae.batch_size", "must be divisible by dvae.num_procs")
        _check(self.zero_stage in (0, 1, 2), "dvae.zero_stage", "must be 0, 1 or 2")
        for name in ("warmup_steps", "save_every", "keep_checkpoints", "grid_every", "heldout_images",
                     "stop_after_steps"):
            _check(getattr(self, name) >= 0, f"dvae.{name}", "must be >= 0")
        _check(self.log_every > 0, "dvae.log_every", "must be > 0")
        _check(self.window_shards > 0, "dvae.window_shards", "must be > 0")
        if self.filter:
            from pipeline.curate.filter import check_syntax  # its syntax lives with the code that evaluates it

            check_syntax(self.filter, "dvae.filter")
        _check(2 <= self.vocab_size <= 65535, "dvae.vocab_size", "must be in [2, 65535] (stored as uint16)")
        _check(self.n_hid > 0, "dvae.n_hid", "must be > 0")
        _check(self.group_count >= 1, "dvae.group_count", "must be >= 1")
        _check(self.n_blk_per_group >= 1, "dvae.n_blk_per_group", "must be >= 1")
        _check(self.steps > 0, "dvae.steps", "must be > 0")
        _check(self.lr > 0, "dvae.lr", "must be > 0")
        _check(0 < self.temp_end <= self.temp_start, "dvae.temp_end", "must be in (0, temp_start]")
        _check(self.kl_weight >= 0, "dvae.kl_weight", "must be >= 0")
        _check(self.n_init > 0, "dvae.n_init", "must be > 0")
        _check(self.recon in ("logit_laplace", "mse", "bce"), "dvae.recon", "must be logit_laplace, mse or bce")
        _check(self.input_noise >= 0, "dvae.input_noise", "must be >= 0")
        _check(self.kl_warmup_steps >= 0, "dvae.kl_warmup_steps", "must be >= 0")
        _check(self.weights != "openai" or bool(self.encoder_path and self.decoder_path), "dvae.weights",
               "'openai' needs dvae.encoder_path and dvae.decoder_path (OpenAI's encoder.pkl / decoder.pkl)")
