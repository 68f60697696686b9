"""HTTP client for the attribute-ray Serve service: one method per HTTP route (`ROUTES`), sync and async.

    with Client("http://host:8000", token="...") as c:
        g = c.graph("The capital of France is", max_feature_nodes=4096)   # -> Graph
        job = c.submit("The capital of France is")                       # -> Job (async on the server)
        g = c.wait(job, progress=True)                                    # -> Graph
        r = c.intervene("The capital of France is", [Intervention(2, 168, "scale", -2.0)])  # -> InterventionResponse

Every request goes through one retry policy: 503/429, transport errors (connect failures, timeouts) and 5xx
answers that are not the service's own (a proxy's error when the ingress replica dies under a request) are
retried until `retry_deadline` seconds (default 600) have passed since the first attempt — sleeping the
server's `Retry-After` seconds when it sends one, otherwise `backoff·2^attempt` capped at `max_backoff`, plus a
little jitter — so a busy service delays a request but does not lose it. `retries`, when given, also caps the
number of retries. Other 4xx/5xx raise `ServiceError` at once.

The request/response logic is written once, sans-I/O, as generators that yield `_Send`/`_Sleep` steps;
`Client` drives them with `httpx.Client` and `time.sleep`, `AsyncClient` with `httpx.AsyncClient` and
`asyncio.sleep`. The bearer token is never put into an error message or a repr.

Bodies are the shared request models of attribute_ray/api.py, checked before sending: the keyword settings of
`graph`, `graph_json`, `submit` and `stream` are `GraphRequest` fields (those not given, or None, take the
server's defaults); those of `intervene` and `steer` are `InterventionRequest` fields. Interventions may be
`InterventionSpec`s, dicts or library `Intervention`s; nodes are (layer, position, feature) and supernode
members (layer, feature), as everywhere (attribute_ray/interventions.py, "Addresses").
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
import warnings
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple, TypeVar

import httpx

from attribute_ray.api import (
    GraphRequest,
    InterventionRequest,
    InterventionResponse,
    InterventionSpec,
    JobView,
    SteerResponse,
    StreamEvent,
    SupernodeSpec,
)
from attribute_ray.errors import AttributeRayError
from attribute_ray.graph import Graph
from attribute_ray.settings import PruneSettings

__all__ = ["ROUTES", "AsyncClient", "Client", "Job", "ServiceError"]

MSGPACK = "application/msgpack"
JSON = "application/json"
RETRY_STATUS = frozenset({429, 503})
TERMINAL = frozenset({"done", "failed", "cancelled"})
_VIEW_PARAMS = (*PruneSettings.model_fields, "slug")  # query parameters of GET /v1/graphs/{id} (JSON view)

DEFAULT_RETRY_DEADLINE = 600.0  # seconds a request keeps retrying 503/429, connection errors and a proxy's 5xx
# Every HTTP route of the service (deployments/ingress.py, but the web UI's) and the client methods that call it.
ROUTES: dict[tuple[str, str], tuple[str, ...]] = {
    ("GET", "/healthz"): ("health",),
    ("GET", "/readyz"): ("health",),
    ("GET", "/v1/models"): ("models",),
    ("POST", "/v1/graphs"): ("graph", "graph_json", "submit"),
    ("POST", "/v1/graphs/stream"): ("stream",),
    ("GET", "/v1/graphs"): ("graphs",),
    ("GET", "/v1/graphs/{graph_id}"): ("fetch",),
    ("POST", "/v1/interventions"): ("intervene",),
    ("POST", "/v1/steer"): ("steer",),
    ("GET", "/v1/features/{layer}/{index}"): ("feature",),
    ("GET", "/v1/features/{cantor_id}.json"): ("feature_by_cantor",),
    ("GET", "/v1/jobs/{job_id}"): ("job", "wait"),
    ("DELETE", "/v1/jobs/{job_id}"): ("cancel",),
}

T = TypeVar("T")


class ServiceError(AttributeRayError):
    """The service answered with an error (`status_code` set) or could not be reached (`status_code` None)."""

    def __init__(self, status_code: int | None, detail: str, where: str = ""):
        self.status_code = status_code
        self.detail = detail
        self.where = where
        prefix = f"{where}: " if where else ""
        code = f"HTTP {status_code}" if status_code is not None else "request failed"
        super().__init__(f"{prefix}{code}: {detail}")


@dataclass
class Job:
    """A server-side graph job; `progress` is {"phase", "done", "total"} or None."""

    job_id: str
    graph_id: str | None
    status: str  # queued | running | done | failed | cancelled
    progress: dict | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the finished graph lacks (e.g. trimmed to the engine's memory budget)

    @property
    def finished(self) -> bool:
        """True once the job is done, failed or cancelled."""
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, d: dict) -> Job:
        """A job from its JSON view (`attribute_ray.api.JobView`)."""
        v = JobView.model_validate(d)
        return cls(job_id=str(v.job_id), graph_id=v.graph_id, status=v.status,
                   progress=v.progress.model_dump() if v.progress else None, error=v.error, warnings=v.warnings)


class GraphTrimmedWarning(UserWarning):
    """The service computed fewer feature rows than asked, to fit its memory budget (docs/memory.md)."""


def _decoded(content: bytes) -> Graph:
    """A graph from msgpack bytes; warns (`GraphTrimmedWarning`) when the service trimmed it."""
    graph = Graph.from_msgpack(content)
    if graph.settings.get("trimmed"):
        warnings.warn(graph.settings["trimmed"]["reason"], GraphTrimmedWarning, stacklevel=4)
    return graph


# ----- sans-I/O steps ------------------------------------------------------------------------------
class _Send(NamedTuple):
    method: str
    path: str
    params: dict | None
    json: dict | None
    accept: str
    stream: bool = False  # a 2xx body is left unread for the caller to iterate (then closed by it)


class _Sleep(NamedTuple):
    seconds: float


Op = Generator["_Send | _Sleep", Any, T]  # receives httpx.Response | httpx.TransportError after a _Send


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or unparseable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _format_detail(detail: Any) -> str:
    """FastAPI `detail` (a string, or a list of pydantic error dicts for 422) as one line of text."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for e in detail:
            if isinstance(e, dict) and "msg" in e:
                loc = ".".join(str(x) for x in e.get("loc", ()))
                parts.append(f"{loc}: {e['msg']}" if loc else str(e["msg"]))
            else:
                parts.append(str(e))
        return "; ".join(parts)
    return str(detail)


def _not_from_the_service(r: httpx.Response) -> bool:
    """A 5xx without the service's JSON `detail` body: a proxy's or gateway's own error (e.g. the ingress replica died
    under the request). Retried like a lost connection; every route is idempotent (graphs are content-addressed)."""
    if r.status_code < 500:
        return False
    try:
        return not (isinstance(body := r.json(), dict) and "detail" in body)
    except ValueError:
        return True


def _response_detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        text = r.text.strip()
        return text[:1000] if text else (r.reason_phrase or "no detail")
    if isinstance(body, dict) and "detail" in body:
        return _format_detail(body["detail"])
    return _format_detail(body)


def _prompt_body(prompt: str | Sequence[int]) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt, "tokens": None}
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt must be a str or a sequence of token ids, not bytes")
    return {"prompt": None, "tokens": [int(t) for t in prompt]}


def _body(model: type[GraphRequest] | type[InterventionRequest], what: str, prompt: str | Sequence[int],
          fields: dict) -> dict:
    """A request body: prompt or tokens, plus exactly the fields the caller gave, validated as `model` (TypeError
    for an unknown name, pydantic's ValidationError for a bad value)."""
    body = _prompt_body(prompt)
    clash = {"prompt", "tokens"} & fields.keys()
    if clash:
        raise TypeError(f"pass the prompt positionally, not as {sorted(clash)}")
    unknown = fields.keys() - model.model_fields.keys()
    if unknown:
        raise TypeError(f"unknown {what} {sorted(unknown)}; expected some of "
                        f"{sorted(model.model_fields.keys() - {'prompt', 'tokens'})}")
    body.update(fields)
    model.model_validate(body)
    return body


def _graph_body(prompt: str | Sequence[int], settings: dict) -> dict:
    """The POST /v1/graphs JSON body (`_body` with `GraphRequest`)."""
    return _body(GraphRequest, "graph settings", prompt, settings)


def _intervention_body(prompt: str | Sequence[int], interventions: Sequence[Any], supernodes: Sequence[Any],
                       fields: dict) -> dict:
    """The POST /v1/interventions and /v1/steer JSON body. `interventions`: `InterventionSpec`s, dicts or objects
    with its attributes (a library `Intervention`); `supernodes`: `SupernodeSpec`s or dicts."""
    if isinstance(interventions, (dict, InterventionSpec)) or isinstance(supernodes, (dict, SupernodeSpec)):
        raise TypeError("interventions and supernodes are lists")
    specs = [InterventionSpec.model_validate(i, from_attributes=True).model_dump() for i in interventions]
    groups = [SupernodeSpec.model_validate(g).model_dump() for g in supernodes]
    fields = dict(fields)
    if "read_features" in fields and fields["read_features"] is not None:
        fields["read_features"] = [[int(v) for v in node] for node in fields["read_features"]]
    return _body(InterventionRequest, "intervention fields", prompt, {"interventions": specs, "supernodes": groups, **fields})


class _Base:
    """Configuration, the retry policy and every endpoint, as sans-I/O generators."""

    def __init__(self, url: str, token: str | None, timeout: float, retries: int | None, backoff: float,
                 max_backoff: float, retry_deadline: float):
        if retries is not None and retries < 0:
            raise ValueError(f"retries must be >= 0 or None, got {retries}")
        if not retry_deadline > 0:
            raise ValueError(f"retry_deadline must be > 0 seconds, got {retry_deadline}")
        self.retry_deadline = float(retry_deadline)
        self.url = url.rstrip("/")
        self._token = token or None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._headers = {"User-Agent": "attribute-ray-client"}
        if self._token:
            self._headers["Authorization"] = f"Bearer {self._token}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to sleep before retry number `attempt + 1`."""
        base = _retry_after(response.headers.get("Retry-After")) if response is not None else None
        if base is None:
            base = min(self.backoff * 2.0 ** attempt, self.max_backoff)
        return base + random.uniform(0.0, 0.1 * base)

    # ----- the one request path ------------------------------------------------------------------
    def _request(self, method: str, path: str, *, params: dict | None = None, json: dict | None = None,
                 accept: str = JSON, retries: int | None = None, stream: bool = False) -> Op[httpx.Response]:
        """The 2xx response, after retrying 503/429, transport errors and a proxy's own 5xx until `retry_deadline` (and at most
        `retries` times when set); raises ServiceError otherwise."""
        retries = self.retries if retries is None else retries
        where = f"{method} {path}"
        start, slept = time.monotonic(), 0.0
        attempt = 0
        while True:
            outcome = yield _Send(method, path, params, json, accept, stream)
            response = None if isinstance(outcome, httpx.TransportError) else outcome
            if response is not None and response.is_success:
                return response
            # slept counts too: the budget holds even where sleeping is faked (tests) or the clock is coarse
            left = self.retry_deadline - max(time.monotonic() - start, slept)
            exhausted = (retries is not None and attempt >= retries) or left <= 0
            if response is None:
                if exhausted:
                    raise ServiceError(None, self._scrub(f"{type(outcome).__name__}: {outcome}"), where) from outcome
            elif not (response.status_code in RETRY_STATUS or _not_from_the_service(response)) or exhausted:
                raise ServiceError(response.status_code, self._scrub(_response_detail(response)), where)
            delay = min(self._delay(attempt, response), left)
            slept += delay
            attempt += 1
            yield _Sleep(delay)

    def _json(self, method: str, path: str, **kw) -> Op[Any]:
        r = yield from self._request(method, path, **kw)
        return r.json()

    # ----- endpoints -----------------------------------------------------------------------------
    def _graph_op(self, prompt: str | Sequence[int], settings: dict, accept: str) -> Op[Any]:
        r = yield from self._request("POST", "/v1/graphs", params={"wait": "true"},
                                     json=_graph_body(prompt, settings), accept=accept)
        if r.status_code == 202:  # the server chose to run it as a job after all
            view = {k: settings[k] for k in _VIEW_PARAMS if k in settings} if accept == JSON else None
            return (yield from self._wait_op(Job.from_json(r.json()), False, 0.2, None, accept, view))
        return _decoded(r.content) if accept == MSGPACK else r.json()

    def _submit_op(self, prompt: str | Sequence[int], settings: dict) -> Op[Job]:
        d = yield from self._json("POST", "/v1/graphs", params={"wait": "false"}, json=_graph_body(prompt, settings))
        return Job.from_json(d)

    def _job_op(self, job_id: str) -> Op[Job]:
        return Job.from_json((yield from self._json("GET", f"/v1/jobs/{job_id}")))

    def _cancel_op(self, job_id: str) -> Op[Job]:
        return Job.from_json((yield from self._json("DELETE", f"/v1/jobs/{job_id}")))

    def _fetch_op(self, graph_id: str, format: str, view: dict | None = None) -> Op[Any]:
        if format not in ("msgpack", "json"):
            raise ValueError(f"format must be 'msgpack' or 'json', got {format!r}")
        accept = MSGPACK if format == "msgpack" else JSON
        params = {k: v for k, v in (view or {}).items() if v is not None} or None
        r = yield from self._request("GET", f"/v1/graphs/{graph_id}", params=params, accept=accept)
        return _decoded(r.content) if format == "msgpack" else r.json()

    def _stream_op(self, prompt: str | Sequence[int], settings: dict) -> Op[httpx.Response]:
        return (yield from self._request("POST", "/v1/graphs/stream", json=_graph_body(prompt, settings),
                                         accept="application/x-ndjson", stream=True))

    def _graphs_op(self, limit: int) -> Op[list[dict]]:
        return (yield from self._json("GET", "/v1/graphs", params={"limit": int(limit)}))["graphs"]

    def _intervene_op(self, route: str, prompt: str | Sequence[int], interventions: Sequence[Any],
                      supernodes: Sequence[Any], fields: dict) -> Op[dict]:
        body = _intervention_body(prompt, interventions, supernodes, fields)
        return (yield from self._json("POST", route, json=body))

    def _feature_op(self, path: str) -> Op[dict]:
        return (yield from self._json("GET", path))

    def _health_op(self, ready: bool) -> Op[bool]:
        try:
            yield from self._request("GET", "/readyz" if ready else "/healthz", retries=0)
        except ServiceError:
            return False
        return True

    def _wait_op(self, job: Job | str, progress: Callable[[Job], None] | bool, poll: float,
                 timeout: float | None, accept: str = MSGPACK, view: dict | None = None) -> Op[Any]:
        if isinstance(job, str):
            job = yield from self._job_op(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(desc=job.status, unit="step")
        try:
            while True:
                if bar is not None:
                    _update_bar(bar, job)
                elif callable(progress):
                    progress(job)
                if job.finished:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"job {job.job_id} still {job.status} after {timeout}s")
                yield _Sleep(poll if remaining is None else min(poll, remaining))
                job = yield from self._job_op(job.job_id)
        finally:
            if bar is not None:
                bar.close()
        where = f"job {job.job_id}"
        if job.status == "failed":
            raise ServiceError(None, self._scrub(f"job failed: {job.error or 'no error message'}"), where)
        if job.status == "cancelled":
            raise ServiceError(None, "job was cancelled", where)
        if not job.graph_id:
            raise ServiceError(None, "job is done but names no graph_id", where)
        return (yield from self._fetch_op(job.graph_id, "msgpack" if accept == MSGPACK else "json", view))


def _update_bar(bar: Any, job: Job) -> None:
    p = job.progress
    if p:
        bar.total = p.get("total") or None
        bar.n = p.get("done") or 0
        bar.set_description(str(p.get("phase") or job.status), refresh=False)
    else:
        bar.set_description(job.status, refresh=False)
    bar.refresh()


# ----- drivers -------------------------------------------------------------------------------------
class Client(_Base):
    """Synchronous client; one `httpx.Client` per instance. Use as a context manager or call `close()`."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 600.0, retries: int | None = None,
                 backoff: float = 0.5, max_backoff: float = 30.0, retry_deadline: float = DEFAULT_RETRY_DEADLINE,
                 transport: httpx.BaseTransport | None = None):
        super().__init__(url, token, timeout, retries, backoff, max_backoff, retry_deadline)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout, transport=transport)

    def _run(self, op: Op[T]) -> T:
        value: Any = None
        try:
            while True:
                try:
                    step = op.send(value)
                except StopIteration as stop:
                    return stop.value
                if isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    value = None
                    continue
                try:
                    request = self._http.build_request(step.method, step.path, params=step.params, json=step.json,
                                                       headers={"Accept": step.accept})
                    value = self._http.send(request, stream=step.stream)
                    if step.stream and not value.is_success:  # an error body is read whole, then released
                        value.read()
                        value.close()
                except httpx.TransportError as e:
                    value = e
        finally:
            op.close()

    def graph(self, prompt: str | Sequence[int], **settings: Any) -> Graph:
        """Compute (or look up) the graph of a prompt or token list; returns the Graph. `settings`: fields of
        `GraphRequest` (module docstring)."""
        return self._run(self._graph_op(prompt, settings, MSGPACK))

    def graph_json(self, prompt: str | Sequence[int], **settings: Any) -> dict:
        """Like `graph`, but returns the Neuronpedia JSON dict."""
        return self._run(self._graph_op(prompt, settings, JSON))

    def submit(self, prompt: str | Sequence[int], **settings: Any) -> Job:
        """Queue a graph job without waiting; returns the Job (status may already be "done")."""
        return self._run(self._submit_op(prompt, settings))

    def job(self, job_id: str) -> Job:
        """Returns the current state of a job."""
        return self._run(self._job_op(job_id))

    def cancel(self, job_id: str) -> Job:
        """Cancel a job; returns it (status "cancelled")."""
        return self._run(self._cancel_op(job_id))

    def wait(self, job: Job | str, *, progress: Callable[[Job], None] | bool = False, poll: float = 0.2,
             timeout: float | None = None) -> Graph:
        """Poll a job until it finishes; returns its Graph. Raises ServiceError if it failed or was cancelled,
        TimeoutError after `timeout` seconds. `progress=True` shows a tqdm bar; a callable receives each Job."""
        return self._run(self._wait_op(job, progress, poll, timeout))

    def fetch(self, graph_id: str, format: Literal["msgpack", "json"] = "msgpack", *,
              node_threshold: float | None = None, edge_threshold: float | None = None,
              slug: str | None = None, pruned: bool | None = None) -> Graph | dict:
        """A stored graph: a Graph for "msgpack" (only the pruned graph with `pruned=True`), the Neuronpedia
        JSON dict for "json" (pruned with the given thresholds and named `slug`; server defaults when None)."""
        view = dict(node_threshold=node_threshold, edge_threshold=edge_threshold, slug=slug, pruned=pruned)
        return self._run(self._fetch_op(graph_id, format, view))

    def stream(self, prompt: str | Sequence[int], **settings: Any) -> Iterator[StreamEvent]:
        """POST /v1/graphs/stream: the job's events (queued, progress ..., then done with graph_id, or failed /
        cancelled) as they happen; the request is sent (and checked) before this returns."""
        response = self._run(self._stream_op(prompt, settings))

        def events() -> Iterator[StreamEvent]:
            try:
                for line in response.iter_lines():
                    if line.strip():
                        yield StreamEvent.model_validate_json(line)
            finally:
                response.close()

        return events()

    def graphs(self, limit: int = 50) -> list[dict]:
        """The most recent stored graphs, newest first: [{"graph_id", "prompt", "created"}] (GET /v1/graphs)."""
        return self._run(self._graphs_op(limit))

    def intervene(self, prompt: str | Sequence[int], interventions: Sequence[Any] = (), *,
                  supernodes: Sequence[SupernodeSpec | dict] = (), **fields: Any) -> InterventionResponse:
        """POST /v1/interventions: top next tokens and `read_features` activations before vs after, and
        `warnings` for interventions that change nothing. `fields`: `InterventionRequest` fields (top_k,
        read_features as (layer, position, feature), freeze_attention, constrained_layers, direct_only)."""
        return InterventionResponse.model_validate(
            self._run(self._intervene_op("/v1/interventions", prompt, interventions, supernodes, fields)))

    def steer(self, prompt: str | Sequence[int], interventions: Sequence[Any] = (), *,
              supernodes: Sequence[SupernodeSpec | dict] = (), **fields: Any) -> SteerResponse:
        """POST /v1/steer: the plain and the steered continuation. `fields`: `InterventionRequest` fields
        (max_new_tokens, temperature, seed)."""
        return SteerResponse.model_validate(
            self._run(self._intervene_op("/v1/steer", prompt, interventions, supernodes, fields)))

    def feature(self, layer: int, index: int) -> dict:
        """A feature's dashboard (GET /v1/features/{layer}/{index}; Neuronpedia feature JSON)."""
        return self._run(self._feature_op(f"/v1/features/{int(layer)}/{int(index)}"))

    def feature_by_cantor(self, cantor_id: int) -> dict:
        """The same dashboard by the Cantor id graph JSON gives a feature (GET /v1/features/{cantor_id}.json)."""
        return self._run(self._feature_op(f"/v1/features/{int(cantor_id)}.json"))

    def models(self) -> dict:
        """Returns the served model's description (model, transcoder, n_layers, limits, defaults, ...)."""
        return self._run(self._json("GET", "/v1/models"))

    def health(self, *, ready: bool = True) -> bool:
        """True if /readyz (or /healthz with ready=False) answers 2xx; never raises, never retries."""
        return self._run(self._health_op(ready))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio twin of `Client` (same methods, awaitable); `aclose()` or `async with`."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 600.0, retries: int | None = None,
                 backoff: float = 0.5, max_backoff: float = 30.0, retry_deadline: float = DEFAULT_RETRY_DEADLINE,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(url, token, timeout, retries, backoff, max_backoff, retry_deadline)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=timeout, transport=transport)

    async def _run(self, op: Op[T]) -> T:
        value: Any = None
        try:
            while True:
                try:
                    step = op.send(value)
                except StopIteration as stop:
                    return stop.value
                if isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                    value = None
                    continue
                try:
                    request = self._http.build_request(step.method, step.path, params=step.params, json=step.json,
                                                       headers={"Accept": step.accept})
                    value = await self._http.send(request, stream=step.stream)
                    if step.stream and not value.is_success:  # an error body is read whole, then released
                        await value.aread()
                        await value.aclose()
                except httpx.TransportError as e:
                    value = e
        finally:
            op.close()

    async def graph(self, prompt: str | Sequence[int], **settings: Any) -> Graph:
        """Returns the Graph of a prompt or token list."""
        return await self._run(self._graph_op(prompt, settings, MSGPACK))

    async def graph_json(self, prompt: str | Sequence[int], **settings: Any) -> dict:
        """Returns the Neuronpedia JSON dict of a prompt or token list."""
        return await self._run(self._graph_op(prompt, settings, JSON))

    async def submit(self, prompt: str | Sequence[int], **settings: Any) -> Job:
        """Returns the queued Job."""
        return await self._run(self._submit_op(prompt, settings))

    async def job(self, job_id: str) -> Job:
        """Returns the current state of a job."""
        return await self._run(self._job_op(job_id))

    async def cancel(self, job_id: str) -> Job:
        """Returns the cancelled Job."""
        return await self._run(self._cancel_op(job_id))

    async def wait(self, job: Job | str, *, progress: Callable[[Job], None] | bool = False, poll: float = 0.2,
                   timeout: float | None = None) -> Graph:
        """Returns the finished job's Graph (see `Client.wait`)."""
        return await self._run(self._wait_op(job, progress, poll, timeout))

    async def fetch(self, graph_id: str, format: Literal["msgpack", "json"] = "msgpack", *,
                    node_threshold: float | None = None, edge_threshold: float | None = None,
                    slug: str | None = None, pruned: bool | None = None) -> Graph | dict:
        """Returns a stored graph: a Graph for "msgpack", a dict for "json" (see `Client.fetch`)."""
        view = dict(node_threshold=node_threshold, edge_threshold=edge_threshold, slug=slug, pruned=pruned)
        return await self._run(self._fetch_op(graph_id, format, view))

    async def stream(self, prompt: str | Sequence[int], **settings: Any) -> AsyncIterator[StreamEvent]:
        """The job's events as they happen (see `Client.stream`): ``async for e in await c.stream(...)``."""
        response = await self._run(self._stream_op(prompt, settings))

        async def events() -> AsyncIterator[StreamEvent]:
            try:
                async for line in response.aiter_lines():
                    if line.strip():
                        yield StreamEvent.model_validate_json(line)
            finally:
                await response.aclose()

        return events()

    async def graphs(self, limit: int = 50) -> list[dict]:
        """The most recent stored graphs (see `Client.graphs`)."""
        return await self._run(self._graphs_op(limit))

    async def intervene(self, prompt: str | Sequence[int], interventions: Sequence[Any] = (), *,
                        supernodes: Sequence[SupernodeSpec | dict] = (), **fields: Any) -> InterventionResponse:
        """Before vs after the interventions (see `Client.intervene`)."""
        return InterventionResponse.model_validate(
            await self._run(self._intervene_op("/v1/interventions", prompt, interventions, supernodes, fields)))

    async def steer(self, prompt: str | Sequence[int], interventions: Sequence[Any] = (), *,
                    supernodes: Sequence[SupernodeSpec | dict] = (), **fields: Any) -> SteerResponse:
        """Plain vs steered continuation (see `Client.steer`)."""
        return SteerResponse.model_validate(
            await self._run(self._intervene_op("/v1/steer", prompt, interventions, supernodes, fields)))

    async def feature(self, layer: int, index: int) -> dict:
        """A feature's dashboard (see `Client.feature`)."""
        return await self._run(self._feature_op(f"/v1/features/{int(layer)}/{int(index)}"))

    async def feature_by_cantor(self, cantor_id: int) -> dict:
        """A feature's dashboard by Cantor id (see `Client.feature_by_cantor`)."""
        return await self._run(self._feature_op(f"/v1/features/{int(cantor_id)}.json"))

    async def models(self) -> dict:
        """Returns the served model's description."""
        return await self._run(self._json("GET", "/v1/models"))

    async def health(self, *, ready: bool = True) -> bool:
        """True if /readyz (or /healthz) answers 2xx."""
        return await self._run(self._health_op(ready))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
