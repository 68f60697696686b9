"""HTTP client for the attribute-ray Serve service (`/v1/graphs`, `/v1/jobs`, `/v1/models`).

    with Client("http://host:8000", token="...") as c:
        g = c.graph("The capital of France is", max_feature_nodes=4096)   # -> Graph
        job = c.submit("The capital of France is")                       # -> Job (async on the server)
        g = c.wait(job, progress=True)                                    # -> Graph

Every request goes through one retry policy: 503/429 and transport errors (connect failures, timeouts) are
retried up to `retries` times, sleeping the server's `Retry-After` seconds when it sends one, otherwise
`backoff·2^attempt` capped at `max_backoff`, plus a little jitter. Other 4xx/5xx raise `ServiceError` at once.

The request/response logic is written once, sans-I/O, as generators that yield `_Send`/`_Sleep` steps;
`Client` drives them with `httpx.Client` and `time.sleep`, `AsyncClient` with `httpx.AsyncClient` and
`asyncio.sleep`. The bearer token is never put into an error message or a repr.

The keyword settings of `graph`, `graph_json` and `submit` are the fields of `attribute_ray.api.GraphRequest`
(the `GraphSettings` plus targets, slug, pruned), checked before sending; those not given (or None) take the
server's defaults.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple, TypeVar

import httpx

from attribute_ray.api import GraphRequest, JobView
from attribute_ray.errors import AttributeRayError
from attribute_ray.graph import Graph
from attribute_ray.settings import PruneSettings

__all__ = ["AsyncClient", "Client", "Job", "ServiceError"]

MSGPACK = "application/msgpack"
JSON = "application/json"
RETRY_STATUS = frozenset({429, 503})
TERMINAL = frozenset({"done", "failed", "cancelled"})
_VIEW_PARAMS = (*PruneSettings.model_fields, "slug")  # query parameters of GET /v1/graphs/{id} (JSON view)

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

    @property
    def finished(self) -> bool:
        """True once the job is done, failed or cancelled."""
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, d: dict) -> Job:
        """A job from its JSON view (`attribute_ray.api.JobView`)."""
        v = JobView.model_validate(d)
        return cls(job_id=str(v.job_id), graph_id=v.graph_id, status=v.status,
                   progress=v.progress.model_dump() if v.progress else None, error=v.error)


# ----- sans-I/O steps ------------------------------------------------------------------------------
class _Send(NamedTuple):
    method: str
    path: str
    params: dict | None
    json: dict | None
    accept: str


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


def _response_detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        text = r.text.strip()
        return text[:1000] if text else (r.reason_phrase or "no detail")
    if isinstance(body, dict) and "detail" in body:
        return _format_detail(body["detail"])
    return _format_detail(body)


def _graph_body(prompt: str | Sequence[int], settings: dict) -> dict:
    """The POST /v1/graphs JSON body: prompt or tokens, plus exactly the settings the caller gave (validated
    as `GraphRequest` fields: TypeError for an unknown name, pydantic's ValidationError for a bad value)."""
    if isinstance(prompt, str):
        body: dict[str, Any] = {"prompt": prompt, "tokens": None}
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt must be a str or a sequence of token ids, not bytes")
    else:
        body = {"prompt": None, "tokens": [int(t) for t in prompt]}
    clash = {"prompt", "tokens"} & settings.keys()
    if clash:
        raise TypeError(f"pass the prompt positionally, not as {sorted(clash)}")
    unknown = settings.keys() - GraphRequest.model_fields.keys()
    if unknown:
        raise TypeError(f"unknown graph settings {sorted(unknown)}; expected some of "
                        f"{sorted(GraphRequest.model_fields.keys() - {'prompt', 'tokens'})}")
    body.update(settings)
    GraphRequest.model_validate(body)
    return body


class _Base:
    """Configuration, the retry policy and every endpoint, as sans-I/O generators."""

    def __init__(self, url: str, token: str | None, timeout: float, retries: int, backoff: float,
                 max_backoff: float):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
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
                 accept: str = JSON, retries: int | None = None) -> Op[httpx.Response]:
        """The 2xx response, after retrying 503/429 and transport errors; raises ServiceError otherwise."""
        retries = self.retries if retries is None else retries
        where = f"{method} {path}"
        for attempt in range(retries + 1):
            outcome = yield _Send(method, path, params, json, accept)
            if isinstance(outcome, httpx.TransportError):
                if attempt == retries:
                    raise ServiceError(None, self._scrub(f"{type(outcome).__name__}: {outcome}"), where) from outcome
                yield _Sleep(self._delay(attempt, None))
                continue
            r: httpx.Response = outcome
            if r.is_success:
                return r
            if r.status_code not in RETRY_STATUS or attempt == retries:
                raise ServiceError(r.status_code, self._scrub(_response_detail(r)), where)
            yield _Sleep(self._delay(attempt, r))
        raise AssertionError("unreachable")

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
        return Graph.from_msgpack(r.content) if accept == MSGPACK else r.json()

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
        return Graph.from_msgpack(r.content) if format == "msgpack" else r.json()

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

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 600.0, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, transport: httpx.BaseTransport | None = None):
        super().__init__(url, token, timeout, retries, backoff, max_backoff)
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
                    value = self._http.request(step.method, step.path, params=step.params, json=step.json,
                                               headers={"Accept": step.accept})
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

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 600.0, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(url, token, timeout, retries, backoff, max_backoff)
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
                    value = await self._http.request(step.method, step.path, params=step.params, json=step.json,
                                                     headers={"Accept": step.accept})
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
