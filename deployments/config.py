"""`AppArgs`: everything that configures the attribution service (the builder's single argument).

`serve run deployments.app:app_builder preset=smollm2-135m-clt max_queued_requests=8`, a serve config's
``args:`` block, and `attribute-ray serve` all produce one of these.
"""

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from attribute_ray.devices import DtypeName
from attribute_ray.settings import GraphSettings

DEFAULT_STORE = str(Path(os.environ.get("ATTRIBUTE_RAY_HOME", Path.home() / ".cache" / "attribute-ray")) / "graphs")


class Autoscaling(BaseModel):
    """Serve autoscaling of the engine deployment (replaces `num_replicas`)."""

    min_replicas: int = Field(1, ge=0, description="engine replicas kept warm")
    max_replicas: int = Field(4, ge=1, description="most engine replicas (each takes `num_gpus` GPUs)")
    target_ongoing_requests: float = Field(1.0, gt=0, description="requests in flight per replica to scale towards")
    upscale_delay_s: float = Field(30.0, ge=0, description="load above target for this long before a replica is added")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below target for this long before one is removed")
    look_back_period_s: float = Field(30.0, gt=10, description="seconds over which the load is averaged (more than "
                                      "Serve's 10 s metrics interval)")


class AppArgs(BaseModel):
    """The attribution service's configuration: what to load, resources, limits, default settings, storage."""

    model: str | None = Field(None, description="HF hub id, local directory or .gguf file (or from the preset)")
    transcoder: str | None = Field(None, description="HF hub id (user/repo[/sub][@rev]) or local directory "
                                   "(or from the preset)")
    preset: str | None = Field(None, description="a named model + transcoder pair (attribute_ray.presets); an "
                               "explicit model, transcoder or feature store wins over the preset's")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="engine device; auto: CUDA when visible")
    dtype: DtypeName = Field("auto", description="engine dtype; auto: bfloat16 on a GPU, float32 on the CPU")
    num_gpus: float | None = Field(None, ge=0, description="per engine replica; unset: 1 if the cluster has GPUs, else 0")
    num_cpus: float = Field(1.0, ge=0, description="per engine replica; also its torch thread count (at least 1)")
    num_replicas: int = Field(1, ge=1, description="engine replicas when `autoscaling` is not set")
    autoscaling: Autoscaling | None = Field(None, description="autoscale the engine instead of `num_replicas`")
    max_replicas_per_node: int | None = Field(None, ge=1, description="most engine replicas on one node (1: one per "
                                              "node, so losing a node loses one); unset: no limit")
    engine_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each engine "
                                               "replica needs (`ray start --resources`), e.g. to pick a node group")
    ingress_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources the ingress "
                                                "needs, e.g. one only the head offers, to keep it beside the proxy")
    max_ongoing_requests: int = Field(1, ge=1, description="concurrent attributions per engine replica")
    engine_memory_bytes: int | None = Field(None, ge=2**20, description="bytes one attribution may use on top of "
                                            "the loaded model (docs/memory.md); unset: engine_memory_fraction of the "
                                            "memory available when the replica starts, shared by its "
                                            "max_ongoing_requests")
    engine_memory_fraction: float = Field(0.5, gt=0, le=0.9, description="see engine_memory_bytes")
    memory_policy: Literal["trim", "refuse"] = Field("trim", description="a request over the memory budget: trim "
                                                     "(fewer feature rows; the graph and the job say so) or refuse "
                                                     "(413 naming the limit and what would fit)")
    max_queued_requests: int = Field(16, ge=0, description="waiting requests per application before 503")
    max_prompt_tokens: int = Field(2048, ge=2, description="longest prompt accepted, in tokens (BOS included)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted, in bytes")
    defaults: GraphSettings = Field(default_factory=GraphSettings,
                                    description="attribution and pruning settings a request does not set")
    graph_store: str = Field(DEFAULT_STORE, description="directory or fsspec URI where computed graphs are kept")
    graph_store_max_bytes: int = Field(2 * 2**30, ge=0, description="graph store size in bytes beyond which the "
                                       "least recently used graphs are deleted")
    job_store: str | None = Field(None, description="directory or fsspec URI where graph jobs are kept (one JSON each) "
                                  "so a restarted ingress finds them; unset: the graph store's jobs/ folder")
    engine_attempts: int = Field(3, ge=1, description="runs of one engine call in all when engine replicas die under "
                                 "it (each re-run goes to a live replica)")
    engine_wait_s: float = Field(60.0, gt=0, description="seconds a call waits while no engine replica is running "
                                 "before the client gets 503 + Retry-After")
    api_token: str | None = Field(None, repr=False, description="bearer token; or env ATTRIBUTE_RAY_API_TOKEN")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed to call the API "
                                    "(CORS), e.g. https://tools.example.org; empty: none (same-origin only)")
    feature_store: str | None = Field(None, description="an activation cache dir with features/ (jobs.build_features)")
    feature_json_base_url: str | None = Field(None, description="where graph JSON says feature JSON lives; default "
                                              "/v1/features when feature_store is set")

    @field_validator("engine_resources", "ingress_resources", mode="before")
    @classmethod
    def _resources_json(cls, value: Any) -> Any:
        """A flag or `serve run key=value` gives JSON text: '{"gpu_node": 1}'."""
        return json.loads(value) if isinstance(value, str) else value

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
        from attribute_ray.presets import resolve_refs

        refs = resolve_refs(self.preset, self.model, self.transcoder, self.feature_store)
        base_url = self.feature_json_base_url or ("/v1/features" if refs.feature_store else None)
        return self.model_copy(update={"model": refs.model, "transcoder": refs.transcoder,
                                       "feature_store": refs.feature_store, "feature_json_base_url": base_url})
