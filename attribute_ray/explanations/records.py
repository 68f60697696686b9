"""Feature records: what an explainer may read about a feature and what its explanation is scored on.

A `FeatureRecord` holds, for one (layer, feature) of an activation cache (docs/formats.md §g):

- `train`: top-activating context windows the explainer reads;
- `held_out`: other top-activating windows, never shown to the explainer, for scoring;
- `negatives`: windows of the same length where the feature does not fire, for scoring;
- `top_logits` / `bottom_logits`: the tokens its decoder promotes / suppresses, from the dashboards of the
  feature store beside the cache (docs/formats.md §i), empty when there is none.

``feature_records`` reads each activation shard once for all the requested features (one streaming pass). The
n_train + n_held_out sequences with the largest per-sequence maximum (ties: smaller sequence) are split at
random (``sample_hash`` order, seeded) into train and held-out. Negatives come from one pool of random windows
(seeded, independent of sharding), drawn per feature in hash order among the pool windows where it never fires.
Everything is deterministic given the cache and the seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from attribute_ray.activation_cache import cache_tokens_lookup, read_manifest, read_shard
from attribute_ray.features.partials import FeatureKey, feature_key, sample_hash, split_key
from attribute_ray.features.storage import feature_logits, stored_features

Decode = Callable[[list[int]], list[str]]


@dataclass(frozen=True)
class Example:
    """One context window."""

    tokens: list[str]  # token strings, as the tokenizer decodes each id alone
    activations: list[float]  # the feature's activation at each token (0.0 where inactive)


@dataclass(frozen=True)
class FeatureRecord:
    """What is known of one feature: examples to explain from, examples to score on, and its logit effects."""

    layer: int
    feature: int
    train: list[Example]  # top-activating examples an explainer may read
    held_out: list[Example]  # activating examples never shown to the explainer (scoring)
    negatives: list[Example]  # contexts where the feature does not fire (scoring)
    top_logits: list[str]
    bottom_logits: list[str]


class Explainer(Protocol):
    """Writes a short explanation of a feature and scores an explanation."""

    name: str  # "tokens" | "llm" | "self"

    def explain(self, record: FeatureRecord) -> str: ...

    def score(self, record: FeatureRecord, text: str) -> float: ...  # balanced accuracy, held_out vs negatives


def balanced_accuracy(on_positives: Sequence[bool], on_negatives: Sequence[bool]) -> float:
    """Mean of the true-positive rate (predictions on activating contexts) and the true-negative rate (predictions
    on non-activating ones); a class without examples is left out, and with none at all the result is 0.5."""
    rates = []
    if len(on_positives):
        rates.append(sum(map(bool, on_positives)) / len(on_positives))
    if len(on_negatives):
        rates.append(sum(not p for p in on_negatives) / len(on_negatives))
    return float(sum(rates) / len(rates)) if rates else 0.5


def active_features(cache_dir: str | os.PathLike) -> list[FeatureKey]:
    """Every (layer, feature) with an activation in the cache, sorted: read from the feature store beside it
    when there is one (its dashboards are exactly these features), else from the shards' layer/feature columns."""
    from_store = stored_features(cache_dir)
    if from_store:
        return from_store
    keys = [np.unique(feature_key(df["layer"].to_numpy(), df["feature"].to_numpy()))
            for df in (read_shard(cache_dir, s["id"]) for s in read_manifest(cache_dir)["shards"])]
    if not keys:
        return []
    layer, feat = split_key(np.unique(np.concatenate(keys)))
    return list(zip(layer.tolist(), feat.tolist()))


def decoder(tokenizer) -> Decode:
    """Token ids → one string per id, each decoded alone, with `tokenizer`."""
    return lambda ids: list(tokenizer.batch_decode([[int(i)] for i in ids]))


def tokenizer_decode(model_ref: str) -> Decode:
    """`decoder` of the tokenizer of a model reference."""
    from attribute_ray.loading import load_tokenizer

    return decoder(load_tokenizer(model_ref))


def _top_per_key(key: np.ndarray, seq: np.ndarray, pos: np.ndarray, act: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """The k rows per key with the largest activation (ties: smaller sequence, then smaller position)."""
    order = np.lexsort((pos, seq, -act.astype(np.float64), key))
    key, seq, pos, act = key[order], seq[order], pos[order], act[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    rank = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
    keep = rank < k
    return key[keep], seq[keep], pos[keep], act[keep]


def _sequence_maxima(key, seq, pos, act) -> tuple[np.ndarray, ...]:
    """One row per (key, sequence): the largest activation, at its smallest position."""
    order = np.lexsort((pos, -act.astype(np.float64), seq, key))
    key, seq, pos, act = key[order], seq[order], pos[order], act[order]
    first = np.r_[True, (key[1:] != key[:-1]) | (seq[1:] != seq[:-1])] if len(key) else np.zeros(0, bool)
    return key[first], seq[first], pos[first], act[first]


def _pairs_in(key: np.ndarray, seq: np.ndarray, wkey: np.ndarray, wseq: np.ndarray) -> np.ndarray:
    """[n] bool: is (key[i], seq[i]) one of the pairs (wkey, wseq)?"""
    if len(key) == 0 or len(wkey) == 0:
        return np.zeros(len(key), bool)
    return pd.MultiIndex.from_arrays([key, seq]).isin(pd.MultiIndex.from_arrays([wkey, wseq]))


def feature_records(
    cache_dir: str | os.PathLike,
    keys: Iterable[FeatureKey] | None = None,
    *,
    n_train: int = 10,
    n_held_out: int = 10,
    n_negatives: int = 10,
    seed: int = 0,
    context: int = 16,
    after: int = 4,
    decode: Decode | None = None,
    store_dir: str | os.PathLike | None = None,
) -> Iterator[FeatureRecord]:
    """One `FeatureRecord` per feature of `keys` (default: every feature with activations) that fires in the
    cache, in (layer, feature) order; features that never fire are skipped.

    Each activation shard is read once. An activating window shows positions [p − context + 1, p + after] around
    the sequence's maximum p (clipped; BOS excluded); a negative window has the same length, at a seeded random
    place in a pool of max(64, 8·n_negatives) seeded random sequences. `decode` turns token ids into strings
    (default: the tokenizer of the cache manifest's model). The logits come from the feature store `store_dir`
    (default: the one beside the cache).
    """
    man = read_manifest(cache_dir)
    T, first_pos = int(man["ctx_len"]), 1 if man.get("bos", True) else 0
    width = min(context + after, T - first_pos)
    wanted = None if keys is None else np.unique(np.array([feature_key(l, f) for l, f in keys], np.int64))
    n_top = n_train + n_held_out

    rng = np.random.default_rng(seed)
    n_seq = int(man["n_sequences"])
    pool = np.sort(rng.choice(n_seq, size=min(n_seq, max(64, 8 * n_negatives)), replace=False)).astype(np.int64)
    pool_end = first_pos + width - 1 + rng.integers(0, T - first_pos - width + 1, size=len(pool))  # inclusive

    top = tuple(np.zeros(0, np.int64) for _ in range(3)) + (np.zeros(0, np.float32),)  # key, seq, pos, act
    rows = top  # every activation of a top (key, sequence) pair, for the windows
    fired_key, fired_seq = [], []  # (key, pool sequence) pairs that fire inside the pool window
    tokens: dict[int, np.ndarray] = {}
    lookup = cache_tokens_lookup(cache_dir)
    for shard in sorted(man["shards"], key=lambda s: s["first_sequence"]):
        df = read_shard(cache_dir, shard["id"])
        key = feature_key(df["layer"].to_numpy(), df["feature"].to_numpy())
        seq, pos = df["sequence"].to_numpy().astype(np.int64), df["position"].to_numpy().astype(np.int64)
        act = df["activation"].to_numpy().astype(np.float32)
        if wanted is not None:
            m = np.isin(key, wanted)
            key, seq, pos, act = key[m], seq[m], pos[m], act[m]
        top = _top_per_key(*(np.concatenate([a, b]) for a, b in zip(top, _sequence_maxima(key, seq, pos, act))), n_top)
        rows = tuple(np.concatenate([a, b]) for a, b in zip(rows, (key, seq, pos, act)))
        rows = tuple(c[_pairs_in(rows[0], rows[1], top[0], top[1])] for c in rows)
        i = np.searchsorted(pool, seq)
        hit = (i < len(pool)) & (pool[np.minimum(i, len(pool) - 1)] == seq)
        end = pool_end[np.minimum(i, len(pool) - 1)]
        hit &= (pos <= end) & (pos > end - width)
        pairs = np.unique(np.stack([key[hit], seq[hit]]), axis=1)
        fired_key.append(pairs[0])
        fired_seq.append(pairs[1])
        lo, hi = shard["first_sequence"], shard["first_sequence"] + shard["n_sequences"]
        need = set(top[1][(top[1] >= lo) & (top[1] < hi)].tolist()) | set(pool[(pool >= lo) & (pool < hi)].tolist())
        keep = set(top[1].tolist()) | set(pool.tolist())
        tokens = {s: t for s, t in tokens.items() if s in keep}
        if need:
            tokens.update({s: np.asarray(t, np.int64) for s, t in lookup(sorted(need)).items()})

    fired: dict[int, set[int]] = {}
    for k, s in zip(np.concatenate(fired_key or [np.zeros(0, np.int64)]).tolist(),
                    np.concatenate(fired_seq or [np.zeros(0, np.int64)]).tolist()):
        fired.setdefault(k, set()).add(s)
    ids = np.unique(np.concatenate([t for t in tokens.values()] or [np.zeros(0, np.int64)])).tolist()
    strings = dict(zip(ids, (decode or tokenizer_decode(man["model"]))(ids))) if ids else {}
    out_keys = np.unique(top[0])
    layers, feats = split_key(out_keys)
    logits = feature_logits(cache_dir if store_dir is None else store_dir, zip(layers.tolist(), feats.tolist()))
    row_order = np.lexsort((rows[2], rows[1], rows[0]))
    rows = tuple(c[row_order] for c in rows)

    def window(k: int, s: int, start: int, stop: int) -> Example:
        a, b = np.searchsorted(rows[0], k, "left"), np.searchsorted(rows[0], k, "right")
        a, b = a + np.searchsorted(rows[1][a:b], s, "left"), a + np.searchsorted(rows[1][a:b], s, "right")
        acts = np.zeros(stop - start, np.float64)
        p, v = rows[2][a:b], rows[3][a:b]
        m = (p >= start) & (p < stop)
        acts[p[m] - start] = v[m]
        return Example([strings[int(t)] for t in tokens[s][start:stop]], acts.tolist())

    for k in out_keys.tolist():
        layer, feat = (int(x) for x in split_key(np.int64(k)))
        sel = slice(np.searchsorted(top[0], k, "left"), np.searchsorted(top[0], k, "right"))  # top is sorted by key
        seqs, peaks, acts = top[1][sel], top[2][sel], top[3][sel]
        order = np.argsort(sample_hash(layer, feat, seqs, seed), kind="stable")
        n_tr = min(n_train, math.ceil(len(seqs) * n_train / n_top))
        split = {"train": order[:n_tr], "held_out": order[n_tr:]}
        examples = {}
        for name, idx in split.items():
            idx = idx[np.lexsort((seqs[idx], -acts[idx].astype(np.float64)))]  # strongest first
            examples[name] = [window(k, int(seqs[j]), max(first_pos, int(peaks[j]) - context + 1),
                                     min(T, int(peaks[j]) + after + 1)) for j in idx]
        cand = np.flatnonzero(~np.isin(pool, list(fired.get(k, ()))))
        cand = cand[np.argsort(sample_hash(layer, feat, pool[cand], seed), kind="stable")][:n_negatives]
        negatives = [window(k, int(pool[j]), int(pool_end[j]) - width + 1, int(pool_end[j]) + 1) for j in cand]
        top_l, bottom_l = logits.get((layer, feat), ([], []))
        yield FeatureRecord(layer, feat, examples["train"], examples["held_out"], negatives, top_l, bottom_l)
