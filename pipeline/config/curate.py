"""The ``curate:`` section: near-duplicate detection (``dedup``) and published embeddings in
(``import-embeddings``). Per-run filters are the trainers' own ``filter`` keys (``prior.filter``, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.checks import check as _check


@dataclass
class CurateConfig:
    """Near-duplicates among the token shards' CLIP image embeddings, and token shards from published embeddings."""

    dedup_threshold: float = 0.95
    """Cosine of two CLIP image embeddings at or above which the later key is a near-duplicate of the earlier."""
    dedup_clusters: int = 0
    """k-means clusters the embeddings are split into before pairwise cosine within each; 0: about sqrt(rows / 4)."""
    dedup_train_rows: int = 100_000
    """Embeddings k-means is trained on (a seeded sample of the rows; all of them when fewer)."""
    dedup_max_cluster_rows: int = 50_000
    """Rows of one cluster compared at once; a bigger cluster is compared in blocks of this many (no n² matrix)."""
    dedup_seed: int = 0
    """Seed of the k-means sample and initialisation: the same seed and data give the same side table."""
    import_source: str = ""
    """Embedding-reader / clip-retrieval folder (img_emb/*.npy, text_emb/*.npy, metadata/*.parquet; local or
    s3://) that `import-embeddings` turns into token shards (without image tokens) in tokenize.output."""
    import_clip: str = ""
    """The CLIP model that made those embeddings (e.g. ViT-L-14/openai): recorded as the shards' provenance, and
    the captions' BPE ids come from its tokenizer. Empty: this run's clip.arch / clip.pretrained."""
    import_caption_col: str = "caption"
    """Metadata column holding the captions."""
    import_url_col: str = "url"
    """Metadata column holding the URLs (absent: empty URLs)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.dedup_threshold <= 1.0, "curate.dedup_threshold", "must be in (0, 1]")
        _check(self.dedup_clusters >= 0, "curate.dedup_clusters", "must be >= 0")
        _check(self.dedup_train_rows > 0, "curate.dedup_train_rows", "must be > 0")
        _check(self.dedup_max_cluster_rows >= 2, "curate.dedup_max_cluster_rows", "must be >= 2")
        _check(self.dedup_seed >= 0, "curate.dedup_seed", "must be >= 0")
