"""Feature dashboards from an activation cache: combine-then-merge over shards with Ray tasks.

    python -m jobs.build_features CACHE_DIR [--top-k 20 --bins 32 --random 10 --context 16 --export-json DIR]

Three passes, each a Ray task per shard returning a small partial that is merged pairwise (no shuffle of
the activations): (1) count / min / max per feature, (2) histograms, top examples and a shard-independent
random sample, (3) the activations around the chosen examples. The driver then adds logit effects and
writes the feature store (``CACHE_DIR/features/layer_XXX.parquet`` + ``index.json``) that the service reads;
``--export-json`` also writes Anthropic/Neuronpedia ``{cantor}.json`` files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from attribute_ray import features as F


def _pass(fn, cache_dir: str, shard_ids: list[int], merge, *args, per_shard: dict | None = None):
    import ray

    remote = ray.remote(num_cpus=1)(lambda sid, extra: fn(F.read_shard(cache_dir, sid), *args, *extra))
    refs = [remote.remote(sid, (per_shard[sid],) if per_shard is not None else ()) for sid in shard_ids]
    return F.merge_all(ray.get(refs), merge)


def build(cache_dir: str, *, top_k: int = 20, n_bins: int = 32, n_random: int = 10, seed: int = 0,
          export_json: str | None = None, dense_threshold: float = 0.1, context: int = 16) -> Path:
    """Compute and store every feature's dashboard; returns the store's index path."""
    from attribute_ray import ReplacementModel
    from jobs.cache_activations import _init_ray

    t0 = time.perf_counter()
    manifest = F.read_manifest(cache_dir)
    shard_ids = [s["id"] for s in manifest["shards"]]
    _init_ray()
    stats = _pass(F.stats_partial, cache_dir, shard_ids, F.merge_stats)
    details = _pass(lambda acts, st: F.detail_partial(acts, st, top_k=top_k, n_bins=n_bins, n_random=n_random, seed=seed),
                    cache_dir, shard_ids, F.merge_details, stats)
    wanted = F.wanted_by_shard(F.wanted_examples(details), manifest["shards"])
    contexts = _pass(F.context_partial, cache_dir, shard_ids, F.merge_contexts,
                     per_shard=wanted)
    model = ReplacementModel.from_pretrained(manifest["model"], manifest["transcoder"])
    layer_features: dict[int, list[int]] = {}
    for layer, feature in zip(stats.layer.tolist(), stats.feature.tolist()):
        layer_features.setdefault(layer, []).append(feature)
    effects = F.logit_effects(model, layer_features)
    tok = model.tokenizer
    dashboards = F.build_dashboards(
        stats, details, contexts, F.cache_tokens_lookup(cache_dir), n_tokens_total=manifest["n_tokens"],
        decode=lambda ids: [tok.decode([i]) for i in ids], logit_effects=effects, transcoder_id=manifest["transcoder"],
        dense_threshold=dense_threshold, ctx_window=context,
    )
    index = F.write_feature_store(dashboards, cache_dir, transcoder_id=manifest["transcoder"])
    if export_json:
        F.export_feature_json(dashboards, export_json)
    n_dense = sum(d["dense"] for d in dashboards.values())
    print(f"feature dashboards: {len(dashboards):,} features with activations ({n_dense} dense) from "
          f"{len(shard_ids)} shards in {time.perf_counter() - t0:.1f}s → {index.parent}")
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.build_features", description=__doc__.splitlines()[0])
    p.add_argument("cache_dir")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--bins", type=int, default=32)
    p.add_argument("--random", type=int, default=10)
    p.add_argument("--dense-threshold", type=float, default=0.1)
    p.add_argument("--context", type=int, default=16, help="tokens shown up to and including the max token")
    p.add_argument("--export-json", default=None, help="also write {cantor}.json files here")
    a = p.parse_args(argv)
    build(a.cache_dir, top_k=a.top_k, n_bins=a.bins, n_random=a.random, export_json=a.export_json,
          dense_threshold=a.dense_threshold, context=a.context)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
