"""One Parquet row group of token shards, decoded and validated for the prior's loader (``pipeline.prior.loader``)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import DataError

TOKEN_COLUMNS = ["key", "text_tokens", "image_tokens"]
EMBED_COLUMNS = ["clip_text_emb", "clip_image_emb"]


def heldout_mask(keys: Sequence[str], percent: float) -> np.ndarray:
    """Rows held out of training for evaluation: a pure function of the key (sha256), so the split does not depend on
    shard layout, rank count or order, and the evaluator finds exactly the rows training never saw."""
    if percent <= 0:
        return np.zeros(len(keys), bool)
    cut = percent * 100
    return np.fromiter((int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) % 10000 < cut for k in keys), bool,
                       count=len(keys))


def pad_tokens(starts: np.ndarray, lens: np.ndarray, values: np.ndarray, text_len: int, text_vocab: int) -> np.ndarray:
    """Ragged rows (values[starts[i]:starts[i] + lens[i]]) → (n, text_len) int64 with per-position pads, vectorised."""
    pos = np.arange(text_len, dtype=np.int64)
    out = np.broadcast_to(pos + text_vocab, (len(starts), text_len)).copy()
    take = pos[None, :] < np.minimum(lens, text_len)[:, None]
    out[take] = values[(starts[:, None] + pos[None, :])[take]]
    return out


class RowGroup:
    """One decoded, validated row group."""

    def __init__(self, table: pa.Table, path: str, width: int, text_vocab: int, image_vocab: int,
                 embed_dim: int = 0, heldout_percent: float = 0.0, embed_columns: Sequence[str] = tuple(EMBED_COLUMNS)):
        self.keys = table.column("key").to_numpy()
        if len(set(self.keys.tolist())) != len(self.keys):  # a rewritten shard must not train a key twice
            dup = next(k for k, n in Counter(self.keys.tolist()).items() if n > 1)
            raise DataError(f"{path}: row key {dup!r} appears more than once in a row group; refusing to train on it")
        if "image_tokens" not in table.column_names:  # a shard without image tokens (imported embeddings)
            self._text(table, path, text_vocab)
            self.image = np.zeros((len(self.keys), 0), np.uint16)
            self.extras = {}
            if embed_dim:
                self._embeddings(table, path, embed_dim, heldout_percent, embed_columns)
            return
        img = table.column("image_tokens").combine_chunks()
        if img.type.list_size != width:
            raise DataError(f"{path}: image_tokens rows hold {img.type.list_size} tokens, expected {width}")
        if img.null_count:
            i = int(np.argmin(img.is_valid().to_numpy(zero_copy_only=False)))
            raise DataError(f"{path}: row key {self.keys[i]!r}: image_tokens is null")
        self.image = img.flatten().to_numpy(zero_copy_only=False).reshape(len(self.keys), width)
        if self.image.size and int(self.image.max()) >= image_vocab:
            i = int(np.argmax((self.image >= image_vocab).any(1)))
            raise DataError(f"{path}: row key {self.keys[i]!r}: image token {int(self.image[i].max())} >= dVAE vocab "
                            f"{image_vocab}")
        self._text(table, path, text_vocab)
        self.extras: dict[str, np.ndarray] = {}
        if embed_dim:
            self._embeddings(table, path, embed_dim, heldout_percent, embed_columns)

    def _text(self, table: pa.Table, path: str, text_vocab: int) -> None:
        txt = table.column("text_tokens").combine_chunks()
        offsets = txt.offsets.to_numpy().astype(np.int64)
        self.values = txt.values.to_numpy(zero_copy_only=False)
        self.starts, self.lens = offsets[:-1], np.diff(offsets)
        if txt.null_count:  # a null caption reads as the empty caption
            self.lens = np.where(txt.is_valid().to_numpy(zero_copy_only=False), self.lens, 0)
        used = self.values[offsets[0]:offsets[-1]]
        if used.size and int(used.max()) >= text_vocab:
            j = int(offsets[0]) + int(np.argmax(used >= text_vocab))
            i = int(np.searchsorted(offsets, j, side="right")) - 1
            raise DataError(f"{path}: row key {self.keys[i]!r}: text token {int(self.values[j])} >= text vocab "
                            f"{text_vocab}")

    def _embeddings(self, table: pa.Table, path: str, dim: int, heldout_percent: float,
                    columns: Sequence[str]) -> None:
        """CLIP embeddings as float32, and ``valid``: rows with finite, non-zero embeddings outside the held-out split.
        Unusable rows are counted and masked out of the loss, never trained on (dropping them would shift the
        deterministic batch order every resume relies on)."""
        usable = np.ones(len(self.keys), bool)
        for name in columns:
            col = table.column(name).combine_chunks()
            if col.type.list_size != dim:
                raise DataError(f"{path}: {name} rows hold {col.type.list_size} values, its shards' embed_dim is "
                                f"{dim}")
            arr = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(self.keys), dim)
            if col.null_count:
                arr[~col.is_valid().to_numpy(zero_copy_only=False)] = np.nan
            usable &= np.isfinite(arr).all(1) & (np.abs(arr).sum(1) > 0)
            self.extras[name.removeprefix("clip_")] = arr
        self.unusable = int((~usable).sum())
        self.extras["valid"] = usable & ~heldout_mask(self.keys.tolist(), heldout_percent)

