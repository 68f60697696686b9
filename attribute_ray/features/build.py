"""Activation cache → feature store: the three passes over shards, logit effects, assembly, storage.

Each pass maps a function over the cache's shards with a `MapShards` (``map_serial`` here, ``jobs.ray_setup.map_tasks``
in the jobs: one Ray task per shard) and folds the partials with ``merge_all``; only partials travel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from attribute_ray.activation_cache import cache_tokens_lookup, read_manifest, read_shard
from attribute_ray.features.dashboards import build_dashboards
from attribute_ray.features.logits import logit_effects
from attribute_ray.features.partials import (
    ContextPartial,
    DetailPartial,
    FeatureKey,
    StatsPartial,
    context_partial,
    detail_partial,
    merge_all,
    merge_contexts,
    merge_details,
    merge_stats,
    stats_partial,
    wanted_by_shard,
    wanted_examples,
)
from attribute_ray.features.storage import export_feature_json, write_feature_store

T = TypeVar("T")
MapShards = Callable[[Callable[..., T], Sequence[tuple]], list[T]]
"""``map_shards(fn, calls)``: ``fn(*args)`` of every call, computed wherever the mapper runs them; any result
order will do (the merges are order-independent)."""


class FeatureSettings(BaseModel):
    """How each feature's dashboard is built (the flags of ``python -m jobs.build_features``)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(20, ge=1, description="top-activation examples per feature")
    bins: int = Field(32, ge=1, validation_alias=AliasChoices("bins", "n_bins"),
                      description="histogram bins over [act_min, act_max] (n_bins of detail_partial)")
    random: int = Field(10, ge=0, validation_alias=AliasChoices("random", "n_random"),
                        description="random-sample examples per feature (n_random of detail_partial)")
    seed: int = Field(0, description="seed of the random sample's hash order")
    context: int = Field(16, ge=1, description="tokens shown up to and including the max token")
    dense_threshold: float = Field(0.1, ge=0.0, description="a feature is dense above this activation frequency")


def map_serial(fn: Callable[..., T], calls: Sequence[tuple]) -> list[T]:
    """Every call in this process, in order."""
    return [fn(*args) for args in calls]


def cache_partials(
    cache_dir: str | os.PathLike, *, top_k: int = 20, n_bins: int = 32, n_random: int = 10, seed: int = 0,
    map_shards: MapShards = map_serial,
) -> tuple[StatsPartial, DetailPartial, ContextPartial]:
    """The three passes over every shard of the cache, each merged over shards."""
    shards = read_manifest(cache_dir)["shards"]
    ids = [(s["id"],) for s in shards]
    stats = merge_all(map_shards(lambda sid: stats_partial(read_shard(cache_dir, sid)), ids), merge_stats)
    details = merge_all(map_shards(
        lambda sid: detail_partial(read_shard(cache_dir, sid), stats, top_k=top_k, n_bins=n_bins, n_random=n_random,
                                   seed=seed), ids), merge_details)
    wanted = wanted_by_shard(wanted_examples(details), shards)  # each task gets only its own windows
    contexts = merge_all(map_shards(lambda sid, w: context_partial(read_shard(cache_dir, sid), w),
                                    [(sid, wanted[sid]) for sid, in ids]), merge_contexts)
    return stats, details, contexts


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
    map_shards: MapShards = map_serial,
    **build_kw: Any,
) -> dict[FeatureKey, dict]:
    """Every feature's dashboard from a cache: ``cache_partials`` then ``build_dashboards`` (`build_kw`)."""
    man = read_manifest(cache_dir)
    stats, details, contexts = cache_partials(cache_dir, top_k=top_k, n_bins=n_bins, n_random=n_random, seed=seed,
                                              map_shards=map_shards)
    if transcoder_id is None:
        transcoder_id = man.get("transcoder", "")
    return build_dashboards(
        stats, details, contexts, cache_tokens_lookup(cache_dir), n_tokens_total=int(man["n_tokens"]), decode=decode,
        logit_effects=logit_effects, transcoder_id=transcoder_id, **build_kw,
    )


def build_feature_store(cache_dir: str | os.PathLike, settings: FeatureSettings | None = None, *,
                        map_shards: MapShards = map_serial,
                        export_json: str | None = None) -> tuple[Path, dict[FeatureKey, dict]]:
    """Dashboards of every feature active in a local cache, with the logit effects of the cache's model and
    transcoder (loaded on the CPU), written to the store ``cache_dir/features/`` (and to `export_json` as
    ``{cantor}.json`` files when given). Returns (the store's index path, the dashboards)."""
    from attribute_ray.replacement import ReplacementModel

    settings = settings or FeatureSettings()
    manifest = read_manifest(cache_dir)
    stats, details, contexts = cache_partials(cache_dir, top_k=settings.top_k, n_bins=settings.bins,
                                              n_random=settings.random, seed=settings.seed, map_shards=map_shards)
    model = ReplacementModel.from_pretrained(manifest["model"], manifest["transcoder"])
    layer_features: dict[int, list[int]] = {}
    for layer, feature in zip(stats.layer.tolist(), stats.feature.tolist()):
        layer_features.setdefault(layer, []).append(feature)
    tok = model.tokenizer
    dashboards = build_dashboards(
        stats, details, contexts, cache_tokens_lookup(cache_dir), n_tokens_total=manifest["n_tokens"],
        decode=lambda ids: [tok.decode([i]) for i in ids], logit_effects=logit_effects(model, layer_features),
        transcoder_id=manifest["transcoder"], dense_threshold=settings.dense_threshold, ctx_window=settings.context,
    )
    index = write_feature_store(dashboards, cache_dir, transcoder_id=manifest["transcoder"])
    if export_json:
        export_feature_json(dashboards, export_json)
    return index, dashboards
