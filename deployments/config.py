"""`AppArgs`: everything that configures the attribution service (the builder's single argument).

`serve run deployments.app:app_builder preset=smollm2-135m-clt max_queued_requests=8`, a serve config's
``args:`` block, and `attribute-ray serve` all produce one of these.
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from attribute_ray.attribution import AttributionSettings

DEFAULT_STORE = str(Path(os.environ.get("ATTRIBUTE_RAY_HOME", Path.home() / ".cache" / "attribute-ray")) / "graphs")


class Autoscaling(BaseModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(1.0, gt=0)


class GraphDefaults(AttributionSettings):
    """Attribution defaults plus the pruning thresholds used for JSON exports."""

    node_threshold: float = Field(0.8, ge=0.0, le=1.0)
    edge_threshold: float = Field(0.98, ge=0.0, le=1.0)


class AppArgs(BaseModel):
    model: str | None = None
    transcoder: str | None = None
    preset: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    num_gpus: float | None = Field(None, ge=0, description="per engine replica; None: 1 if the cluster has GPUs else 0")
    num_cpus: float = Field(1.0, ge=0)
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(1, ge=1, description="concurrent attributions per engine replica")
    max_queued_requests: int = Field(16, ge=0, description="waiting requests per application before 503")
    max_prompt_tokens: int = Field(2048, ge=2)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    defaults: GraphDefaults = Field(default_factory=GraphDefaults)
    graph_store: str = DEFAULT_STORE
    graph_store_max_bytes: int = Field(2 * 2**30, ge=0)
    api_token: str | None = Field(None, repr=False, description="bearer token; or env ATTRIBUTE_RAY_API_TOKEN")
    feature_store: str | None = Field(None, description="an activation cache dir with features/ (jobs.build_features)")
    feature_json_base_url: str | None = Field(None, description="where graph JSON says feature JSON lives; default "
                                              "/v1/features when feature_store is set")

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if self.preset:
            from attribute_ray.presets import get_preset

            get_preset(self.preset)  # a known name; resolved (paths, hub check) by `resolved()` in the builder
        elif not (self.model and self.transcoder):
            raise ValueError("AppArgs needs model and transcoder, or a preset")
        if self.api_token is None:
            self.api_token = os.environ.get("ATTRIBUTE_RAY_API_TOKEN") or None
        return self

    def resolved(self) -> "AppArgs":
        """A copy with the preset's model/transcoder/feature store filled in (given fields win)."""
        update: dict = {}
        if self.preset:
            from attribute_ray.presets import resolve_preset

            p = resolve_preset(self.preset)
            update = {"model": self.model or p.model, "transcoder": self.transcoder or p.transcoder,
                      "feature_store": self.feature_store or p.feature_store}
        store = update.get("feature_store", self.feature_store)
        if store and not self.feature_json_base_url:
            update["feature_json_base_url"] = "/v1/features"
        return self.model_copy(update=update)
