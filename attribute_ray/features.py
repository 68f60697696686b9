"""Feature dashboards (formats.md §f) from an activation cache, computed combine-then-merge.

Cache layout (written by the activation-caching job)::

    manifest.json                 {"model", "transcoder", "n_layers", "n_features", "ctx_len", "n_sequences",
                                   "n_tokens", "bos", "threshold", "shards": [{"id", "first_sequence",
                                   "n_sequences", "n_activations"}, ...]}
    shards/{id:06d}.parquet       layer int16, feature int32, sequence int64, position int16, activation float32
    tokens/{id:06d}.parquet       sequence int64, tokens list<int32> (length ctx_len)

Three passes; each scans ONE shard (a DataFrame, a pyarrow Table or a dict of numpy arrays with the columns
above) and returns a small partial. Partials merge pairwise; every merge is associative and commutative and
its result is canonical (sorted arrays), so any shard order or merge tree gives identical partials. All
activations are never concatenated.

1. ``stats_partial(acts)`` → `StatsPartial`: per (layer, feature) count, act_min, act_max. ``merge_stats``.
2. ``detail_partial(acts, stats)`` → `DetailPartial`: per (layer, feature)
   - histogram: counts in `n_bins` equal bins over [act_min, act_max] (edges ``histogram_edges``; a bin is
     ``edges[i] <= a < edges[i+1]``, the last bin also holds ``a == act_max``: exactly ``np.histogram``);
   - top examples: the `top_k` distinct sequences with the largest per-sequence maximum activation
     (ties: smaller sequence); each keeps the position of its sequence maximum (ties: smaller position);
   - random examples: the `n_random` distinct sequences with the smallest ``sample_hash(layer, feature,
     sequence, seed)`` (ties: smaller sequence), each with its sequence maximum — independent of sharding.
   ``merge_details``.
3. ``context_partial(acts, wanted)`` → `ContextPartial`: every activation of feature (layer, feature) in the
   wanted sequences (``wanted_examples(details)``), so example windows can show per-token activations.
   ``merge_contexts``.

Then ``build_dashboards`` assembles the per-feature JSON; ``write_feature_store``/``read_feature`` keep a
compact per-layer parquet store and ``export_feature_json`` writes ``{cantor(layer, feature)}.json`` files.
``dashboards_from_cache`` runs the three passes serially (the Ray job maps them over shards instead).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attribute_ray.neuronpedia import cantor

ACT_COLUMNS = ("layer", "feature", "sequence", "position", "activation")
DEFAULT_QUANTILES: tuple[float, ...] = tuple((i + 1) / 100 for i in range(100))
"""Percentiles 1..100: the frontend labels an activation "NNpct" with NN = 1 + the index of the first
quantile value >= it (circuit-tracer frontend, renderActHistogram), so it expects 100 evenly spaced ones."""
TOP_NAME = "Top activations"
RANDOM_NAME = "Random sample"

Acts = Union[pd.DataFrame, pa.Table, Mapping[str, np.ndarray]]
FeatureKey = tuple[int, int]

_U64 = np.uint64
_MASK32 = np.int64(0xFFFFFFFF)


# ----- keys, hashing and small numpy helpers ------------------------------------------------------


def _key(layer: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """(layer, feature) → one int64 key, layer·2³² + feature, ordered like (layer, feature)."""
    return (np.asarray(layer, np.int64) << 32) | np.asarray(feature, np.int64)


def _split(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    key = np.asarray(key, np.int64)
    return key >> 32, key & _MASK32


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 array `x` (wrapping arithmetic)."""
    z = x + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def sample_hash(layer: np.ndarray, feature: np.ndarray, sequence: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 [n] hash of (layer, feature, sequence, seed) that orders the random sample.

    h = sm(seed); h = sm(h ^ layer); h = sm(h ^ feature); h = sm(h ^ sequence), sm = splitmix64, all mod 2⁶⁴."""
    seq = np.asarray(sequence, np.int64)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(seq.shape, int(seed) & 0xFFFFFFFFFFFFFFFF, dtype=_U64))
        for v in (layer, feature, seq):
            h = _splitmix64(h ^ np.broadcast_to(np.asarray(v, np.int64), seq.shape).astype(_U64))
    return h


def _starts(*sorted_cols: np.ndarray) -> np.ndarray:
    """Start indices of the runs of equal rows in lexicographically sorted columns (empty → [])."""
    n = len(sorted_cols[0])
    if n == 0:
        return np.zeros(0, np.int64)
    change = np.zeros(n, bool)
    change[0] = True
    for c in sorted_cols:
        change[1:] |= c[1:] != c[:-1]
    return np.flatnonzero(change)


def _rank_in_group(group_starts: np.ndarray, n: int) -> np.ndarray:
    """Rank of each row within its run ([n] int64), given the runs' start indices."""
    lengths = np.diff(np.append(group_starts, n))
    return np.arange(n) - np.repeat(group_starts, lengths)


def _columns(acts: Acts, names: Sequence[str] = ACT_COLUMNS) -> dict[str, np.ndarray]:
    """The activation columns as numpy arrays (int64 ids, float32 activation)."""
    if isinstance(acts, pa.Table):
        get = lambda n: acts.column(n).to_numpy()  # noqa: E731
    elif isinstance(acts, pd.DataFrame):
        get = lambda n: acts[n].to_numpy()  # noqa: E731
    else:
        get = lambda n: np.asarray(acts[n])  # noqa: E731
    return {n: get(n).astype(np.float32 if n == "activation" else np.int64, copy=False) for n in names}


# ----- pass 1: counts and ranges --------------------------------------------------------------------


@dataclass(eq=False)
class StatsPartial:
    """Per (layer, feature), sorted by key = layer·2³² + feature: count [n] int64, act_min/act_max [n] float32."""

    key: np.ndarray
    count: np.ndarray
    act_min: np.ndarray
    act_max: np.ndarray

    @property
    def layer(self) -> np.ndarray:
        return _split(self.key)[0]

    @property
    def feature(self) -> np.ndarray:
        return _split(self.key)[1]

    def __len__(self) -> int:
        return len(self.key)

    def get(self, layer: int, feature: int) -> tuple[int, float, float] | None:
        """(count, act_min, act_max) of one feature, or None if it never activated."""
        k = int(_key(np.int64(layer), np.int64(feature)))
        i = int(np.searchsorted(self.key, k))
        if i == len(self.key) or self.key[i] != k:
            return None
        return int(self.count[i]), float(self.act_min[i]), float(self.act_max[i])

    def equals(self, other: StatsPartial) -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("key", "count", "act_min", "act_max"))

    @classmethod
    def empty(cls) -> StatsPartial:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))


def _reduce_stats(key: np.ndarray, count: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> StatsPartial:
    if len(key) == 0:
        return StatsPartial.empty()
    order = np.argsort(key, kind="stable")
    key = key[order]
    s = _starts(key)
    return StatsPartial(
        key[s].copy(),
        np.add.reduceat(count[order], s).astype(np.int64),
        np.minimum.reduceat(lo[order], s).astype(np.float32),
        np.maximum.reduceat(hi[order], s).astype(np.float32),
    )


def stats_partial(acts: Acts) -> StatsPartial:
    """Pass 1 over one shard: count, min and max activation of every (layer, feature) present."""
    c = _columns(acts, ("layer", "feature", "activation"))
    a = c["activation"]
    return _reduce_stats(_key(c["layer"], c["feature"]), np.ones(len(a), np.int64), a, a)


def merge_stats(a: StatsPartial, b: StatsPartial) -> StatsPartial:
    """Merge two pass-1 partials (associative, commutative)."""
    return _reduce_stats(
        np.concatenate([a.key, b.key]),
        np.concatenate([a.count, b.count]),
        np.concatenate([a.act_min, b.act_min]),
        np.concatenate([a.act_max, b.act_max]),
    )


def histogram_edges(act_min: np.ndarray | float, act_max: np.ndarray | float, n_bins: int) -> np.ndarray:
    """Bin edges [..., n_bins+1] float64, computed like ``np.linspace(act_min, act_max, n_bins+1)``."""
    lo = np.asarray(act_min, np.float64)[..., None]
    hi = np.asarray(act_max, np.float64)[..., None]
    edges = lo + np.arange(n_bins + 1, dtype=np.float64) * ((hi - lo) / n_bins)
    edges[..., -1] = hi[..., 0]
    return edges


# ----- pass 2: histograms and example selection ----------------------------------------------------


@dataclass(eq=False)
class Examples:
    """Selected examples, one per (key, sequence), sorted by key then rank: key, sequence, position [n] int64,
    activation [n] float32 (the sequence's maximum activation of the feature, at `position`)."""

    key: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    activation: np.ndarray

    def __len__(self) -> int:
        return len(self.key)

    def equals(self, other: Examples) -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("key", "sequence", "position", "activation"))

    @classmethod
    def empty(cls) -> Examples:
        z = np.zeros(0, np.int64)
        return cls(z, z.copy(), z.copy(), np.zeros(0, np.float32))

    @staticmethod
    def concat(a: Examples, b: Examples) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate([getattr(a, f), getattr(b, f)]) for f in ("key", "sequence", "position", "activation"))


def _pack(cols: Sequence[np.ndarray], *, like: Sequence[Sequence[np.ndarray]] = ()) -> np.ndarray | None:
    """Columns of int64 packed into one int64 whose order is their lexicographic order, or None when the
    value ranges (also over the matching columns of `like`) do not fit in 62 bits."""
    lows, spans, total = [], [], 1
    for i, c in enumerate(cols):
        group = [c, *(o[i] for o in like)]
        group = [g for g in group if len(g)]
        lo = min((int(g.min()) for g in group), default=0)
        span = max((int(g.max()) for g in group), default=0) - lo + 1
        lows.append(lo)
        spans.append(span)
        total *= span
    if total >= (1 << 62):
        return None
    out = np.zeros(len(cols[0]), np.int64)
    for c, lo, span in zip(cols, lows, spans):
        out = out * span + (np.asarray(c, np.int64) - lo)
    return out


def _sort_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stable order sorting int64 columns (a, b) lexicographically (one argsort of a packed int64 when the
    ranges allow it, the usual case; else np.lexsort)."""
    packed = _pack([a, b])
    return np.lexsort((b, a)) if packed is None else np.argsort(packed, kind="stable")


def _group_ids(sorted_key: np.ndarray) -> np.ndarray:
    """Dense run index [n] of a sorted column."""
    g = np.zeros(len(sorted_key), np.int64)
    if len(g):
        g[1:] = np.cumsum(sorted_key[1:] != sorted_key[:-1])
    return g


def _desc_f32(act: np.ndarray) -> np.ndarray:
    """int64 in [0, 2³²) whose ascending order is the DESCENDING order of float32 `act` (−0.0 == 0.0)."""
    bits = (np.asarray(act, np.float32) + np.float32(0.0)).view(np.uint32)
    asc = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    return (~asc).astype(np.int64)


def _sequence_maxima(key, seq, pos, act) -> tuple[np.ndarray, ...]:
    """One row per (key, sequence), sorted by (key, sequence): its largest activation, ties → smaller position."""
    if len(key) == 0:
        return key, seq, pos, act
    order = _sort_pairs(key, seq)
    key, seq, pos, act = key[order], seq[order], pos[order], act[order]
    s = _starts(key, seq)
    gmax = np.maximum.reduceat(act, s)
    g = np.repeat(np.arange(len(s)), np.diff(np.append(s, len(key))))
    gpos = np.minimum.reduceat(np.where(act == gmax[g], pos, np.iinfo(np.int64).max), s)
    return key[s], seq[s], gpos, gmax


def _select_top(key, seq, pos, act, k: int, *, reduced: bool = False) -> Examples:
    """Top-k distinct sequences per key by (larger activation, smaller sequence); each with its maximum's
    position. `reduced`: the rows already are ``_sequence_maxima`` output (one per (key, sequence), sorted)."""
    if not reduced:
        key, seq, pos, act = _sequence_maxima(key, seq, pos, act)
    # rows are sorted by (key, sequence): a stable sort on (key, −act) leaves equal activations by sequence
    order = np.argsort((_group_ids(key) << 32) | _desc_f32(act), kind="stable")
    key, seq, pos, act = key[order], seq[order], pos[order], act[order]
    keep = _rank_in_group(_starts(key), len(key)) < k
    return Examples(key[keep], seq[keep], pos[keep], act[keep])


def _select_random(key, seq, pos, act, k: int, seed: int, *, reduced: bool = False) -> Examples:
    """The k distinct sequences per key with the smallest sample_hash (ties: smaller sequence)."""
    if not reduced:
        key, seq, pos, act = _sequence_maxima(key, seq, pos, act)
    layer, feat = _split(key)
    h = sample_hash(layer, feat, seq, seed)
    order = np.lexsort((h, key))  # stable: equal hashes stay in sequence order
    key, seq, pos, act = key[order], seq[order], pos[order], act[order]
    keep = _rank_in_group(_starts(key), len(key)) < k
    return Examples(key[keep], seq[keep], pos[keep], act[keep])


@dataclass(eq=False)
class DetailPartial:
    """Pass-2 partial. hist_key [h] int64 sorted, hist [h, n_bins] int64 counts; `top` and `random` examples."""

    hist_key: np.ndarray
    hist: np.ndarray
    top: Examples
    random: Examples
    top_k: int
    n_bins: int
    n_random: int
    seed: int

    def histogram(self, layer: int, feature: int) -> np.ndarray | None:
        """Counts [n_bins] of one feature, or None."""
        k = int(_key(np.int64(layer), np.int64(feature)))
        i = int(np.searchsorted(self.hist_key, k))
        return self.hist[i] if i < len(self.hist_key) and self.hist_key[i] == k else None

    def equals(self, other: DetailPartial) -> bool:
        return (
            (self.top_k, self.n_bins, self.n_random, self.seed) == (other.top_k, other.n_bins, other.n_random, other.seed)
            and np.array_equal(self.hist_key, other.hist_key)
            and np.array_equal(self.hist, other.hist)
            and self.top.equals(other.top)
            and self.random.equals(other.random)
        )


def _reduce_hist(key: np.ndarray, hist: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    if len(key) == 0:
        return np.zeros(0, np.int64), np.zeros((0, n_bins), np.int64)
    order = np.argsort(key, kind="stable")
    key = key[order]
    s = _starts(key)
    return key[s].copy(), np.add.reduceat(hist[order], s, axis=0).astype(np.int64)


def detail_partial(
    acts: Acts, stats: StatsPartial, *, top_k: int = 20, n_bins: int = 32, n_random: int = 10, seed: int = 0
) -> DetailPartial:
    """Pass 2 over one shard, given the MERGED pass-1 `stats`: histograms, top and random examples."""
    c = _columns(acts)
    key, seq, pos, act = _key(c["layer"], c["feature"]), c["sequence"], c["position"], c["activation"]
    # histogram: bin of each activation within its feature's [act_min, act_max]
    i = np.searchsorted(stats.key, key)
    if len(key) and (np.any(i >= len(stats.key)) or np.any(stats.key[np.minimum(i, len(stats.key) - 1)] != key)):
        raise KeyError("activations of a (layer, feature) absent from stats: pass the stats merged over all shards")
    lo = stats.act_min[i].astype(np.float64)
    hi = stats.act_max[i].astype(np.float64)
    a = act.astype(np.float64)
    width = (hi - lo) / n_bins
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(width > 0, np.floor((a - lo) / np.where(width > 0, width, 1.0)), n_bins - 1)
    b = np.clip(b, 0, n_bins - 1).astype(np.int64)
    # exact agreement with the edges (np.histogram semantics): fix float rounding by at most one bin
    left = lo + b * width
    b = np.where((b > 0) & (a < left), b - 1, b)
    right = np.where(b + 1 >= n_bins, np.inf, lo + (b + 1) * width)
    b = np.where((b < n_bins - 1) & (a >= right), b + 1, b)
    b = np.where(width > 0, b, n_bins - 1)
    ukey, inv = np.unique(key, return_inverse=True)
    hist = np.bincount(inv.reshape(-1) * n_bins + b, minlength=len(ukey) * n_bins).reshape(len(ukey), n_bins)
    maxima = _sequence_maxima(key, seq, pos, act)
    return DetailPartial(
        ukey.astype(np.int64),
        hist.astype(np.int64),
        _select_top(*maxima, top_k, reduced=True),
        _select_random(*maxima, n_random, seed, reduced=True),
        top_k,
        n_bins,
        n_random,
        seed,
    )


def merge_details(a: DetailPartial, b: DetailPartial) -> DetailPartial:
    """Merge two pass-2 partials (associative, commutative; same top_k/n_bins/n_random/seed required)."""
    params = (a.top_k, a.n_bins, a.n_random, a.seed)
    if params != (b.top_k, b.n_bins, b.n_random, b.seed):
        raise ValueError(f"cannot merge detail partials with different parameters: {params} vs {(b.top_k, b.n_bins, b.n_random, b.seed)}")
    hk, h = _reduce_hist(np.concatenate([a.hist_key, b.hist_key]), np.concatenate([a.hist, b.hist]), a.n_bins)
    return DetailPartial(
        hk, h,
        _select_top(*Examples.concat(a.top, b.top), a.top_k),
        _select_random(*Examples.concat(a.random, b.random), a.n_random, a.seed),
        *params,
    )


# ----- pass 3: per-token activations of the example windows ------------------------------------------


def wanted_examples(details: DetailPartial) -> np.ndarray:
    """[n, 3] int64 (layer, feature, sequence), unique and sorted: the windows pass 3 must collect."""
    key = np.concatenate([details.top.key, details.random.key])
    seq = np.concatenate([details.top.sequence, details.random.sequence])
    if len(key) == 0:
        return np.zeros((0, 3), np.int64)
    order = np.lexsort((seq, key))
    key, seq = key[order], seq[order]
    s = _starts(key, seq)
    layer, feat = _split(key[s])
    return np.stack([layer, feat, seq[s]], axis=1)


def wanted_by_shard(wanted: np.ndarray, shards: Sequence[Mapping[str, int]]) -> dict[int, np.ndarray]:
    """Split [n, 3] wanted triples by the manifest's shards ({"id", "first_sequence", "n_sequences"}), so each
    pass-3 task gets only its own rows: {shard id: [m, 3]}."""
    wanted = np.asarray(wanted, np.int64).reshape(-1, 3)
    return {
        int(sh["id"]): wanted[(wanted[:, 2] >= sh["first_sequence"]) & (wanted[:, 2] < sh["first_sequence"] + sh["n_sequences"])]
        for sh in shards
    }


@dataclass(eq=False)
class ContextPartial(Examples):
    """Activations in wanted windows, sorted by (key, sequence, position): the same columns as `Examples`
    (key, sequence, position [n] int64, activation [n] float32), every position rather than one per sequence."""

    def window(self, layer: int, feature: int, sequence: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions [m], activations [m]) of one feature in one sequence."""
        k = int(_key(np.int64(layer), np.int64(feature)))
        lo = np.searchsorted(self.key, k, "left")
        hi = np.searchsorted(self.key, k, "right")
        a = lo + np.searchsorted(self.sequence[lo:hi], sequence, "left")
        b = lo + np.searchsorted(self.sequence[lo:hi], sequence, "right")
        return self.position[a:b], self.activation[a:b]


def _reduce_context(key, seq, pos, act) -> ContextPartial:
    """Sort by (key, sequence, position); duplicate rows (overlapping shards) keep the largest activation."""
    packed = _pack([key, seq, pos])
    order = np.lexsort((pos, seq, key)) if packed is None else np.argsort(packed, kind="stable")
    key, seq, pos, act = key[order], seq[order], pos[order], act[order]
    s = _starts(key, seq, pos)
    if len(s) < len(key):
        act = np.maximum.reduceat(act, s)
    else:
        act = act[s]
    return ContextPartial(key[s], seq[s], pos[s], act)


def _wanted_arrays(wanted: Any) -> tuple[np.ndarray, np.ndarray]:
    """(key, sequence) arrays from an [n, 3] array, a (layer, feature, sequence) DataFrame/dict or triples."""
    if isinstance(wanted, (pd.DataFrame, Mapping)):
        c = _columns(wanted, ("layer", "feature", "sequence"))
        return _key(c["layer"], c["feature"]), c["sequence"]
    w = np.asarray(list(wanted) if not isinstance(wanted, np.ndarray) else wanted, np.int64).reshape(-1, 3)
    return _key(w[:, 0], w[:, 1]), w[:, 2]


def context_partial(acts: Acts, wanted: Any) -> ContextPartial:
    """Pass 3 over one shard: every activation of feature (l, f) in sequence s for (l, f, s) in `wanted`
    (an [n, 3] array from ``wanted_examples``, a DataFrame with layer/feature/sequence columns, or triples)."""
    c = _columns(acts)
    key, seq = _key(c["layer"], c["feature"]), c["sequence"]
    wkey, wseq = _wanted_arrays(wanted)
    packed = _pack([key, seq], like=[[wkey, wseq]]) if len(wkey) else None
    if packed is not None:  # membership of (key, sequence) via binary search in the sorted wanted pairs
        w = np.sort(_pack([wkey, wseq], like=[[key, seq]]))
        i = np.minimum(np.searchsorted(w, packed), len(w) - 1)
        idx = np.flatnonzero(w[i] == packed)
    else:
        idx = np.flatnonzero(np.isin(key, wkey) & np.isin(seq, wseq))
        if len(idx) and len(wkey):
            pairs = pd.MultiIndex.from_arrays([key[idx], seq[idx]])
            idx = idx[pairs.isin(pd.MultiIndex.from_arrays([wkey, wseq]))]
    return _reduce_context(key[idx], seq[idx], c["position"][idx], c["activation"][idx])


def merge_contexts(a: ContextPartial, b: ContextPartial) -> ContextPartial:
    """Merge two pass-3 partials (associative, commutative)."""
    return _reduce_context(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in ("key", "sequence", "position", "activation")))


def merge_all(partials: Iterable[Any], merge: Callable[[Any, Any], Any]) -> Any:
    """Fold partials pairwise as a balanced tree (any order gives the same result)."""
    items = list(partials)
    if not items:
        raise ValueError("nothing to merge")
    while len(items) > 1:
        items = [merge(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


# ----- assembly -----------------------------------------------------------------------------------------


def quantiles_from_histogram(
    counts: np.ndarray, act_min: float, act_max: float, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> list[float]:
    """Activation quantiles (among active tokens) estimated from bin counts [n_bins] over [act_min, act_max]:
    the value where the piecewise-linear CDF (uniform within each bin) reaches q·count. q = 1 gives act_max."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0 or act_max <= act_min:
        return [float(act_min)] * len(quantiles)
    edges = histogram_edges(act_min, act_max, len(counts))
    cdf = np.concatenate([[0.0], np.cumsum(counts)])
    target = np.clip(np.asarray(quantiles, np.float64), 0.0, 1.0) * total
    i = np.clip(np.searchsorted(cdf[1:], target, "left"), 0, len(counts) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(counts[i] > 0, (target - cdf[i]) / counts[i], 0.0)
    vals = edges[i] + np.clip(frac, 0.0, 1.0) * (edges[i + 1] - edges[i])
    return [float(v) for v in vals]


def _example(tokens: Sequence[int], positions: np.ndarray, acts: np.ndarray, pos: int, ctx_window: int | None,
             ctx_after: int, strings: Mapping[int, str], repeated: bool) -> dict:
    n = len(tokens)
    start = 0 if ctx_window is None else max(0, pos - ctx_window + 1)
    end = n if ctx_window is None else min(n, pos + ctx_after + 1)
    values = np.zeros(end - start, np.float64)
    m = (positions >= start) & (positions < end)
    values[positions[m] - start] = acts[m]
    return {
        "tokens": [strings[int(t)] for t in tokens[start:end]],
        "tokens_acts_list": [float(v) for v in values],
        "train_token_ind": int(pos - start),
        "is_repeated_datapoint": bool(repeated),
    }


def _groups(key: np.ndarray) -> dict[int, slice]:
    s = _starts(key)
    ends = np.append(s[1:], len(key))
    return {int(key[a]): slice(int(a), int(b)) for a, b in zip(s, ends)}


def build_dashboards(
    stats: StatsPartial,
    details: DetailPartial,
    contexts: ContextPartial,
    tokens_lookup: Callable[[list[int]], Mapping[int, Sequence[int]]] | Mapping[int, Sequence[int]],
    *,
    n_tokens_total: int,
    decode: Callable[[list[int]], list[str]],
    logit_effects: Mapping[FeatureKey, tuple[list[str], list[str]]] | None = None,
    transcoder_id: str = "",
    ctx_window: int | None = 16,
    ctx_after: int = 4,
    dense_threshold: float = 0.1,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    layers: Iterable[int] | None = None,
) -> dict[FeatureKey, dict]:
    """Per-feature dashboard JSON (formats.md §f) for every (layer, feature) with count > 0.

    - `tokens_lookup`: sequence id → its C token ids; a mapping, or a callable called ONCE with the sorted
      list of every sequence needed.
    - `decode`: token ids → one display string per id (called once with the sorted unique ids shown).
    - `logit_effects`: from ``logit_effects(model)``; missing features get empty top/bottom logits.
    - Example windows show positions [pos − ctx_window + 1, pos + ctx_after] clipped to the sequence, where pos
      is the example's max-activation position (`train_token_ind` = pos − first shown position);
      ctx_window=None shows the whole sequence. Random-sample examples whose sequence is also a top example
      have ``is_repeated_datapoint`` true (the frontend fades them).
    - `quantile_values`: activation quantiles `quantiles` (default percentiles 1..100) among active tokens,
      interpolated linearly within histogram bins (``quantiles_from_histogram``).
    - `histogram`: raw bin counts (as floats), n_bins equal bins over [act_min, act_max].
    - `activation_frequency` = count / n_tokens_total; `dense` = frequency > dense_threshold.
    - `layers`: restrict to these layers (e.g. one Ray task per layer).
    """
    keys = stats.key
    if layers is not None:
        keys = keys[np.isin(stats.layer, np.asarray(list(layers), np.int64))]
    keys = keys[stats.count[np.searchsorted(stats.key, keys)] > 0]
    kset = set(keys.tolist())
    top_g, rnd_g = _groups(details.top.key), _groups(details.random.key)
    ctx_g = _groups(contexts.key)
    hist_idx = {int(k): i for i, k in enumerate(details.hist_key)}

    needed = sorted({int(s) for k in kset for g, ex in ((top_g, details.top), (rnd_g, details.random))
                     if k in g for s in ex.sequence[g[k]]})
    if callable(tokens_lookup):
        tok_map = tokens_lookup(needed) if needed else {}
    else:
        tok_map = tokens_lookup
    missing = [s for s in needed if s not in tok_map]
    if missing:
        raise KeyError(f"tokens_lookup has no tokens for sequences {missing[:10]}{'...' if len(missing) > 10 else ''}")
    tokens = {s: np.asarray(tok_map[s], np.int64) for s in needed}
    ids = sorted({int(t) for s in needed for t in np.unique(tokens[s])})
    strings = dict(zip(ids, decode(ids))) if ids else {}

    stat_i = np.searchsorted(stats.key, keys)
    out: dict[FeatureKey, dict] = {}
    for k, si in zip(keys.tolist(), stat_i.tolist()):
        layer, feature = k >> 32, k & 0xFFFFFFFF
        count = int(stats.count[si])
        lo, hi = float(stats.act_min[si]), float(stats.act_max[si])
        cs = ctx_g.get(k, slice(0, 0))
        cseq, cpos, cact = contexts.sequence[cs], contexts.position[cs], contexts.activation[cs]

        def examples(ex: Examples, g: dict[int, slice], repeated: set[int]) -> list[dict]:
            sl = g.get(k, slice(0, 0))
            res = []
            for s, p in zip(ex.sequence[sl].tolist(), ex.position[sl].tolist()):
                a, b = np.searchsorted(cseq, s, "left"), np.searchsorted(cseq, s, "right")
                res.append(_example(tokens[s], cpos[a:b], cact[a:b], p, ctx_window, ctx_after, strings, s in repeated))
            return res

        top_seqs = set(details.top.sequence[top_g[k]].tolist()) if k in top_g else set()
        hist = details.hist[hist_idx[k]] if k in hist_idx else np.zeros(details.n_bins, np.int64)
        freq = count / n_tokens_total if n_tokens_total > 0 else 0.0
        top_logits, bottom_logits = (logit_effects or {}).get((layer, feature), ([], []))
        out[(layer, feature)] = {
            "index": cantor(layer, feature),
            "transcoder_id": transcoder_id,
            "layer": layer,
            "feature": feature,
            "activation_frequency": float(freq),
            "dense": bool(freq > dense_threshold),
            "act_min": lo,
            "act_max": hi,
            "quantile_values": quantiles_from_histogram(hist, lo, hi, quantiles),
            "histogram": [float(h) for h in hist],
            "top_logits": [str(t) for t in top_logits],
            "bottom_logits": [str(t) for t in bottom_logits],
            "examples_quantiles": [
                {"quantile_name": TOP_NAME, "examples": examples(details.top, top_g, set())},
                {"quantile_name": RANDOM_NAME, "examples": examples(details.random, rnd_g, top_seqs)},
            ],
        }
    return out


# ----- direct logit effects ------------------------------------------------------------------------------


def logit_effects(
    model: Any,
    layer_features: Mapping[int, Sequence[int]] | None = None,
    k: int = 10,
    *,
    chunk_size: int | None = None,
    post_mlp_gain: bool = True,
) -> dict[FeatureKey, tuple[list[str], list[str]]]:
    """Top-k / bottom-k tokens of each feature's direct logit effect (strings from ``model.tokenizer``).

    For feature f of source layer S (`model` is a `ReplacementModel`):
        v = Σ_{T ∈ targets(S)} coef_{S,T} · scale_{S,T}[f] · W_{S,T}[f]          [D] (scale 1 if absent; offsets ignored)
        v ← v − mean(v) for a LayerNorm family (LayerNorm centres its input)
        logits = (v ⊙ g_final) @ W_U                                           [vocab]
    with g_final the final norm's gain (rms: w; rms_gemma: 1 + w; layernorm: w). With `post_mlp_gain` and a
    transcoder writing at ``mlp_out`` of a family with a post-MLP norm (Gemma-2), each target's term is also
    multiplied by that layer's post-MLP norm gain (1 + w), the norm the write passes through before the
    residual. Data-dependent norm scales are ignored. Computed per source layer in feature chunks of
    [chunk, vocab] logits; `layer_features` None means every feature of every layer.
    """
    import torch

    tc, fam = model.transcoder, model.family
    W_U = model.unembedding.detach()  # [D, V]
    D, V = W_U.shape
    k = min(k, V)
    chunk = chunk_size or max(1, min(4096, (1 << 24) // V))

    def gain(norm) -> torch.Tensor:
        w = norm.weight.detach().float()
        return 1.0 + w if fam.norm == "rms_gemma" else w

    g_final = gain(fam.get(model.model, fam.final_norm))
    post = {}
    if post_mlp_gain and fam.post_mlp_norm and tc.hookpoints.output == "mlp_out":
        layers = fam.decoder_layers(model.model)
        post = {t: gain(fam.get(layers[t], fam.post_mlp_norm)) for t in range(tc.n_layers)}
    mm_dtype = torch.float32 if W_U.device.type == "cpu" else W_U.dtype
    W = W_U.to(mm_dtype)

    if layer_features is None:
        layer_features = {s: range(tc.n_features(s)) for s in range(tc.n_layers)}
    top_ids, bot_ids, keys = [], [], []
    with torch.no_grad():
        for s, feats in layer_features.items():
            feats = torch.as_tensor(list(feats), dtype=torch.long)
            for c0 in range(0, len(feats), chunk):
                idx = feats[c0 : c0 + chunk]
                dev_idx = idx.to(tc.device)
                v = torch.zeros(len(idx), D, dtype=torch.float32, device=W_U.device)
                for t in tc.targets(s):
                    dec = tc.decoders[(s, t)]
                    w = dec.W[dev_idx].float() * dec.coef
                    if dec.scale is not None:
                        w = w * dec.scale[dev_idx].float()[:, None]
                    if t in post:
                        w = w * post[t]
                    v += w.to(v.device)
                if fam.norm == "layernorm":
                    v = v - v.mean(-1, keepdim=True)
                logits = (v * g_final.to(v.device)).to(mm_dtype) @ W
                top_ids.append(logits.topk(k, dim=-1).indices.cpu())
                bot_ids.append(logits.topk(k, dim=-1, largest=False).indices.cpu())
                keys.extend((int(s), int(f)) for f in idx.tolist())
    if not keys:
        return {}
    top = torch.cat(top_ids).numpy()
    bot = torch.cat(bot_ids).numpy()
    uniq = np.unique(np.concatenate([top.ravel(), bot.ravel()])).tolist()
    strings = dict(zip(uniq, model.tokenizer.batch_decode([[i] for i in uniq])))
    return {key: ([strings[i] for i in t], [strings[i] for i in b]) for key, t, b in zip(keys, top.tolist(), bot.tolist())}


# ----- compact store --------------------------------------------------------------------------------------

STORE_SCHEMA = pa.schema([
    ("feature", pa.int32()),
    ("index", pa.int64()),
    ("frequency", pa.float64()),
    ("act_min", pa.float64()),
    ("act_max", pa.float64()),
    ("dense", pa.bool_()),
    ("top_logits", pa.list_(pa.string())),
    ("bottom_logits", pa.list_(pa.string())),
    ("histogram", pa.list_(pa.float64())),
    ("examples_json", pa.string()),
])


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, w)


def _features_dir(out_dir: str | os.PathLike) -> Path:
    p = Path(out_dir)
    return p if (p / "index.json").exists() and not (p / "features" / "index.json").exists() else p / "features"


def write_feature_store(
    dashboards: Mapping[FeatureKey, dict], out_dir: str | os.PathLike, *, transcoder_id: str | None = None
) -> Path:
    """Write ``out_dir/features/layer_{l:03d}.parquet`` (one row per feature, sorted; `STORE_SCHEMA`) for every
    layer in `dashboards`, and ``out_dir/features/index.json`` = {"layers": {"l": {"file", "n_features"}},
    "transcoder_id"}. Layers already listed in an existing index (and not rewritten) are kept. Atomic
    writes (temp file + os.replace). Returns the index path."""
    fdir = Path(out_dir) / "features"
    by_layer: dict[int, list[dict]] = {}
    for (layer, _), d in dashboards.items():
        by_layer.setdefault(int(layer), []).append(d)
    index_path = fdir / "index.json"
    old = json.loads(index_path.read_text()) if index_path.exists() else {}
    entries = {l: e for l, e in old.get("layers", {}).items() if (fdir / e["file"]).exists()}
    ids = {d.get("transcoder_id", "") for d in dashboards.values()}
    if transcoder_id is not None:
        tid = transcoder_id
    else:
        tid = ids.pop() if len(ids) == 1 else old.get("transcoder_id", "")
    for layer, ds in sorted(by_layer.items()):
        ds = sorted(ds, key=lambda d: d["feature"])
        table = pa.table({
            "feature": [int(d["feature"]) for d in ds],
            "index": [int(d["index"]) for d in ds],
            "frequency": [float(d["activation_frequency"]) for d in ds],
            "act_min": [float(d["act_min"]) for d in ds],
            "act_max": [float(d["act_max"]) for d in ds],
            "dense": [bool(d["dense"]) for d in ds],
            "top_logits": [list(d["top_logits"]) for d in ds],
            "bottom_logits": [list(d["bottom_logits"]) for d in ds],
            "histogram": [[float(x) for x in d["histogram"]] for d in ds],
            "examples_json": [json.dumps(d["examples_quantiles"], separators=(",", ":")) for d in ds],
        }, schema=STORE_SCHEMA)
        name = f"layer_{layer:03d}.parquet"
        _atomic_write(fdir / name, lambda tmp, t=table: pq.write_table(t, tmp, compression="zstd", compression_level=19))
        entries[str(layer)] = {"file": name, "n_features": len(ds)}
    entries = dict(sorted(entries.items(), key=lambda kv: int(kv[0])))
    _write_text(index_path, json.dumps({"layers": entries, "transcoder_id": tid}, indent=1))
    return index_path


@lru_cache(maxsize=8)
def _load_index(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text())


@lru_cache(maxsize=32)
def _load_layer(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, pa.Table]:
    table = pq.read_table(path)
    return table.column("feature").to_numpy().astype(np.int64), table


def _index(fdir: Path) -> dict:
    p = fdir / "index.json"
    return _load_index(str(p), p.stat().st_mtime_ns)


def _row_dashboard(row: dict, layer: int, transcoder_id: str) -> dict:
    return {
        "index": int(row["index"]),
        "transcoder_id": transcoder_id,
        "layer": int(layer),
        "feature": int(row["feature"]),
        "activation_frequency": float(row["frequency"]),
        "dense": bool(row["dense"]),
        "act_min": float(row["act_min"]),
        "act_max": float(row["act_max"]),
        # not stored: the default percentiles follow exactly from the histogram
        "quantile_values": quantiles_from_histogram(np.asarray(row["histogram"]), row["act_min"], row["act_max"]),
        "histogram": list(row["histogram"]),
        "top_logits": list(row["top_logits"]),
        "bottom_logits": list(row["bottom_logits"]),
        "examples_quantiles": json.loads(row["examples_json"]),
    }


def read_feature(out_dir: str | os.PathLike, layer: int, feature: int) -> dict | None:
    """The dashboard of (layer, feature) from a store written by ``write_feature_store`` (`out_dir` as given
    there, or its ``features`` folder), or None. Reads only that layer's file (LRU-cached per file version)."""
    fdir = _features_dir(out_dir)
    if not (fdir / "index.json").exists():
        return None
    index = _index(fdir)
    entry = index["layers"].get(str(int(layer)))
    if entry is None:
        return None
    p = fdir / entry["file"]
    st = p.stat()
    feats, table = _load_layer(str(p), st.st_mtime_ns, st.st_size)
    i = int(np.searchsorted(feats, int(feature)))
    if i == len(feats) or feats[i] != feature:
        return None
    row = {name: col[0] for name, col in table.slice(i, 1).to_pydict().items()}
    return _row_dashboard(row, layer, index.get("transcoder_id", ""))


def iter_store(out_dir: str | os.PathLike) -> Iterable[dict]:
    """Every dashboard in a store, layer by layer, feature order."""
    fdir = _features_dir(out_dir)
    index = _index(fdir)
    for l, entry in sorted(index["layers"].items(), key=lambda kv: int(kv[0])):
        table = pq.read_table(fdir / entry["file"])
        for row in table.to_pylist():
            yield _row_dashboard(row, int(l), index.get("transcoder_id", ""))


def export_feature_json(source: Mapping[FeatureKey, dict] | str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Write one ``{cantor(layer, feature)}.json`` per feature (the frontend's ``{scan}/{index}.json``) from
    dashboards or a feature store directory; returns the number of files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dashboards = source.values() if isinstance(source, Mapping) else iter_store(source)
    n = 0
    for d in dashboards:
        _write_text(out / f"{d['index']}.json", json.dumps(d, separators=(",", ":")))
        n += 1
    return n


# ----- cache reading and a serial driver -------------------------------------------------------------------


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    return json.loads((Path(cache_dir) / "manifest.json").read_text())


def read_shard(cache_dir: str | os.PathLike, shard_id: int) -> pd.DataFrame:
    """Activation rows of one shard (columns ACT_COLUMNS)."""
    return pq.read_table(Path(cache_dir) / "shards" / f"{shard_id:06d}.parquet", columns=list(ACT_COLUMNS)).to_pandas()


def cache_tokens_lookup(cache_dir: str | os.PathLike) -> Callable[[list[int]], dict[int, list[int]]]:
    """A `tokens_lookup` for `build_dashboards` reading only the token shards holding the requested sequences."""
    man = read_manifest(cache_dir)
    shards = sorted(man["shards"], key=lambda s: s["first_sequence"])
    firsts = np.array([s["first_sequence"] for s in shards], np.int64)

    def lookup(sequences: list[int]) -> dict[int, list[int]]:
        seqs = np.unique(np.asarray(sequences, np.int64))
        which = np.searchsorted(firsts, seqs, "right") - 1
        out: dict[int, list[int]] = {}
        for w in np.unique(which[which >= 0]).tolist():
            want = seqs[which == w]
            t = pq.read_table(Path(cache_dir) / "tokens" / f"{shards[w]['id']:06d}.parquet")
            t = t.filter(pc.is_in(t.column("sequence"), value_set=pa.array(want, pa.int64())))
            out.update(zip(t.column("sequence").to_pylist(), t.column("tokens").to_pylist()))
        return out

    return lookup


def dashboards_from_cache(
    cache_dir: str | os.PathLike,
    *,
    decode: Callable[[list[int]], list[str]],
    logit_effects: Mapping[FeatureKey, tuple[list[str], list[str]]] | None = None,
    transcoder_id: str | None = None,
    top_k: int = 20,
    n_bins: int = 32,
    n_random: int = 10,
    seed: int = 0,
    **build_kw: Any,
) -> dict[FeatureKey, dict]:
    """All three passes serially over the cache's shards, then ``build_dashboards`` (small caches, tests)."""
    man = read_manifest(cache_dir)
    ids = [s["id"] for s in man["shards"]]
    stats = merge_all((stats_partial(read_shard(cache_dir, i)) for i in ids), merge_stats)
    details = merge_all(
        (detail_partial(read_shard(cache_dir, i), stats, top_k=top_k, n_bins=n_bins, n_random=n_random, seed=seed) for i in ids),
        merge_details,
    )
    wanted = wanted_examples(details)
    contexts = merge_all((context_partial(read_shard(cache_dir, i), wanted) for i in ids), merge_contexts)
    return build_dashboards(
        stats, details, contexts, cache_tokens_lookup(cache_dir), n_tokens_total=int(man["n_tokens"]), decode=decode,
        logit_effects=logit_effects, transcoder_id=man.get("transcoder", "") if transcoder_id is None else transcoder_id,
        **build_kw,
    )
