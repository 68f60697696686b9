"""Dashboard assembly: merged partials + token windows → one JSON dashboard per feature (docs/formats.md §f)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from attribute_ray.features.partials import (
    ContextPartial,
    DetailPartial,
    Examples,
    FeatureKey,
    StatsPartial,
    histogram_edges,
    key_slices,
)
from attribute_ray.neuronpedia import cantor

DEFAULT_QUANTILES: tuple[float, ...] = tuple((i + 1) / 100 for i in range(100))
"""Percentiles 1..100: the frontend labels an activation "NNpct" with NN = 1 + the index of the first
quantile value >= it (circuit-tracer frontend, renderActHistogram), so it expects 100 evenly spaced ones."""
TOP_NAME = "Top activations"
RANDOM_NAME = "Random sample"


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
    """Per-feature dashboard JSON (docs/formats.md §f) for every (layer, feature) with count > 0.

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
    top_g, rnd_g = key_slices(details.top.key), key_slices(details.random.key)
    ctx_g = key_slices(contexts.key)
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
