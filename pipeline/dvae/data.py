"""Images for the dVAE, streamed from committed image shards without decoding ahead of need.

A global index of (shard, row) comes from the commit markers' ``successes`` counts; ``choose_heldout`` picks a seeded
evaluation set; ``ShardStream`` says which rows each rank trains on at each step as a pure function of (seed, step,
rank, world), so a resumed run sees exactly the images of an uninterrupted one; ``ShardCache`` keeps a rank's few
most recently read shards.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError, NotFoundError
from pipeline.storage import shards


def load_image_array(images_folder: str, size: int, limit: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """All committed images as (N, S, S, 3) uint8, with their keys and captions."""
    keys, caps, arrs = [], [], []
    for key, caption, img in shards.iter_images(images_folder, size):
        keys.append(key)
        caps.append(caption)
        arrs.append(img)
        if limit and len(arrs) >= limit:
            break
    if not arrs:
        raise NotFoundError(f"{images_folder}: no committed images to train on")
    return np.stack(arrs), keys, caps


def shard_counts(folder: str) -> dict[int, int]:
    """Shard id → images in it, from the commit markers alone (a marker without ``successes`` is read and counted)."""
    counts = {}
    for sid, manifest in shards.committed_image_shards(folder).items():
        n = manifest.get("successes")
        counts[sid] = int(n) if n is not None else len(shards.read_shard_samples(folder, sid))
    if not sum(counts.values()):
        raise NotFoundError(f"{folder}: no committed images to train on")
    return counts


def choose_heldout(counts: dict[int, int], wanted: int, seed: int) -> list[tuple[int, int]]:
    """A seeded set of (shard, row) never trained on: ``wanted`` (at most a fifth of the images) drawn from the first
    shards holding 4× that many, so evaluation reads a shard or two, not the whole dataset."""
    n = min(wanted, sum(counts.values()) // 5)
    if n <= 0:
        return []
    pool: list[tuple[int, int]] = []
    for sid, count in counts.items():
        pool += [(sid, r) for r in range(count)]
        if len(pool) >= 4 * n:
            break
    pick = np.random.default_rng([seed, 0x4E1D]).choice(len(pool), n, replace=False)
    return sorted(pool[i] for i in pick)


class ShardStream:
    """Which (shard, row)s rank ``rank`` of ``world`` trains on at each step: a pure function of its arguments.

    Epoch ``e`` permutes the shards with seed (seed, e). With at least ``world`` shards, rank r takes every world-th
    shard of that order (ranks read disjoint shards); with fewer, every rank walks all of them and takes every
    world-th row. The rank's shards are cut into windows of ``window`` shards whose rows are shuffled together, so a
    rank holds about one window of shards at a time. Steps take consecutive ``micro`` rows of the rank's stream,
    running on into the next epoch.
    """

    def __init__(self, rows: dict[int, np.ndarray], seed: int, rank: int, world: int, window: int):
        self.rows = {sid: r for sid, r in rows.items() if len(r)}
        self.shard_ids = np.array(sorted(self.rows), dtype=np.int64)
        total = sum(len(r) for r in self.rows.values())
        if total < world:
            raise DataError(f"{total} training images cannot be split between {world} ranks")
        self.seed, self.rank, self.world, self.window = seed, rank, world, window
        self.split_shards = len(self.shard_ids) >= world
        self._starts = [0]  # stream position where each epoch begins
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def _my_shards(self, epoch: int) -> np.ndarray:
        order = self.shard_ids[np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_ids))]
        return order[self.rank:: self.world] if self.split_shards else order

    def epoch_length(self, epoch: int) -> int:
        n = sum(len(self.rows[int(s)]) for s in self._my_shards(epoch))
        return n if self.split_shards else len(range(self.rank, n, self.world))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(length, 2) array of (shard, row) for this rank's epoch."""
        if epoch in self._orders:
            self._orders.move_to_end(epoch)
            return self._orders[epoch]
        mine = self._my_shards(epoch)
        parts = []
        for w, start in enumerate(range(0, len(mine), self.window)):
            items = np.concatenate([np.stack([np.full(len(self.rows[int(s)]), s), self.rows[int(s)]], 1)
                                    for s in mine[start: start + self.window]])
            who = self.rank if self.split_shards else 0
            parts.append(items[np.random.default_rng([self.seed, epoch, w, who]).permutation(len(items))])
        order = np.concatenate(parts)
        if not self.split_shards:
            order = order[self.rank:: self.world]
        self._orders[epoch] = order
        if len(self._orders) > 2:
            self._orders.popitem(last=False)
        return order

    def take(self, start: int, count: int) -> np.ndarray:
        """Rows at stream positions [start, start + count)."""
        while self._starts[-1] <= start + count:
            self._starts.append(self._starts[-1] + self.epoch_length(len(self._starts) - 1))
        out, pos = [], start
        while pos < start + count:
            epoch = int(np.searchsorted(self._starts, pos, side="right")) - 1
            order = self.epoch_order(epoch)
            lo = pos - self._starts[epoch]
            hi = min(len(order), lo + start + count - pos)
            out.append(order[lo:hi])
            pos += hi - lo
        return np.concatenate(out)

    def step_rows(self, step: int, micro: int) -> np.ndarray:
        return self.take(step * micro, micro)


class ShardCache:
    """A rank's few most recently read shards (their encoded samples); images are decoded when a batch needs them."""

    def __init__(self, folder: str, counts: dict[int, int], size: int, capacity: int):
        self.folder, self.counts, self.size, self.capacity = folder, counts, size, capacity
        self._shards: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self.reads = 0

    def samples(self, sid: int) -> list[dict[str, Any]]:
        if sid in self._shards:
            self._shards.move_to_end(sid)
            return self._shards[sid]
        samples = shards.read_shard_samples(self.folder, sid)
        self.reads += 1
        if len(samples) != self.counts[sid]:
            raise DataError(f"{self.folder}: shard {sid} holds {len(samples)} images but its commit marker says "
                             f"{self.counts[sid]}")
        self._shards[sid] = samples
        while len(self._shards) > self.capacity:
            self._shards.popitem(last=False)
        return samples

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """(n, 2) (shard, row) → (n, 3, S, S) float in [0, 1]."""
        arr = np.stack([shards.decode_image(self.samples(int(s))[int(r)]["image"], self.size) for s, r in rows])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
