"""The stage sections of the run configuration: the embedded dataset, download, dVAE, CLIP, tokenize and sample.

Each section validates its own keys in ``__post_init__`` (``ConfigError`` naming the dotted key);
``pipeline.config.prior`` holds the prior's section, ``pipeline.config.root`` the root ``Config`` and the loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.config.checks import ConfigError
from pipeline.config.checks import check as _check
from pipeline.config.placement import Hardware, TrainerPlacement, check_resources
from pipeline.download.fetch import OPT_OUT_DIRECTIVES

_TEXT_FORMATS = ("csv", "tsv", "jsonl", "json", "txt")
INPUT_FORMATS = ("parquet",) + _TEXT_FORMATS + tuple(f + ".gz" for f in _TEXT_FORMATS)  # img2dataset's Reader's
HASH_ALGORITHMS = ("md5", "sha256", "sha512")  # what img2dataset's verify_hash accepts


@dataclass
class DataConfig:
    """The embedded default dataset (shapes × colours × positions × backgrounds, captioned in words)."""

    num_images: int = 2400
    """Images generated for the URL list (the download stage fetches them over loopback HTTP)."""
    heldout_fraction: float = 0.1
    """Fraction of caption combinations kept out of training and used only for sampling."""
    render_size: int = 64
    """Pixel size of the served images (the download stage resizes them)."""

    def __post_init__(self) -> None:
        _check(self.num_images > 0, "data.num_images", "must be > 0")
        _check(0.0 < self.heldout_fraction < 0.5, "data.heldout_fraction", "must be in (0, 0.5)")
        _check(self.render_size >= 16, "data.render_size", "must be >= 16")


@dataclass
class DownloadConfig:
    """URL list → resized image shards (img2dataset pieces on Ray tasks)."""

    input: str = ""
    """URL list: file, folder or glob; parquet/csv/tsv/jsonl/json/txt; local or s3://. Empty: the demo's list."""
    input_format: str = ""
    """img2dataset's input_format: parquet, csv, tsv, jsonl, json or txt (one URL per line, no header, no captions;
    the text ones optionally .gz). Empty: each file's from its extension; set, a folder's files of that extension
    and a named file of any name are read as it."""
    url_col: str = "url"
    """Column of the URL list holding the image URLs (img2dataset's url_col)."""
    caption_col: str = "caption"
    """Column holding the captions (img2dataset's caption_col); empty: no captions."""
    save_additional_columns: list[str] = field(default_factory=list)
    """Input columns kept with every row (img2dataset's option of that name), e.g. [similarity, punsafe, LICENSE]:
    in the image shards' json/Parquet metadata, then typed and nullable in the token shards and the export."""
    output: str = ""
    """Shard folder; empty means <run_dir>/images."""
    shard_size: int = 1000
    """URLs per shard (img2dataset's number_sample_per_shard); one Ray task downloads one shard."""
    image_size: int = 32
    """Side in pixels the images are resized to (img2dataset's image_size)."""
    resize_mode: str = "center_crop"
    """How images are fitted to image_size, as img2dataset's resize_mode: no, border (longest side to image_size,
    padded white to a square), keep_ratio (shortest side to image_size), keep_ratio_largest (longest side to
    image_size, not padded), center_crop (shortest side, then the centre square)."""
    output_format: str = "webdataset"
    """webdataset ({shard}.tar with .jpg/.txt/.json per sample) or parquet (image bytes in a column)."""
    encode_format: str = "jpg"
    """Format the resized images are stored in: jpg, png or webp."""
    encode_quality: int = 95
    """JPEG/WebP quality 1-100; for png, the compression level 0-9 (as img2dataset)."""
    thread_count: int = 16
    """Concurrent fetches inside one shard task."""
    timeout: float = 10.0
    """Bound on one connect or one socket read, in seconds."""
    deadline: float = 30.0
    """Bound on the whole fetch of one URL (redirects, retries and waits included), in seconds."""
    retries: int = 2
    """Extra attempts per URL after a transient failure (5xx, 429, reset, truncated), inside the deadline."""
    shard_retries: int = 2
    """Whole-shard retries after a shard task failed."""
    max_in_flight: int = 4
    """Shard tasks submitted at once (backpressure)."""
    task_cpus: float = 1.0
    """CPUs each shard task reserves. Below 1 (e.g. 0.5 with max_in_flight = 2x the CPUs and half the threads) more,
    smaller shard tasks share the cores: one task waiting on its shard's last slow URLs no longer idles a core."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each shard task asks for, e.g. {download: 1} to keep downloads on the nodes that
    advertise it (cluster/config.yaml's CPU workers, which run the caching DNS resolver). Empty: any CPU."""
    max_bytes: int = 32 * 1024 * 1024
    """Body size cap per URL."""
    max_redirects: int = 5
    """Redirects followed per URL before the row becomes redirect_loop."""
    max_pixels: int = 50_000_000
    """Pixel cap, checked from the image header before decoding (decompression bombs)."""
    min_image_size: int = 0
    """Drop images whose shorter side is smaller (0: keep all)."""
    max_aspect_ratio: float = 0.0
    """Drop images whose long/short side ratio is larger (0: no limit)."""
    max_caption_bytes: int = 4096
    """Captions longer than this (UTF-8 bytes) become caption_too_long rows."""
    drop_empty_captions: bool = True
    """A row whose caption is empty becomes an empty_caption row instead of a sample."""
    honor_opt_out: bool = True
    """Skip images whose X-Robots-Tag names one of disallowed_header_directives (rows end opted_out)."""
    disallowed_header_directives: list[str] = field(default_factory=lambda: list(OPT_OUT_DIRECTIVES))
    """X-Robots-Tag directives that opt an image out (img2dataset's option and default list), for every user agent
    or for img2dataset's; case-insensitive. An empty list (or honor_opt_out: false) honours none."""
    verify_hash: list[str] = field(default_factory=list)
    """[column, algorithm] (img2dataset's verify_hash), e.g. [sha256, sha256]: the URL list's column holding the hex
    digest (md5, sha256 or sha512) of each image's downloaded bytes; a row whose bytes differ (or that has no
    digest) ends hash_mismatch. Empty: no check."""
    dedup_urls: bool = True
    """A URL seen earlier in the input becomes a duplicate_url row instead of a second download."""
    dedup_images: bool = True
    """An image whose bytes (sha256) were already kept in this run becomes a duplicate_image row."""
    allow_private_addresses: bool = False
    """Let URLs reach loopback/private/link-local addresses (tests, internal mirrors). Off: SSRF guard."""
    allowed_addresses: list[str] = field(default_factory=list)
    """Exceptions to the SSRF guard: CIDR ('10.1.0.0/16'), 'ip:port' or '[v6]:port'."""
    retry_failed: bool = False
    """Re-fetch only rows that failed transiently, into new shards (`python -m pipeline download --retry-failed`)."""
    ca_bundle: str = ""
    """PEM file of the certificate authorities HTTPS downloads trust instead of the system store (a private mirror,
    a test CA); a local path readable on every node. Empty: the system store."""
    keep_alive: bool = True
    """Reuse a connection for the next URL of the same host name and vetted address (saves the TCP and TLS
    handshakes on CDN hosts); false: one connection per URL, as img2dataset does."""

    def __post_init__(self) -> None:
        _check(self.shard_size > 0, "download.shard_size", "must be > 0")
        _check(self.image_size >= 8, "download.image_size", "must be >= 8")
        _check(self.resize_mode in {"no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"},
               "download.resize_mode", "must be one of no, border, keep_ratio, keep_ratio_largest, center_crop")
        _check(self.input_format.lower() in INPUT_FORMATS + ("",), "download.input_format",
               f"must be one of {', '.join(INPUT_FORMATS)} (or empty: from each file's extension)")
        _check(not self.verify_hash or (len(self.verify_hash) == 2 and bool(str(self.verify_hash[0]))
                                        and self.verify_hash[1] in HASH_ALGORITHMS), "download.verify_hash",
               f"must be [column, algorithm] with algorithm one of {', '.join(HASH_ALGORITHMS)} (or empty)")
        _check(all(isinstance(d, str) and d.strip() for d in self.disallowed_header_directives),
               "download.disallowed_header_directives", "must be a list of non-empty directive names")
        _check(self.output_format in {"webdataset", "parquet"}, "download.output_format",
               "must be 'webdataset' or 'parquet'")
        _check(self.encode_format in {"jpg", "png", "webp"}, "download.encode_format", "must be jpg, png or webp")
        if self.encode_format == "png":  # img2dataset reads it as PNG's compression level there
            _check(0 <= self.encode_quality <= 9, "download.encode_quality", "must be in [0, 9] for png (compression)")
        else:
            _check(1 <= self.encode_quality <= 100, "download.encode_quality", "must be in [1, 100]")
        _check(self.thread_count > 0, "download.thread_count", "must be > 0")
        _check(self.timeout > 0, "download.timeout", "must be > 0")
        _check(self.retries >= 0, "download.retries", "must be >= 0")
        _check(self.shard_retries >= 0, "download.shard_retries", "must be >= 0")
        _check(self.max_in_flight > 0, "download.max_in_flight", "must be > 0")
        _check(0 < self.task_cpus <= 64, "download.task_cpus", "must be in (0, 64]")
        check_resources("download.resources", self.resources)
        _check(self.deadline > 0, "download.deadline", "must be > 0")
        _check(self.max_bytes > 0, "download.max_bytes", "must be > 0")
        _check(self.max_redirects >= 0, "download.max_redirects", "must be >= 0")
        _check(self.max_pixels > 0, "download.max_pixels", "must be > 0")
        _check(self.min_image_size >= 0, "download.min_image_size", "must be >= 0")
        _check(self.max_aspect_ratio == 0 or self.max_aspect_ratio >= 1, "download.max_aspect_ratio",
               "must be 0 (no limit) or >= 1")
        _check(self.max_caption_bytes > 0, "download.max_caption_bytes", "must be > 0")
        _check_additional_columns(self)
        from pipeline.download.fetch import AddressPolicy  # the entries' syntax lives with the guard that uses it

        try:
            AddressPolicy(False, self.allowed_addresses)
        except ValueError as exc:
            raise ConfigError(f"config key 'download.allowed_addresses': {exc}") from exc
        if self.ca_bundle:
            import ssl

            try:
                ssl.create_default_context(cafile=self.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"config key 'download.ca_bundle': cannot load {self.ca_bundle!r} as PEM "
                                  f"certificates ({exc})") from exc


# The columns every image shard's metadata and every token shard already has: an additional column may not shadow them
# (compared case-insensitively, as SQL filters compare names).
RESERVED_COLUMNS = frozenset({
    "key", "url", "caption", "status", "code", "error_message", "http_status", "width", "height", "original_width",
    "original_height", "sha256", "bytes", "fetch_attempts", "fetch_seconds", "duplicate_of", "retry_of", "txt",
    "jpg", "png", "webp", "text_tokens", "image_tokens", "clip_image_emb", "clip_text_emb", "clip_similarity",
    "cluster", "cosine"})


def _check_additional_columns(cfg: DownloadConfig) -> None:
    cols = cfg.save_additional_columns
    key = "download.save_additional_columns"
    _check(all(isinstance(c, str) and c.strip() == c and c for c in cols), key, "must be a list of column names")
    lower = [c.lower() for c in cols]
    _check(len(set(lower)) == len(lower), key, f"names a column twice (case-insensitively): {cols}")
    for c in cols:
        _check(c.lower() not in RESERVED_COLUMNS and c not in (cfg.url_col, cfg.caption_col), key,
               f"'{c}' is already a column of every shard or the url/caption column (names compare case-insensitively "
               "in filters: LAION's WIDTH/HEIGHT are the shards' width/height, the original size)")


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


@dataclass
class ClipConfig(Hardware):
    """A small open_clip CLIP trained on the run's images (or a named open_clip model). On a Ray cluster train-clip
    runs as one task on a worker asking for cpus_per_worker / gpus_per_worker / resources."""

    model: str = ""
    """open_clip model name (``ViT-B-32``) or ``local-dir:<folder>``; empty trains a small CLIP into <run_dir>/clip."""
    pretrained: str = ""
    """open_clip pretrained tag or weights file, for a named model."""
    embed_dim: int = 64
    """Width of the joint image/text embedding (the clip_*_emb columns)."""
    width: int = 128
    """Width of the vision and text towers."""
    layers: int = 2
    """Transformer layers in each tower."""
    patch_size: int = 8
    """ViT patch side in pixels."""
    context_length: int = 24
    """Caption tokens the text tower reads (longer captions are truncated)."""
    steps: int = 400
    """Optimizer steps to train."""
    batch_size: int = 128
    """Image-caption pairs per contrastive batch."""
    lr: float = 1e-3
    """Peak learning rate (AdamW; linear warm-up, then cosine to 5%)."""
    output: str = ""
    """Checkpoint folder; empty means <run_dir>/clip."""

    def __post_init__(self) -> None:
        for name in ("embed_dim", "width", "layers", "patch_size", "context_length", "steps", "batch_size"):
            _check(getattr(self, name) > 0, f"clip.{name}", "must be > 0")
        _check(self.width % 32 == 0, "clip.width", "must be a multiple of 32 (head width)")
        _check(self.lr > 0, "clip.lr", "must be > 0")
        self.check_hardware("clip")


@dataclass
class TokenizeConfig(Hardware):
    """Image shards → token shards (one Parquet row per sample). cpus_per_worker / gpus_per_worker / resources are
    what each encoder actor asks for (configs/laion-cluster.yaml: one GPU each); decode tasks ask for decode_cpus."""

    input: str = ""
    """Image shard folder; empty means the download output."""
    output: str = ""
    """Token shard folder; empty means <run_dir>/tokens."""
    batch_size: int = 64
    """Images encoded per forward pass of the dVAE and CLIP in an encoder actor."""
    num_encoders: int = 1
    """Encoder actors; each encodes whole image shards (fed by decode tasks) and commits their token shards."""
    shard_retries: int = 2
    """Attempts after the first for a token shard whose encoder actor or decode task was lost (a node gone)."""
    decode_cpus: float = 1.0
    """CPUs each decode task (one image shard → decoded, resized rows) asks for."""
    decode_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each decode task asks for, e.g. {download: 1} to keep decoding on CPU nodes."""
    export: str = ""
    """Where `python -m pipeline export` writes the clip-retrieval layout; empty means <run_dir>/clip_retrieval."""
    export_index: bool = False
    """`export` also builds the kNN indices with autofaiss (image.index, text.index) and writes clip-retrieval's
    indices_paths.json (with the run's CLIP copied beside it), so `clip-retrieval back` run in that folder serves it."""
    export_index_memory: str = "4G"
    """Memory the kNN index may take, and the memory autofaiss may use building it (its max_index_memory_usage)."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "tokenize.batch_size", "must be > 0")
        _check(self.num_encoders > 0, "tokenize.num_encoders", "must be > 0")
        _check(self.decode_cpus > 0, "tokenize.decode_cpus", "must be > 0")
        _check(self.shard_retries >= 0, "tokenize.shard_retries", "must be >= 0")
        _check(bool(re.fullmatch(r"\d+(\.\d+)?[KMGT]B?", self.export_index_memory)), "tokenize.export_index_memory",
               "must be a size like 512MB or 4G")
        self.check_hardware("tokenize")
        check_resources("tokenize.decode_resources", self.decode_resources)


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
