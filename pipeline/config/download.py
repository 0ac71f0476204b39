"""The ``data:`` section (the embedded default dataset) and the ``download:`` section: URL lists → image shards,
img2dataset's options and the fetch guard's. Each validates its own keys in ``__post_init__`` (``ConfigError`` naming
the dotted key)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.checks import ConfigError
from pipeline.config.checks import check as _check
from pipeline.config.placement import check_resources
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
    """Concurrent fetches inside one shard task (when node_connections is 0)."""
    node_connections: int = 0
    """Fetches in flight at once on one node, shared by every shard task of the run there (0: none shared; each
    task runs thread_count of its own). With a budget, each task may use all of it, so a shard waiting on its last
    slow URLs, and the run's last shards, take the connections finished shards left: the node stays at this many
    connections until the run's end. Each fetch holds one of the node's slots (a lock file in node scratch that the
    kernel frees when a task dies). For web lists, e.g. 64 on 2 cores with max_in_flight 4."""
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
        _check(0 <= self.node_connections <= 4096, "download.node_connections", "must be in [0, 4096] (0: off)")
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
