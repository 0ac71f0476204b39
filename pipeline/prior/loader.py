"""Token shards streamed to the transformer prior: deterministic, exactly resumable, many ranks, local or s3://.

Why not load everything: the token set outgrows one host's memory long before it outgrows a training run, and every
rank re-reading all of it wastes the object store. So each rank reads only Parquet row groups it trains on, a few
windows ahead of need, and the order is a pure function of (plan, seed, world, micro_batch, shuffle_buffer).

* Plan. ``make_plan`` (``pipeline.prior.plan``) freezes, at training start, the committed shards
  (``{id:05d}.done.json`` present; an unmarked
  Parquet file may be half written and is never read) and their row-group row counts, from Parquet footers alone.
  The plan travels with checkpoints; a resume runs ``check_plan`` so a changed dataset is refused instead of silently
  reshuffling. Shards committed later are not in the plan: the stream of a running job never shifts under it.
* Filter. With ``prior.filter`` (a SQL condition, ``pipeline.curate.filter``) the plan also freezes, per shard, a
  bitmap of the rows it keeps and the kept/dropped counts per clause; units then count and yield only kept rows (a
  unit keeping none is dropped), so the deal, the windows and resume below are over the kept rows alone.
* Units. Each row group is cut into contiguous slices of at most ``unit_rows`` rows, (shard, row group, start, stop):
  small enough to balance ranks, large enough that a read is one Parquet column chunk per column, not random rows.
* Epoch e. The unit list is permuted with ``default_rng(SeedSequence([seed, e]))`` and dealt round-robin to ranks, so
  ranks read disjoint row groups. Unit sizes differ, so ranks' row totals differ: every rank runs
  ``min over ranks (rows // micro_batch)`` steps in epoch e (each rank computes every rank's deal, so all agree
  without talking); the count is per epoch, and ``steps_per_epoch`` is epoch 0's. Collective ops stay in lockstep.
* Windows. A rank's units for the epoch are grouped into consecutive windows whose rows total >= ``shuffle_buffer``
  (the last may be smaller); a window's rows are permuted with ``SeedSequence([seed, e, rank, window])``. The rank's
  epoch stream is its permuted windows concatenated and truncated to steps × micro_batch rows; batch k of the epoch is
  rows [k·B, (k+1)·B). Row-level mixing within a window plus unit-level mixing across the epoch approximates a global
  shuffle while holding ~one window in memory.
* Resume. Every position is computable from the step: ``batches(s)`` locates epoch, window and offset of step s and
  reads from that window on, yielding exactly what an uninterrupted iterator yields (no replay of the epoch).
* Reading. pyarrow through the folder's fsspec filesystem; only columns key, text_tokens, image_tokens; each row group a
  window needs is read once. Text is truncated and padded with DALL-E's per-position pads (position i: text_vocab + i,
  as ``prior.pad_text``) by vectorised offset arithmetic. A daemon thread keeps up to ``prefetch`` decoded windows
  queued; its exceptions are re-raised in the consumer, and ``close()`` (or dropping the iterator) stops it.
* Validation. Bad data fails loudly with the file (and the row's key): a non-token or disagreeing shard at plan time;
  an image row width other than grid², an image id >= the dVAE vocab or a text id >= the text vocab when read
  (vectorised max per row group; the offending row is located only on failure).
"""

from __future__ import annotations

import queue
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.prior.plan import DataPlan, check_plan, make_plan
from pipeline.prior.rows import EMBED_COLUMNS, TOKEN_COLUMNS, DataError, RowGroup, heldout_mask, pad_tokens
from pipeline.storage import commit, schema

__all__ = ["Batch", "DataError", "DataPlan", "TokenLoader", "check_plan", "heldout_mask", "make_plan", "pad_tokens"]


@dataclass
class Batch:
    step: int  # global step this batch belongs to
    keys: list[str]
    text: torch.Tensor  # (B, text_len) int64, truncated and padded with per-position pads
    image: torch.Tensor  # (B, grid²) int64
    text_emb: torch.Tensor | None = None  # (B, D) float32 CLIP text embeddings, when the loader reads embeddings
    image_emb: torch.Tensor | None = None  # (B, D) float32 CLIP image embeddings
    valid: torch.Tensor | None = None  # (B,) bool: usable embeddings and not held out; the loss skips the rest
    shards: list[int] | None = None  # the token shard each row came from (a join by key with its image shard)


@dataclass
class _Deal:
    """This rank's epoch: its units in order, cut into shuffle windows."""
    steps: int
    units: np.ndarray  # indices into the loader's unit table
    bounds: np.ndarray  # window w = units[bounds[w]:bounds[w + 1]]; only windows the truncated stream touches
    starts: np.ndarray  # stream row where each of those windows starts, plus the end of the last


@dataclass
class _Window:
    epoch: int
    index: int
    keys: np.ndarray  # object array of str
    text: np.ndarray  # (n, text_len) int64, padded
    image: np.ndarray  # (n, grid²) uint16
    extras: dict[str, np.ndarray]  # text_emb, image_emb, valid when embeddings are read
    shards: np.ndarray  # (n,) int64 token shard id of each row


def _unit_table(plan: DataPlan) -> np.ndarray:
    """(n, 4) int64 rows of (shard index, row group, start, stop) in shard and row-group order."""
    groups = [(si, rg, n) for si, s in enumerate(plan.shards) for rg, n in enumerate(s["row_groups"]) if n]
    if not groups:
        return np.zeros((0, 4), np.int64)
    si, rg, n = (np.asarray(c, np.int64) for c in zip(*groups))
    per = -(-n // plan.unit_rows)  # units per row group; vectorised because big sets have ~1e6 row groups
    lo = (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)) * plan.unit_rows
    return np.stack([np.repeat(si, per), np.repeat(rg, per), lo, np.minimum(lo + plan.unit_rows, np.repeat(n, per))], 1)


def _kept_units(units: np.ndarray, plan: DataPlan, masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The units that keep at least one row, each with its kept-row count, and the shard row where each unit's row
    group starts (to find its rows in the shard's mask)."""
    base = np.zeros(len(units), np.int64)
    kept = np.zeros(len(units), np.int64)
    for si, s in enumerate(plan.shards):
        sel = units[:, 0] == si
        if not sel.any():
            continue
        offsets = np.concatenate([[0], np.cumsum(s["row_groups"])])
        cum = np.concatenate([[0], np.cumsum(masks[si], dtype=np.int64)])
        b = offsets[units[sel, 1]]
        base[sel] = b
        kept[sel] = cum[b + units[sel, 3]] - cum[b + units[sel, 2]]
    return units[kept > 0], np.stack([base[kept > 0], kept[kept > 0]], 1)


def _window_bounds(sizes: np.ndarray, buffer: int) -> np.ndarray:
    """Unit boundaries of consecutive windows holding >= ``buffer`` rows each (the last may hold fewer)."""
    cum = np.cumsum(sizes)
    bounds, base = [0], 0
    while bounds[-1] < len(sizes):
        end = min(int(np.searchsorted(cum, base + buffer, side="left")) + 1, len(sizes))
        bounds.append(end)
        base = int(cum[end - 1])
    return np.asarray(bounds, dtype=np.int64)


class TokenLoader:
    """Rank ``rank`` of ``world``'s batches, streamed from ``plan``; see the module docstring for the order."""

    def __init__(self, plan: DataPlan, *, rank: int, world: int, micro_batch: int, text_len: int, seed: int,
                 shuffle_buffer: int, prefetch: int = 2, expect_grid: int | None = None, embeddings: bool = False,
                 heldout_percent: float = 0.0, embed_columns: tuple[str, ...] = tuple(EMBED_COLUMNS),
                 needs: str = "the diffusion prior trains on CLIP embeddings"):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        for name, v in (("micro_batch", micro_batch), ("text_len", text_len), ("shuffle_buffer", shuffle_buffer),
                        ("prefetch", prefetch)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (a SeedSequence entropy), got {seed}")
        self.plan, self.rank, self.world, self.micro_batch = plan, rank, world, micro_batch
        self.text_len, self.seed, self.shuffle_buffer, self.prefetch = text_len, seed, shuffle_buffer, prefetch
        self.text_vocab = int(plan.meta["tokenizer"]["vocab_size"])
        self.image_vocab = int(plan.meta["dvae"]["vocab_size"])
        self.grid = int(plan.meta["grid"]) if expect_grid is None else expect_grid
        if self.grid != int(plan.meta["grid"]):
            raise DataError(f"{plan.shards[0]['path']}: token grid {plan.meta['grid']}, the prior expects {self.grid}")
        self._fs, _ = commit.fs_and_path(plan.folder)
        self._units = _unit_table(plan)
        self._sizes = self._units[:, 3] - self._units[:, 2]
        self._masks = plan.masks()  # the filter's kept rows: units hold only those, and count only those
        if self._masks is not None:
            self._units, kept = _kept_units(self._units, plan, self._masks)
            self._mask_base, self._sizes = kept[:, 0], kept[:, 1]
        self._lock = threading.RLock()  # the consumer and the prefetch thread share caches
        self._deals: OrderedDict[int, _Deal] = OrderedDict()
        self._ends: list[int] = []  # _ends[e]: first global step after epoch e
        self._footers: OrderedDict[int, pq.FileMetaData] = OrderedDict()
        self._active: list[tuple[threading.Thread, threading.Event]] = []
        self.row_groups_read = 0  # a counter for tests and benchmarks
        self.embed_dim = int(plan.meta["embed_dim"]) if embeddings else 0
        self.heldout_percent = heldout_percent
        self.embed_columns, self.needs = list(embed_columns) if embeddings else [], needs  # needs: says who wants them
        tokens = TOKEN_COLUMNS if self.grid else [c for c in TOKEN_COLUMNS if c != "image_tokens"]  # 0: imported
        self.columns = tokens + self.embed_columns
        self.unusable_rows = 0  # rows read whose embeddings were NaN/inf/zero (masked out of the loss)
        self.steps_per_epoch = self._deal(0).steps

    # ---- the order: pure functions of the arguments -------------------------------------------------------------
    def _deal(self, epoch: int) -> _Deal:
        with self._lock:
            if epoch in self._deals:
                self._deals.move_to_end(epoch)
                return self._deals[epoch]
        perm = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(len(self._units))
        dealt = np.zeros(-(-len(perm) // self.world) * self.world, np.int64)  # row r: one round of the deal
        dealt[: len(perm)] = self._sizes[perm]
        per_rank = dealt.reshape(-1, self.world).sum(0)  # every rank's rows, so all ranks agree on the steps
        steps = int(per_rank.min()) // self.micro_batch
        if steps == 0:
            raise DataError(f"{self.plan.folder}: too few rows/units for world {self.world} × micro_batch "
                            f"{self.micro_batch} (epoch {epoch}: {len(perm)} units, {int(per_rank.min())} rows on the "
                            f"poorest rank); use a smaller loader unit_rows or micro batch")
        mine = perm[self.rank:: self.world]
        bounds = _window_bounds(self._sizes[mine], self.shuffle_buffer)
        starts = np.concatenate([[0], np.cumsum(self._sizes[mine])])[bounds]
        used = int(np.searchsorted(starts[:-1], steps * self.micro_batch, side="left"))  # windows the stream touches
        deal = _Deal(steps, mine, bounds[: used + 1], starts[: used + 1])
        with self._lock:
            self._deals[epoch] = deal
            while len(self._deals) > 3:
                self._deals.popitem(last=False)
        return deal

    def epoch_steps(self, epoch: int) -> int:
        return self._deal(epoch).steps

    def _locate(self, step: int) -> tuple[int, int]:
        """Global step → (epoch, step within the epoch)."""
        with self._lock:
            while not self._ends or self._ends[-1] <= step:
                self._ends.append((self._ends[-1] if self._ends else 0) + self._deal(len(self._ends)).steps)
            epoch = bisect_right(self._ends, step)
        return epoch, step - (self._ends[epoch - 1] if epoch else 0)

    def first_step(self, shard_index: int, row: int, until: int) -> int | None:
        """The first loader step below ``until`` whose batch on this rank holds row ``row`` of planned shard
        ``shard_index`` (None: not before then, or the filter dropped it): the order above, computed for one row
        without reading any data (what ``forget`` reports of the checkpoints that consumed a removed row)."""
        if self._masks is not None and not self._masks[shard_index][row]:
            return None
        offsets = np.concatenate([[0], np.cumsum(self.plan.shards[shard_index]["row_groups"])])
        g = int(np.searchsorted(offsets, row, side="right")) - 1
        o = row - int(offsets[g])
        u_ = self._units
        hit = np.flatnonzero((u_[:, 0] == shard_index) & (u_[:, 1] == g) & (u_[:, 2] <= o) & (u_[:, 3] > o))
        if not len(hit):
            return None
        u, lo = int(hit[0]), int(u_[hit[0], 2])
        within = o - lo if self._masks is None else int(
            self._masks[shard_index][self._mask_base[u] + lo: self._mask_base[u] + o].sum())
        epoch, base = 0, 0
        while base < until:
            deal = self._deal(epoch)
            at = np.flatnonzero(deal.units == u)
            w = int(np.searchsorted(deal.bounds, at[0], side="right")) - 1 if len(at) else len(deal.bounds)
            if w < len(deal.bounds) - 1:
                c = int(self._sizes[deal.units[deal.bounds[w]: at[0]]].sum()) + within
                n = int(deal.starts[w + 1] - deal.starts[w])
                perm = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, w])).permutation(n)
                k = (int(deal.starts[w]) + int(np.flatnonzero(perm == c)[0])) // self.micro_batch
                if k < deal.steps and base + k < until:
                    return base + k
            base, epoch = base + deal.steps, epoch + 1
        return None

    def position(self, step: int) -> dict:
        epoch, k = self._locate(step)
        starts = self._deal(epoch).starts
        window = int(np.searchsorted(starts, k * self.micro_batch, side="right")) - 1
        return {"epoch": epoch, "step_in_epoch": k, "window": window,
                "offset_in_window": k * self.micro_batch - int(starts[window])}

    def _window_sequence(self, start_step: int) -> Iterator[tuple[int, int]]:
        pos = self.position(start_step)
        epoch, window = pos["epoch"], pos["window"]
        while True:
            for w in range(window, len(self._deal(epoch).starts) - 1):
                yield epoch, w
            epoch, window = epoch + 1, 0

    # ---- reading ------------------------------------------------------------------------------------------------
    def _read_groups(self, shard: int, groups: list[int]) -> dict[int, RowGroup]:
        path = self.plan.shards[shard]["path"]
        out = {}
        with self._fs.open(path, "rb") as f:
            pf = schema.open_token_shard(f, self._footers.get(shard))  # a cached footer; pages CRC-checked
            with self._lock:
                self._footers[shard] = pf.metadata
                while len(self._footers) > 256:
                    self._footers.popitem(last=False)
            missing = [c for c in self.columns if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"{path}: no column(s) {', '.join(missing)}"
                                + (f"; {self.needs}" if self.embed_dim else ""))
            for g in groups:
                try:
                    table = pf.read_row_group(g, columns=self.columns)
                except (OSError, pa.ArrowException) as e:  # OSError: a data page whose CRC does not match
                    raise DataError(f"{path}: cannot read row group {g} ({e})") from e
                self.row_groups_read += 1
                out[g] = RowGroup(table, path, self.grid * self.grid, self.text_vocab, self.image_vocab,
                                  self.embed_dim, self.heldout_percent, self.embed_columns)
                self.unusable_rows += getattr(out[g], "unusable", 0)
        return out

    def _load_window(self, epoch: int, w: int) -> _Window:
        deal = self._deal(epoch)
        units = self._units[deal.units[deal.bounds[w]: deal.bounds[w + 1]]]
        groups: dict[tuple[int, int], RowGroup] = {}
        for shard in np.unique(units[:, 0]):
            wanted = sorted({int(g) for g in units[units[:, 0] == shard, 1]})  # each row group read once per window
            groups |= {(int(shard), g): grp for g, grp in self._read_groups(int(shard), wanted).items()}
        keys, text, image, extras, shard_ids = [], [], [], {}, []
        bases = self._mask_base[deal.units[deal.bounds[w]: deal.bounds[w + 1]]] if self._masks is not None else None
        for u, (s, g, lo, hi) in enumerate(units.tolist()):
            grp = groups[(s, g)]
            # the filter's rows of this unit (a plain slice without a filter)
            rows = slice(lo, hi) if bases is None else lo + np.flatnonzero(
                self._masks[s][bases[u] + lo: bases[u] + hi])
            keys.append(grp.keys[rows])
            shard_ids.append(np.full(len(keys[-1]), int(self.plan.shards[s]["shard"]), np.int64))
            text.append(pad_tokens(grp.starts[rows], grp.lens[rows], grp.values, self.text_len, self.text_vocab))
            image.append(grp.image[rows])
            for name, arr in grp.extras.items():
                extras.setdefault(name, []).append(arr[rows])
        n = int(deal.starts[w + 1] - deal.starts[w])
        perm = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, w])).permutation(n)
        return _Window(epoch, w, np.concatenate(keys)[perm], np.concatenate(text)[perm], np.concatenate(image)[perm],
                       {name: np.concatenate(parts)[perm] for name, parts in extras.items()},
                       np.concatenate(shard_ids)[perm])

    def _produce(self, start_step: int, q: queue.Queue, stop: threading.Event) -> None:
        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for epoch, w in self._window_sequence(start_step):
                if stop.is_set() or not put(self._load_window(epoch, w)):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    # ---- the consumer -------------------------------------------------------------------------------------------
    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches for start_step, start_step + 1, ... forever: exactly those an uninterrupted iterator yields."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(start_step, q, stop), daemon=True,
                                  name=f"token-loader-r{self.rank}")
        self._active.append((thread, stop))
        thread.start()
        current: _Window | None = None
        try:
            for step in range(start_step, 2**62):
                epoch, k = self._locate(step)
                starts, B = self._deal(epoch).starts, self.micro_batch
                lo, hi, pieces = k * B, (k + 1) * B, []
                while lo < hi:  # a batch may straddle windows
                    w = int(np.searchsorted(starts, lo, side="right")) - 1
                    if current is None or (current.epoch, current.index) != (epoch, w):
                        current = self._next_window(q, thread)
                        if (current.epoch, current.index) != (epoch, w):
                            raise RuntimeError(f"loader out of order: got window {current.epoch}/{current.index}, "
                                               f"wanted {epoch}/{w}")
                    a, b = lo - int(starts[w]), min(hi, int(starts[w + 1])) - int(starts[w])
                    pieces.append((current, a, b))
                    lo += b - a
                extras = {name: torch.from_numpy(np.concatenate([p.extras[name][a:b] for p, a, b in pieces]))
                          for name in pieces[0][0].extras}
                yield Batch(step=step, keys=np.concatenate([p.keys[a:b] for p, a, b in pieces]).tolist(),
                            text=torch.from_numpy(np.concatenate([p.text[a:b] for p, a, b in pieces])),
                            image=torch.from_numpy(np.concatenate([p.image[a:b] for p, a, b in pieces])
                                                   .astype(np.int64)),
                            shards=np.concatenate([p.shards[a:b] for p, a, b in pieces]).tolist(), **extras)
        finally:
            self._stop(thread, stop)

    @staticmethod
    def _next_window(q: queue.Queue, thread: threading.Thread) -> _Window:
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise RuntimeError("token loader thread ended without a window or an error") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def _stop(self, thread: threading.Thread, stop: threading.Event) -> None:
        stop.set()
        thread.join(timeout=30)
        if (thread, stop) in self._active:
            self._active.remove((thread, stop))

    def close(self) -> None:
        """Stop every prefetch thread this loader started."""
        for thread, stop in list(self._active):
            self._stop(thread, stop)

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
