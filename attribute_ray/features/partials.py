"""Map-reduce partials over an activation cache's shards: the three passes behind the dashboards (docs/formats.md §f).

Three passes; each scans ONE shard (a DataFrame, a pyarrow Table or a dict of numpy arrays with the columns
`ACT_COLUMNS` of `attribute_ray.activation_cache`) and returns a small partial. Partials merge pairwise; every
merge is associative and commutative and its result is canonical (sorted arrays), so any shard order or merge
tree gives identical partials. All activations are never concatenated.

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

A (layer, feature) pair travels as one int64 key, layer·2³² + feature (``feature_key``), which sorts like the pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pandas as pd
import pyarrow as pa

from attribute_ray.activation_cache import ACT_COLUMNS

Acts = Union[pd.DataFrame, pa.Table, Mapping[str, np.ndarray]]
FeatureKey = tuple[int, int]

_U64 = np.uint64
_MASK32 = np.int64(0xFFFFFFFF)

# ----- keys, hashing and small numpy helpers ------------------------------------------------------


def feature_key(layer: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """(layer, feature) → one int64 key, layer·2³² + feature, ordered like (layer, feature)."""
    return (np.asarray(layer, np.int64) << 32) | np.asarray(feature, np.int64)


def split_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 keys → (layer, feature) int64 arrays."""
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
        return split_key(self.key)[0]

    @property
    def feature(self) -> np.ndarray:
        return split_key(self.key)[1]

    def __len__(self) -> int:
        return len(self.key)

    def get(self, layer: int, feature: int) -> tuple[int, float, float] | None:
        """(count, act_min, act_max) of one feature, or None if it never activated."""
        k = int(feature_key(np.int64(layer), np.int64(feature)))
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
    return _reduce_stats(feature_key(c["layer"], c["feature"]), np.ones(len(a), np.int64), a, a)


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
    layer, feat = split_key(key)
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
        k = int(feature_key(np.int64(layer), np.int64(feature)))
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
    key, seq, pos, act = feature_key(c["layer"], c["feature"]), c["sequence"], c["position"], c["activation"]
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
    layer, feat = split_key(key[s])
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
        k = int(feature_key(np.int64(layer), np.int64(feature)))
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
        return feature_key(c["layer"], c["feature"]), c["sequence"]
    w = np.asarray(list(wanted) if not isinstance(wanted, np.ndarray) else wanted, np.int64).reshape(-1, 3)
    return feature_key(w[:, 0], w[:, 1]), w[:, 2]


def context_partial(acts: Acts, wanted: Any) -> ContextPartial:
    """Pass 3 over one shard: every activation of feature (l, f) in sequence s for (l, f, s) in `wanted`
    (an [n, 3] array from ``wanted_examples``, a DataFrame with layer/feature/sequence columns, or triples)."""
    c = _columns(acts)
    key, seq = feature_key(c["layer"], c["feature"]), c["sequence"]
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


def key_slices(key: np.ndarray) -> dict[int, slice]:
    """{key: slice of its run} of a sorted key column."""
    s = _starts(key)
    ends = np.append(s[1:], len(key))
    return {int(key[a]): slice(int(a), int(b)) for a, b in zip(s, ends)}
