"""Feature dashboards from an activation cache: combine-then-merge over shards with Ray tasks.

    python -m jobs.build_features CACHE_DIR [--top-k 20 --bins 32 --random 10 --context 16 --export-json DIR]

Three passes, each a Ray task per shard returning a small partial that is merged pairwise (no shuffle of
the activations): (1) count / min / max per feature, (2) histograms, top examples and a shard-independent
random sample, (3) the activations around the chosen examples. The driver then adds logit effects and
writes the feature store (``CACHE_DIR/features/layer_XXX.parquet`` + ``index.json``) that the service reads;
``--export-json`` also writes Anthropic/Neuronpedia ``{cantor}.json`` files. The steps are
``attribute_ray.features.build_feature_store``; this job only runs them on Ray.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.features import FeatureSettings, build_feature_store
from jobs.ray_setup import add_address_flag, init_ray, map_tasks


def build(cache_dir: str, settings: FeatureSettings | None = None, *, export_json: str | None = None,
          **fields: Any) -> Path:
    """Compute and store every feature's dashboard, with `settings` or `FeatureSettings(**fields)`; returns the
    store's index path."""
    t0 = time.perf_counter()
    init_ray()
    index, dashboards = build_feature_store(cache_dir, settings or FeatureSettings(**fields), map_shards=map_tasks,
                                            export_json=export_json)
    n_dense = sum(d["dense"] for d in dashboards.values())
    print(f"feature dashboards: {len(dashboards):,} features with activations ({n_dense} dense) "
          f"in {time.perf_counter() - t0:.1f}s → {index.parent}")
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.build_features", description=__doc__.splitlines()[0])
    p.add_argument("cache_dir", help="a local activation cache (python -m jobs.cache_activations --out)")
    add_arguments(p, FeatureSettings)
    p.add_argument("--export-json", default=None, help="also write {cantor}.json files here")
    add_address_flag(p)
    args = p.parse_args(argv)
    build(args.cache_dir, from_arguments(FeatureSettings, args), export_json=args.export_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
