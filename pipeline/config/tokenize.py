"""The ``clip:`` section (the CLIP the run trains or names) and the ``tokenize:`` section (image shards → token
shards with Ray Data)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.config.checks import check as _check
from pipeline.config.placement import Hardware, check_resources


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
