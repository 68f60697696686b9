"""Feature dashboards (docs/formats.md §f) from an activation cache (§g), kept in a feature store (§i).

    partials.py    the three map-reduce passes over one shard and their merges (combine, then merge)
    dashboards.py  merged partials + token windows → one dashboard JSON per feature (quantiles, examples)
    logits.py      each feature's direct logit effect (top/bottom tokens of its decoder directions)
    storage.py     the feature store: write, read one feature, iterate, export ``{cantor}.json`` files
    build.py       the pipeline: cache → passes (serial or one Ray task per shard) → dashboards → store
"""

from attribute_ray.features.build import (
    FeatureSettings,
    MapShards,
    build_feature_store,
    cache_partials,
    dashboards_from_cache,
    map_serial,
)
from attribute_ray.features.dashboards import (
    DEFAULT_QUANTILES,
    RANDOM_NAME,
    TOP_NAME,
    build_dashboards,
    quantiles_from_histogram,
)
from attribute_ray.features.logits import logit_effects
from attribute_ray.features.partials import (
    Acts,
    ContextPartial,
    DetailPartial,
    Examples,
    FeatureKey,
    StatsPartial,
    context_partial,
    detail_partial,
    feature_key,
    histogram_edges,
    merge_all,
    merge_contexts,
    merge_details,
    merge_stats,
    sample_hash,
    split_key,
    stats_partial,
    wanted_by_shard,
    wanted_examples,
)
from attribute_ray.features.storage import (
    STORE_SCHEMA,
    export_feature_json,
    iter_store,
    read_feature,
    write_feature_store,
)

__all__ = [
    "Acts", "ContextPartial", "DEFAULT_QUANTILES", "DetailPartial", "Examples", "FeatureKey", "FeatureSettings",
    "MapShards", "RANDOM_NAME", "STORE_SCHEMA", "StatsPartial", "TOP_NAME", "build_dashboards", "build_feature_store",
    "cache_partials", "context_partial", "dashboards_from_cache", "detail_partial", "export_feature_json",
    "feature_key", "histogram_edges", "iter_store", "logit_effects", "map_serial", "merge_all",
    "merge_contexts", "merge_details", "merge_stats", "quantiles_from_histogram", "read_feature", "sample_hash",
    "split_key", "stats_partial", "wanted_by_shard", "wanted_examples", "write_feature_store",
]
