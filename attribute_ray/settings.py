"""The settings that decide an attribution graph, each declared once.

`AttributionSettings` decide which rows are computed (docs/method.md §4–6), `PruneSettings` decide the pruned
view of them (docs/method.md §7), and `GraphSettings` is both: everything a graph request may set. The library's
`attribute()`, the flags of `attribute-ray graph`, the body of ``POST /v1/graphs`` and the service's defaults
are all generated from these classes, so one prompt with one set of settings gives one graph everywhere.

Every number a request may carry is finite and bounded (the bounds below, shared by `attribute_ray.api` and the
library's own checks): NaN, ±Infinity (and 1e400, which parses as Infinity) and ints past the bounds are refused
with a `pydantic.ValidationError` naming the field, which the service answers as 422.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# An index into a tensor (token id, layer, feature, position, cantor id's parts): int32 range, which every index
# tensor and every JS client holds exactly; anything larger cannot name something a model has.
INDEX_MAX = 2**31 - 1
# Rows of at most this many features: each row is N floats (N ≥ the feature count), so 10**7 rows is already far
# past any memory; null asks for every active feature. (10**30 overflowed a tensor size.)
MAX_FEATURE_NODES = 10**7
# The operand of an intervention (set / scale / add): |value| ≤ 1e6. Real feature activations are O(1–1000) and
# steering uses at most a few hundred times them; 1e6 stays finite in fp32 and bf16 residual streams, where 1e308
# (set) or -1e300 (add) overflowed to inf and the logits to NaN (fp16 can still overflow: the service then says so).
VALUE_MAX = 1e6
# A sampling seed: what `torch.manual_seed` takes and an int64 holds (2**64 overflowed it).
SEED_MAX = 2**63 - 1


class AttributionSettings(BaseModel):
    """What decides the rows of an attribution graph (docs/method.md §4–6)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_n_logits: int = Field(10, ge=1, le=1000, description="at most this many logit targets (the most probable "
                              "next tokens)")
    desired_logit_prob: float = Field(0.95, gt=0.0, le=1.0, description="stop adding logit targets once their "
                                      "probabilities sum to at least this")
    # A cap, as circuit-tracer's CLI and Neuronpedia have: an uncapped run computes one row per active feature,
    # which for real transcoders (tens of thousands of active features) is minutes of work and gigabytes of rows.
    max_feature_nodes: int | None = Field(7500, ge=1, le=MAX_FEATURE_NODES, description="compute the rows of at "
                                          "most this many active features, the most influential first (None: every "
                                          "active feature)")
    batch_size: int = Field(256, ge=1, le=65536, description="rows (targets) pulled back per backward pass; with a "
                            "feature cap it also sizes the queue of features chosen between influence updates")
    update_interval: int = Field(4, ge=1, le=10**6, description="with a feature cap: recompute the features' "
                                 "influence after this many batches")


class PruneSettings(BaseModel):
    """What decides the pruned view of a graph (docs/method.md §7): the smallest sets of nodes and edges that
    carry these fractions of the influence on the logits."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    node_threshold: float = Field(0.8, ge=0.0, le=1.0, description="keep the most influential nodes that together "
                                  "carry this fraction of the total influence")
    edge_threshold: float = Field(0.98, ge=0.0, le=1.0, description="keep the most influential edges that together "
                                  "carry this fraction of the total edge influence")


class GraphSettings(PruneSettings, AttributionSettings):
    """Everything that decides a graph and its pruned view: what a graph request may set. (Bases in this order
    so that fields list the attribution settings first.)"""

    def attribution(self) -> AttributionSettings:
        """The settings that decide the rows (the graph's identity; thresholds only change its view)."""
        return AttributionSettings(**self.model_dump(include=set(AttributionSettings.model_fields)))

    def pruning(self) -> PruneSettings:
        """The thresholds of the pruned view."""
        return PruneSettings(**self.model_dump(include=set(PruneSettings.model_fields)))
