"""The ``sample:`` section: captions → images by both chains (DALL-E 1 and DALL-E 2) and variations, CLIP rerank."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.checks import check as _check
from pipeline.config.placement import Hardware


@dataclass
class SampleConfig(Hardware):
    """Captions → images: KV-cached sampling, dVAE decode, CLIP rerank. cpus_per_worker / gpus_per_worker /
    resources are what each sampling worker asks for on a Ray cluster."""

    captions: list[str] = field(default_factory=list)
    """Captions to draw (an entry naming an existing file adds its lines); empty means the run's held-out captions."""
    num_captions: int = 24
    """Held-out captions drawn when sample.captions is empty."""
    candidates: int = 8
    """Samples drawn per caption; CLIP keeps the best."""
    temperature: float = 1.0
    """Softmax temperature of the token sampler (1: the model's distribution)."""
    top_k: int = 0
    """0 disables top-k filtering."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1 disables it."""
    keep: int = 1
    """Candidates kept per caption after the CLIP rerank (best first)."""
    num_workers: int = 1
    """Ray tasks the captions are spread over, each asking for the keys above. Outside a Ray cluster, 1 draws in
    this process."""
    checkpoint: str = ""
    """Prior weights: a model.safetensors, or a DeepSpeed checkpoint folder (<prior>/step00000600, any ZeRO stage and
    world size); empty means <prior>/model.safetensors."""
    guidance_scale: float = 1.0
    """Classifier-free guidance: logits = uncond + scale × (cond − uncond); 1 is plain conditional sampling (needs a
    prior trained with prior.caption_dropout > 0 to mean anything above 1)."""
    diffusion_sampler: str = "ddim"
    """Diffusion prior: ddim (deterministic) or ddpm (ancestral)."""
    diffusion_steps: int = 64
    """Diffusion prior: sampler steps per draw."""
    diffusion_candidates: int = 2
    """Diffusion prior: image embeddings drawn per caption; the one closest to the text embedding is kept."""
    chain: str = "dalle1"
    """dalle1: captions → autoregressive prior → dVAE; dalle2: captions → CLIP text embedding → diffusion prior →
    CLIP image embedding → decoder; variations: the images in sample.variations → CLIP image embedding → decoder.
    All three CLIP-rerank sample.candidates per input and write the same records."""
    diffusion_checkpoint: str = ""
    """dalle2: the diffusion prior's model.safetensors; empty: <run_dir>/prior_diffusion/model.safetensors, else
    <prior>/model.safetensors."""
    decoder_checkpoint: str = ""
    """dalle2 / variations: the decoder's model.safetensors or checkpoint folder; empty means
    <decoder>/model.safetensors."""
    decoder_sampler: str = "ddim"
    """Decoder: ddim (deterministic with decoder_eta 0) or ddpm (ancestral)."""
    decoder_steps: int = 50
    """Decoder: sampler steps per image."""
    decoder_guidance_scale: float = 3.0
    """Classifier-free guidance of the decoder (uncond: image embedding and caption both dropped); 1: none."""
    decoder_eta: float = 0.0
    """DDIM noise (0: deterministic); ignored by ddpm."""
    decoder_candidates: int = 0
    """dalle2 / variations: images decoded per input before the CLIP rerank (each costs decoder_steps U-Net passes,
    two with guidance); 0: sample.candidates."""
    variations: list[str] = field(default_factory=list)
    """variations: input image files (png/jpg/webp; a folder adds its images)."""
    seed: int = 0
    """Seed of the sampler (each caption's draws are seeded from it)."""
    output: str = ""
    """Report folder; empty means <run_dir>/report."""

    def __post_init__(self) -> None:
        _check(self.num_captions > 0, "sample.num_captions", "must be > 0")
        _check(self.chain in ("dalle1", "dalle2", "variations"), "sample.chain", "must be dalle1, dalle2 or variations")
        _check(self.decoder_sampler in ("ddim", "ddpm"), "sample.decoder_sampler", "must be ddim or ddpm")
        _check(self.decoder_steps > 0, "sample.decoder_steps", "must be > 0")
        _check(self.decoder_guidance_scale >= 0 and self.decoder_eta >= 0, "sample.decoder_guidance_scale",
               "decoder_guidance_scale and decoder_eta must be >= 0")
        _check(self.chain != "variations" or bool(self.variations), "sample.variations",
               "sample.chain=variations needs input images in sample.variations")
        _check(self.candidates > 0, "sample.candidates", "must be > 0")
        _check(self.temperature > 0, "sample.temperature", "must be > 0")
        _check(self.top_k >= 0, "sample.top_k", "must be >= 0")
        _check(self.guidance_scale >= 0, "sample.guidance_scale", "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "sample.top_p", "must be in (0, 1]")
        _check(self.num_workers > 0, "sample.num_workers", "must be > 0")
        self.check_hardware("sample")
        _check(0 < self.keep <= self.candidates, "sample.keep", "must be in [1, sample.candidates]")
        _check(self.decoder_candidates >= 0, "sample.decoder_candidates", "must be >= 0 (0: sample.candidates)")
        _check(self.keep <= (self.decoder_candidates or self.candidates), "sample.keep",
               "must be <= sample.decoder_candidates")
        _check(self.diffusion_sampler in ("ddim", "ddpm"), "sample.diffusion_sampler", "must be ddim or ddpm")
        _check(self.diffusion_steps > 0 and self.diffusion_candidates > 0, "sample.diffusion_steps",
               "diffusion_steps and diffusion_candidates must be > 0")
