"""The HTTP contract of the attribution service: request and response bodies (importable without Ray).

The service (deployments/) validates requests with these models and documents them at ``/docs``; the client
validates what it sends with them and reads job views through them. A graph request's settings are
`GraphSettings` fields (declared once in attribute_ray/settings.py): a setting the request leaves out, or sends
as null, takes the application's default (`GraphRequest.settings`).

Every model refuses what it cannot mean, naming the field (a `pydantic.ValidationError`; 422 from the service):
non-finite floats (NaN, ±Infinity, 1e400), ints outside the bounds of attribute_ray/settings.py and text that is
not valid Unicode (a lone surrogate such as "\ud800", which JSON's "\ud800" escape or msgpack's invalid UTF-8
would otherwise bring in).
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from attribute_ray.settings import INDEX_MAX, SEED_MAX, VALUE_MAX, GraphSettings, PruneSettings


def _valid_unicode(text: str) -> str:
    """`text` unless it holds a lone surrogate (not Unicode text: it cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Index = Annotated[int, Field(ge=0, le=INDEX_MAX)]  # a token id, layer or feature index
Position = Annotated[int, Field(ge=-INDEX_MAX, le=INDEX_MAX)]  # a token position (negative counts from the end)
Value = Annotated[float, Field(ge=-VALUE_MAX, le=VALUE_MAX)]  # an intervention's operand
SLUG_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
Positions = list[Position] | Literal["all", "generated"]
Op = Literal["set", "scale", "add", "ablate"]


class _OnePrompt(BaseModel):
    """A request about one prompt, given as text or as token ids."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=200_000), AfterValidator(_valid_unicode)] | None = Field(
        None, description="the prompt text (a BOS token is prepended as the library does); give this or `tokens`")
    tokens: list[Index] | None = Field(None, min_length=1, description="the prompt as token ids; give this or `prompt`")

    @model_validator(mode="after")
    def _one_input(self) -> "_OnePrompt":
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompt' or 'tokens'")
        return self


class GraphRequest(GraphSettings, _OnePrompt):
    """Body of POST /v1/graphs and /v1/graphs/stream (JSON or msgpack). Settings left out or null take the
    application's defaults (GET /v1/models lists them)."""

    targets: list[Index] | list[Text] | None = Field(None, min_length=1, max_length=1000, description="attribute these "
                                                  "logits (token ids, or strings of exactly one token) instead of "
                                                  "the most probable ones")
    slug: str | None = Field(None, pattern=SLUG_PATTERN, description="the graph's name in Neuronpedia "
                             "JSON responses (default: the first 16 characters of its graph id)")
    pruned: bool = Field(False, description="msgpack responses: only the pruned graph (JSON is always pruned)")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in GraphSettings.model_fields}
        return data

    def settings(self, defaults: GraphSettings) -> GraphSettings:
        """The settings this request set explicitly, over the application's `defaults`."""
        given = self.model_dump(include=self.model_fields_set & set(GraphSettings.model_fields))
        return GraphSettings(**{**defaults.model_dump(include=set(GraphSettings.model_fields)), **given})


class Progress(BaseModel):
    """How far a graph job is: `done` of `total` steps of its current phase."""

    phase: str = Field(description='"trace" (the forward pass), "logits" or "features" (rows computed)')
    done: int = Field(ge=0, description="steps finished")
    total: int = Field(ge=0, description="steps in all (logit rows + feature rows for the row phases)")


class JobView(BaseModel):
    """A graph job as GET /v1/jobs/{id} (and POST /v1/graphs?wait=false) report it."""

    job_id: str | None = Field(description="the job's id; null when the graph was already stored and no job ran")
    graph_id: str | None = Field(None, description="the graph's id (GET /v1/graphs/{graph_id}) once status is done")
    status: JobStatus = Field(description="queued, running, done, failed or cancelled")
    progress: Progress | None = Field(None, description="the latest progress report; null before the first")
    error: str | None = Field(None, description="why the job failed")
    warnings: list[str] = Field(default_factory=list, description="what the finished graph lacks, e.g. feature rows "
                                "trimmed to fit the engine's memory budget")


class StreamEvent(BaseModel):
    """One line of the NDJSON stream of POST /v1/graphs/stream. Serialise with ``exclude_unset=True``: each event
    carries only its own fields (queued: job_id; progress: phase, done, total; done: graph_id [, cached];
    failed and cancelled: job_id, error)."""

    event: Literal["queued", "progress", "done", "failed", "cancelled"] = Field(description="what happened")
    job_id: str | None = Field(None, description="the job's id")
    graph_id: str | None = Field(None, description="the finished graph's id (done)")
    cached: bool | None = Field(None, description="the graph was already stored (done without a job)")
    phase: str | None = Field(None, description="progress: as in `Progress`")
    done: int | None = Field(None, description="progress: as in `Progress`")
    total: int | None = Field(None, description="progress: as in `Progress`")
    error: str | None = Field(None, description="why the job failed")
    warnings: list[str] | None = Field(None, description="done: what the graph lacks (as `JobView.warnings`)")


class InterventionSpec(BaseModel):
    """One edit of one feature (or error node) at chosen positions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layer: Index = Field(description="the transcoder layer")
    feature: Index | None = Field(None, description="the feature index; null: the layer's error node")
    op: Op = Field("ablate", description="set to `value`, scale by `value`, add `value`, or ablate (set to 0)")
    value: Value = Field(0.0, description="the operand of set, scale and add (|value| ≤ 1e6)")
    positions: Positions = Field("all", description='token positions (0 is the BOS; negative counts from the end), '
                                 '"all" or "generated" (steering: generated tokens only)')


class SupernodeSpec(BaseModel):
    """A named group of features edited together."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    label: Text = Field(min_length=1, max_length=200, description="the supernode's name")
    features: list[tuple[Index, Index]] = Field(min_length=1, max_length=1000, description="(layer, feature) pairs "
                                                "(layer first, feature last, as a node's (layer, position, feature))")
    op: Op = Field("ablate", description="as in `InterventionSpec`, applied to every feature")
    value: Value = Field(0.0, description="the operand of set, scale and add (|value| ≤ 1e6)")
    positions: Positions = Field("all", description='token positions, "all" or "generated"')


class InterventionRequest(_OnePrompt):
    """Body of POST /v1/interventions and /v1/steer (steering fields ignored by the former and vice versa)."""

    interventions: list[InterventionSpec] = Field(default_factory=list, max_length=1000, description="feature and "
                                                  "error-node edits")
    supernodes: list[SupernodeSpec] = Field(default_factory=list, max_length=100, description="group edits")
    freeze_attention: bool = Field(False, description="replay the clean run's attention patterns and norm scales; "
                                   "features still respond")
    constrained_layers: list[Index] | None = Field(None, max_length=1000, description="layers whose features do not "
                                                   "respond and whose outputs stay at their clean values; null: none")
    direct_only: bool = Field(False, description="everything but the edited features frozen (attention, norms, all "
                              "other features): the graph's direct effects")
    top_k: int = Field(10, ge=1, le=100, description="next tokens to report before and after")
    read_features: list[tuple[Index, Position, Index]] | None = Field(None, max_length=1000, description="(layer, "
                                                                      "position, feature) activations to report "
                                                                      "before and after")
    max_new_tokens: int = Field(20, ge=0, le=256, description="/v1/steer: tokens to generate")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="/v1/steer: sampling temperature (0: greedy)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="/v1/steer: sampling seed, in [0, 2**63 - 1]")


class TokenProbView(BaseModel):
    """One next-token candidate."""

    token_id: int = Field(description="the token id")
    token: str = Field(description="the decoded token")
    prob: float = Field(description="its probability at the last position")


class InterventionResponse(BaseModel):
    """Body of a POST /v1/interventions answer: the clean model (before) vs the intervened replacement model
    (after), at the last position."""

    tokens: list[int] = Field(description="the prompt's token ids (BOS included)")
    top_before: list[TokenProbView] = Field(description="the top_k next tokens of the clean model")
    top_after: list[TokenProbView] = Field(description="the top_k next tokens with the interventions")
    read_features: list[tuple[int, int, int]] = Field(default_factory=list, description="the (layer, position, feature) "
                                                      "nodes read, positions made absolute")
    activations_before: list[float] = Field(default_factory=list, description="their activations, clean run")
    activations_after: list[float] = Field(default_factory=list, description="their activations, with the interventions")
    warnings: list[str] = Field(default_factory=list, description="interventions that change nothing: a feature inactive "
                                "at every chosen position, ablated or scaled")


class SteerResponse(BaseModel):
    """Body of a POST /v1/steer answer: the plain and the steered continuation."""

    tokens: list[int] = Field(description="the prompt's token ids (BOS included)")
    plain: str = Field(description="the continuation without interventions")
    plain_ids: list[int] = Field(description="its token ids")
    steered: str = Field(description="the continuation with the interventions")
    steered_ids: list[int] = Field(description="its token ids")
    warnings: list[str] = Field(default_factory=list, description="as in `InterventionResponse` (prompt positions)")


class GraphView(PruneSettings):
    """The query of GET /v1/graphs/{graph_id}: the pruned view and name of a stored graph (thresholds left out take
    the application's defaults)."""

    slug: str | None = Field(None, pattern=SLUG_PATTERN, description="as in `GraphRequest`")
    pruned: bool = Field(False, description="as in `GraphRequest`")
