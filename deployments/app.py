"""The attribution service: `AppArgs` → `app_builder` → Ingress (FastAPI) + AttributionEngine (resident model).

    serve run deployments.app:app_builder preset=smollm2-135m-clt
    serve deploy serve_config.yaml

The engine keeps one `ReplacementModel` per replica and streams progress events, then the graph's msgpack
bytes, to the ingress; attribution runs in a worker thread, never on the event loop. The ingress validates
requests, owns the job table (so it runs as one replica), applies backpressure (503 + Retry-After when the
queue is full) and keeps results in the content-addressed `GraphStore`.
No `from __future__ import annotations` here: FastAPI would misread the route signatures (ray-notes #1).
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import msgpack
import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from attribute_ray import __version__
from attribute_ray.attribution import AttributionSettings
from attribute_ray.graph import Graph
from attribute_ray.replacement import load_tokenizer, tokenize
from attribute_ray.store import KEY_RE, GraphStore, graph_key
from deployments.config import AppArgs

log = logging.getLogger("ray.serve")
MSGPACK = "application/msgpack"
UI_DIR = Path(__file__).parent / "ui"


class Cancelled(Exception):
    """Raised inside the worker thread when the request was cancelled."""


# ----- engine -----------------------------------------------------------------------------------


@serve.deployment(name="AttributionEngine", health_check_period_s=10, health_check_timeout_s=30)
class AttributionEngine:
    """Holds model + transcoder; `run` streams {"event": "progress", ...} dicts, then {"event": "result", "data": bytes}."""

    def __init__(self, args: AppArgs):
        from attribute_ray import ReplacementModel

        torch.set_num_threads(max(1, int(args.num_cpus)))  # replicas sharing a node must not oversubscribe it
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            args.dtype, torch.bfloat16 if device == "cuda" else torch.float32
        )
        self.model = ReplacementModel.from_pretrained(args.model, args.transcoder, device=device, dtype=dtype)
        self.args = args
        self.broken: str | None = None
        self._smoke_test()

    def _smoke_test(self) -> None:
        """The model must produce finite logits, or the replica reports itself unhealthy."""
        try:
            logits = self.model.trace(self.model.tokenize([self.model.tokenizer.all_special_ids[0], 1, 2])).logits
            if not torch.isfinite(logits).all():
                self.broken = "model produces non-finite logits"
        except Exception as e:  # noqa: BLE001 - any failure means the model is unusable
            self.broken = f"model smoke test failed: {type(e).__name__}: {e}"

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError(self.broken)

    def info(self) -> dict:
        m, tc = self.model, self.model.transcoder
        return {
            "model": self.args.model, "transcoder": self.args.transcoder, "family": m.family.name,
            "n_layers": m.n_layers, "d_model": m.d_model, "vocab_size": m.model.config.vocab_size,
            "transcoder_kind": "clt" if tc.is_cross_layer else "plt", "features_per_layer": tc.n_features(0),
            "skip": tc.has_skip, "activation": tc.activation.kind, "hookpoints": [tc.hookpoints.input, tc.hookpoints.output],
            "device": str(m.device), "dtype": str(tc.dtype).removeprefix("torch."),
        }

    def _interventions(self, req: dict) -> list:
        from attribute_ray.interventions import Intervention, Supernode

        items = [Intervention(i["layer"], i.get("feature"), i["op"], i.get("value", 0.0), i.get("positions", "all"))
                 for i in req.get("interventions", [])]
        for sn in req.get("supernodes", []):
            items += Supernode(sn["label"], [tuple(f) for f in sn["features"]]).interventions(
                sn["op"], sn.get("value", 0.0), sn.get("positions", "all"))
        return items

    async def intervene(self, tokens: list[int], req: dict) -> dict:
        """Next-token distribution and feature activations before vs after the interventions."""
        from attribute_ray.errors import InterventionError
        from attribute_ray.interventions import intervene

        def work() -> dict:
            r = intervene(self.model, tokens, self._interventions(req), freeze_attention=req["freeze_attention"],
                          constrained_layers=req.get("constrained_layers"), direct_only=req["direct_only"],
                          top_k=req["top_k"], read_features=[tuple(f) for f in req.get("read_features") or []])
            top = lambda ps: [{"token_id": t.token_id, "token": t.token, "prob": t.prob} for t in ps]  # noqa: E731
            return {"tokens": r.tokens.tolist(), "top_before": top(r.top_before), "top_after": top(r.top_after),
                    "read_features": [list(f) for f in r.read_features],
                    "activations_before": r.activations_before.tolist(), "activations_after": r.activations_after.tolist()}

        try:
            return await asyncio.to_thread(work)
        except InterventionError as e:
            return {"error": str(e)}

    async def steer(self, tokens: list[int], req: dict) -> dict:
        """Generated continuation with and without the interventions (KV-cached generation)."""
        from attribute_ray.errors import InterventionError
        from attribute_ray.interventions import generate_with_interventions

        def work() -> dict:
            kw = dict(max_new_tokens=req["max_new_tokens"], temperature=req["temperature"], seed=req["seed"])
            plain, plain_ids = generate_with_interventions(self.model, tokens, [], **kw)
            steered, steered_ids = generate_with_interventions(self.model, tokens, self._interventions(req), **kw)
            return {"tokens": tokens, "plain": plain, "plain_ids": plain_ids, "steered": steered, "steered_ids": steered_ids}

        try:
            return await asyncio.to_thread(work)
        except InterventionError as e:
            return {"error": str(e)}

    async def run(self, tokens: list[int], settings: dict, targets: list | None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        last = [0.0]

        def on_progress(phase: str, done: int, total: int) -> None:
            if cancel.is_set():
                raise Cancelled()
            now = time.monotonic()
            if now - last[0] >= 0.1 or done == total:  # at most ~10 events/s cross the handle
                last[0] = now
                loop.call_soon_threadsafe(events.put_nowait, {"event": "progress", "phase": phase, "done": done, "total": total})

        def work() -> bytes:
            from attribute_ray.attribution import attribute

            graph = attribute(torch.tensor(tokens), self.model, targets=targets, on_progress=on_progress, **settings)
            return graph.to_msgpack()

        task = loop.run_in_executor(None, work)
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            data = await task
        except BaseException:
            cancel.set()  # client went away or the request was cancelled: stop the worker at its next batch
            raise
        yield {"event": "result", "data": data}


# ----- request / job models ----------------------------------------------------------------------


class GraphRequest(BaseModel):
    """Body of POST /v1/graphs (JSON or msgpack). Settings default to the application's."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, min_length=1, max_length=200_000)
    tokens: list[int] | None = Field(None, min_length=1)
    max_n_logits: int | None = Field(None, ge=1, le=1000)
    desired_logit_prob: float | None = Field(None, gt=0.0, le=1.0)
    max_feature_nodes: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1, le=65536)
    node_threshold: float | None = Field(None, ge=0.0, le=1.0)
    edge_threshold: float | None = Field(None, ge=0.0, le=1.0)
    targets: list[int] | list[str] | None = Field(None, min_length=1, max_length=1000)
    slug: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    pruned: bool = False  # msgpack responses: only the pruned graph (JSON is always pruned)

    @model_validator(mode="after")
    def _one_input(self) -> "GraphRequest":
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompt' or 'tokens'")
        return self


Positions = list[int] | Literal["all", "generated"]
Op = Literal["set", "scale", "add", "ablate"]


class InterventionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int = Field(ge=0)
    feature: int | None = Field(None, ge=0, description="None: the layer's error node")
    op: Op = "ablate"
    value: float = 0.0
    positions: Positions = "all"


class SupernodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1, max_length=200)
    features: list[tuple[int, int]] = Field(min_length=1, max_length=1000, description="(layer, feature) pairs")
    op: Op = "ablate"
    value: float = 0.0
    positions: Positions = "all"


class InterventionRequest(BaseModel):
    """Body of POST /v1/interventions and /v1/steer (steering fields ignored by the former and vice versa)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, min_length=1, max_length=200_000)
    tokens: list[int] | None = Field(None, min_length=1)
    interventions: list[InterventionSpec] = Field(default_factory=list, max_length=1000)
    supernodes: list[SupernodeSpec] = Field(default_factory=list, max_length=100)
    freeze_attention: bool = False
    constrained_layers: list[int] | None = None
    direct_only: bool = False
    top_k: int = Field(10, ge=1, le=100)
    read_features: list[tuple[int, int, int]] | None = Field(None, max_length=1000)
    max_new_tokens: int = Field(20, ge=0, le=256)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_input(self) -> "InterventionRequest":
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompt' or 'tokens'")
        return self


class JobState:
    def __init__(self, key: str, prompt: str = ""):
        self.id = uuid.uuid4().hex
        self.key = key
        self.prompt = prompt
        self.status: Literal["queued", "running", "done", "failed", "cancelled"] = "queued"
        self.progress: dict | None = None
        self.error: str | None = None
        self.busy = False  # failed because the engine queue was full
        self.data: bytes | None = None  # the result, kept until the job is forgotten
        self.done = asyncio.Event()
        self.changed = asyncio.Condition()
        self.task: asyncio.Task | None = None
        self.created = time.time()

    def view(self) -> dict:
        return {"job_id": self.id, "graph_id": self.key if self.status == "done" else None, "status": self.status,
                "progress": self.progress, "error": self.error}

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


# ----- ingress ----------------------------------------------------------------------------------

app = FastAPI(title="attribute-ray", version=__version__,
              description="Attribution graphs (circuit tracing) for transcoders, served with Ray Serve.")


def _auth(request: Request) -> None:
    token = request.app.state.api_token
    if token and request.headers.get("authorization", "") != f"Bearer {token}":
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def _wants_msgpack(request: Request) -> bool:
    return MSGPACK in request.headers.get("accept", "")


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(self, engine: DeploymentHandle, args: AppArgs):
        self.engine = engine
        self.args = args
        self.store = GraphStore(args.graph_store, args.graph_store_max_bytes)
        self.tokenizer = load_tokenizer(args.model)
        self.jobs: dict[str, JobState] = {}
        self.by_key: dict[str, JobState] = {}
        self.recent: list[dict] = []  # graphs computed or served by this ingress, oldest first
        self.capacity = args.max_queued_requests + args.max_ongoing_requests * (
            args.autoscaling.max_replicas if args.autoscaling else args.num_replicas)
        self._info: dict | None = None
        app.state.api_token = args.api_token

    async def _engine_info(self) -> dict:
        if self._info is None:
            self._info = await self.engine.info.remote()
        return self._info

    # --- web UI (static files, no build step) ---
    @app.get("/", include_in_schema=False)
    async def ui_index(self) -> Response:
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/ui/{path:path}", include_in_schema=False)
    async def ui_file(self, path: str) -> Response:
        target = (UI_DIR / path).resolve()
        if UI_DIR.resolve() not in target.parents or not target.is_file():
            raise HTTPException(404, f"no UI file {path!r}")
        return FileResponse(target)

    # --- health and metadata ---
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict:
        try:
            await asyncio.wait_for(self._engine_info(), timeout=10)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(503, f"engine not ready: {type(e).__name__}") from e
        return {"status": "ready"}

    @app.get("/v1/models", dependencies=[Depends(_auth)])
    async def models(self) -> dict:
        info = await self._engine_info()
        return {**info, "limits": {"max_prompt_tokens": self.args.max_prompt_tokens,
                                   "max_queued_requests": self.args.max_queued_requests,
                                   "max_body_bytes": self.args.max_body_bytes},
                "defaults": self.args.defaults.model_dump()}

    # --- graphs ---
    async def _parse(self, request: Request, model: type[BaseModel] = GraphRequest) -> Any:
        body = await request.body()
        if len(body) > self.args.max_body_bytes:
            raise HTTPException(413, f"request body of {len(body)} bytes exceeds {self.args.max_body_bytes}")
        try:
            raw = msgpack.unpackb(body, raw=False) if MSGPACK in request.headers.get("content-type", "") else json.loads(body or b"null")
        except Exception as e:  # noqa: BLE001 - any decode failure is the client's
            raise HTTPException(400, f"malformed request body: {type(e).__name__}: {e}") from e
        if not isinstance(raw, dict):
            raise HTTPException(422, "request body must be an object")
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            raise HTTPException(422, json.loads(e.json(include_url=False))) from e

    async def _tokens(self, prompt: str | None, tokens: list[int] | None) -> list[int]:
        """Validated prompt tokens (BOS prepended as the library does); 422 naming the problem."""
        try:
            ids = tokenize(self.tokenizer, prompt if prompt is not None else tokens).tolist()
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        if len(ids) > self.args.max_prompt_tokens:
            raise HTTPException(422, f"prompt is {len(ids)} tokens; the limit is {self.args.max_prompt_tokens}")
        vocab = (await self._engine_info())["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise HTTPException(422, f"token ids {bad[:10]} are outside the vocabulary [0, {vocab})")
        return ids

    async def _prepare(self, req: GraphRequest) -> tuple[str, list[int], dict]:
        tokens = await self._tokens(req.prompt, req.tokens)
        vocab = (await self._engine_info())["vocab_size"]
        if req.targets and isinstance(req.targets[0], str):
            for t in req.targets:
                ids = self.tokenizer.encode(t, add_special_tokens=False)
                if len(ids) != 1:
                    raise HTTPException(422, f"target {t!r} is {len(ids)} tokens; each target must be exactly one token")
        elif req.targets:
            bad = [t for t in req.targets if not 0 <= t < vocab]
            if bad:
                raise HTTPException(422, f"target token ids {bad[:10]} are outside the vocabulary [0, {vocab})")
        d = self.args.defaults
        settings = AttributionSettings(**{f: getattr(req, f) if getattr(req, f) is not None else getattr(d, f)
                                          for f in ("max_n_logits", "desired_logit_prob", "batch_size")},
                                       max_feature_nodes=req.max_feature_nodes if req.max_feature_nodes is not None
                                       else d.max_feature_nodes).model_dump(exclude={"memory_budget_mb"})
        key = graph_key(self.args.model, self.args.transcoder, tokens, {**settings, "targets": req.targets})
        return key, tokens, settings

    def _submit(self, key: str, tokens: list[int], settings: dict, targets: list | None, prompt: str = "") -> JobState:
        """The running job for `key`, or a new one; 503 when the queue is full."""
        job = self.by_key.get(key)
        if job is not None and job.status in ("queued", "running"):
            return job
        active = sum(j.status in ("queued", "running") for j in self.by_key.values())
        if active >= self.capacity:
            raise HTTPException(503, f"{active} graphs queued or running; retry later", headers={"Retry-After": "2"})
        job = JobState(key, prompt)
        self.jobs[job.id] = self.by_key[key] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, tokens, settings, targets))
        self._forget_old_jobs()
        return job

    async def _run(self, job: JobState, tokens: list[int], settings: dict, targets: list | None) -> None:
        stream = self.engine.options(stream=True).run.remote(tokens, settings, targets)
        try:
            async for event in stream:
                if event["event"] == "progress":
                    job.status, job.progress = "running", {k: event[k] for k in ("phase", "done", "total")}
                    await job.notify()
                else:
                    job.data = event["data"]
                    await asyncio.to_thread(self.store.put, job.key, job.data)
            job.status = "done"
            self._remember(job.key, job.prompt)
        except asyncio.CancelledError:
            stream.cancel()
            job.status = "cancelled"
        except Exception as e:  # noqa: BLE001 - reported through the job
            job.busy = type(e).__name__ == "BackPressureError"
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            log.warning("graph job %s failed: %s", job.id, job.error)
        finally:
            job.done.set()
            await job.notify()

    def _remember(self, key: str, prompt: str) -> None:
        self.recent = [g for g in self.recent if g["graph_id"] != key][-499:]
        self.recent.append({"graph_id": key, "prompt": prompt, "created": time.time()})

    def _forget_old_jobs(self, keep: int = 1000) -> None:
        finished = [j for j in self.jobs.values() if j.done.is_set()]
        for job in sorted(finished, key=lambda j: j.created)[: max(0, len(self.jobs) - keep)]:
            self.jobs.pop(job.id, None)
            if self.by_key.get(job.key) is job:
                self.by_key.pop(job.key)

    async def _respond(self, request: Request, key: str, node_threshold: float | None = None,
                       edge_threshold: float | None = None, slug: str | None = None, pruned: bool = False,
                       data: bytes | None = None) -> Response:
        data = data or await asyncio.to_thread(self.store.get, key)
        if data is None:
            raise HTTPException(404, f"graph {key} is not in the store")
        headers = {"X-Graph-Id": key}
        d = self.args.defaults
        nt = d.node_threshold if node_threshold is None else node_threshold
        et = d.edge_threshold if edge_threshold is None else edge_threshold
        if _wants_msgpack(request):
            if pruned:
                data = await asyncio.to_thread(lambda: Graph.from_msgpack(data).pruned(nt, et).to_msgpack())
            return Response(data, media_type=MSGPACK, headers=headers)
        graph_json = await asyncio.to_thread(
            lambda: Graph.from_msgpack(data).to_neuronpedia_json(
                slug or key[:16], node_threshold=nt, edge_threshold=et, scan=self.args.transcoder,
                feature_json_base_url=self.args.feature_json_base_url))
        return JSONResponse(graph_json, headers=headers)

    async def _finished(self, job: JobState) -> None:
        if job.status == "failed":
            if job.busy:
                raise HTTPException(503, "the attribution engine queue is full; retry later", headers={"Retry-After": "2"})
            raise HTTPException(500, f"attribution failed: {job.error}")
        if job.status == "cancelled":
            raise HTTPException(409, "the job was cancelled")

    @app.post("/v1/graphs", dependencies=[Depends(_auth)])
    async def create_graph(self, request: Request, wait: bool = True) -> Response:
        req = await self._parse(request)
        key, tokens, settings = await self._prepare(req)
        if key in self.store:
            self._remember(key, self.tokenizer.decode(tokens))
            if not wait:
                return JSONResponse({"job_id": None, "graph_id": key, "status": "done", "progress": None, "error": None}, 202)
            return await self._respond(request, key, req.node_threshold, req.edge_threshold, req.slug, req.pruned)
        job = self._submit(key, tokens, settings, req.targets, self.tokenizer.decode(tokens))
        if not wait:
            return JSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
        await asyncio.shield(job.done.wait())
        await self._finished(job)
        return await self._respond(request, key, req.node_threshold, req.edge_threshold, req.slug, req.pruned, job.data)

    @app.post("/v1/graphs/stream", dependencies=[Depends(_auth)])
    async def stream_graph(self, request: Request) -> StreamingResponse:
        """NDJSON: {"event": "queued"|"progress"|"done"|"failed"|"cancelled", ...}; "done" carries graph_id."""
        req = await self._parse(request)
        key, tokens, settings = await self._prepare(req)
        job = None if key in self.store else self._submit(key, tokens, settings, req.targets, self.tokenizer.decode(tokens))

        async def events():
            if job is None:
                yield json.dumps({"event": "done", "graph_id": key, "cached": True}) + "\n"
                return
            yield json.dumps({"event": "queued", "job_id": job.id}) + "\n"
            last = None
            while True:
                async with job.changed:
                    if not job.done.is_set() and job.progress == last:
                        await job.changed.wait()
                if job.progress != last and job.progress is not None:
                    last = dict(job.progress)
                    yield json.dumps({"event": "progress", **last}) + "\n"
                if job.done.is_set():
                    break
            end = {"event": job.status, "job_id": job.id}
            end.update({"graph_id": key} if job.status == "done" else {"error": job.error})
            yield json.dumps(end) + "\n"

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.get("/v1/graphs", dependencies=[Depends(_auth)])
    async def list_graphs(self, limit: int = 50) -> dict:
        """The most recent graphs in the store: [{"graph_id", "prompt", "created"}], newest first."""
        if not 1 <= limit <= 1000:
            raise HTTPException(422, "limit must be in [1, 1000]")
        return {"graphs": self.recent[-limit:][::-1]}

    @app.get("/v1/graphs/{graph_id}", dependencies=[Depends(_auth)])
    async def get_graph(self, request: Request, graph_id: str, node_threshold: float | None = None,
                        edge_threshold: float | None = None, slug: str | None = None, pruned: bool = False) -> Response:
        if not KEY_RE.match(graph_id):
            raise HTTPException(404, f"no graph {graph_id!r}")
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise HTTPException(422, f"{name} must be in [0, 1]")
        return await self._respond(request, graph_id, node_threshold, edge_threshold, slug, pruned)

    # --- interventions and steering ---
    async def _intervention_call(self, request: Request, method: str) -> Response:
        req = await self._parse(request, InterventionRequest)
        tokens = await self._tokens(req.prompt, req.tokens)
        if not (req.interventions or req.supernodes) and method == "intervene":
            raise HTTPException(422, "give at least one intervention or supernode")
        try:
            result = await getattr(self.engine, method).remote(tokens, req.model_dump())
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ == "BackPressureError":
                raise HTTPException(503, "the attribution engine queue is full; retry later", headers={"Retry-After": "2"}) from e
            raise
        if "error" in result:
            raise HTTPException(422, result["error"])
        if _wants_msgpack(request):
            return Response(msgpack.packb(result, use_bin_type=True), media_type=MSGPACK)
        return JSONResponse(result)

    @app.post("/v1/interventions", dependencies=[Depends(_auth)])
    async def interventions(self, request: Request) -> Response:
        """Set / scale / add to / ablate features (or ablate/scale error nodes, or whole supernodes) at chosen
        positions; returns the top next tokens and requested feature activations before vs after."""
        return await self._intervention_call(request, "intervene")

    @app.post("/v1/steer", dependencies=[Depends(_auth)])
    async def steer(self, request: Request) -> Response:
        """Generate with the interventions applied to the prompt and/or generated tokens; plain vs steered text."""
        return await self._intervention_call(request, "steer")

    # --- feature dashboards ---
    def _feature(self, layer: int, index: int) -> dict:
        from attribute_ray import features

        if not self.args.feature_store:
            raise HTTPException(404, "this application has no feature store (AppArgs.feature_store)")
        if layer < 0 or index < 0:
            raise HTTPException(404, f"no feature {layer}/{index}")
        dashboard = features.read_feature(self.args.feature_store, layer, index)
        if dashboard is None:
            raise HTTPException(404, f"feature {index} of layer {layer} has no dashboard (never active, or no such feature)")
        return dashboard

    @app.get("/v1/features/{layer}/{index}", dependencies=[Depends(_auth)])
    async def feature(self, layer: int, index: int) -> dict:
        """A feature's dashboard (Anthropic/Neuronpedia feature JSON: examples, logits, histogram, frequency)."""
        return await asyncio.to_thread(self._feature, layer, index)

    @app.get("/v1/features/{cantor_id}.json", dependencies=[Depends(_auth)])
    async def feature_by_cantor(self, cantor_id: int) -> dict:
        """The same, at the path graph JSON's `feature_json_base_url` points frontends to."""
        from attribute_ray.neuronpedia import cantor_inverse

        return await asyncio.to_thread(self._feature, *cantor_inverse(cantor_id))

    # --- jobs ---
    def _job(self, job_id: str) -> JobState:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(_auth)])
    async def get_job(self, job_id: str) -> dict:
        return self._job(job_id).view()

    @app.delete("/v1/jobs/{job_id}", dependencies=[Depends(_auth)])
    async def cancel_job(self, job_id: str) -> dict:
        job = self._job(job_id)
        if not job.done.is_set() and job.task is not None:
            job.task.cancel()
            await job.done.wait()
        return job.view()


def app_builder(args: Any) -> serve.Application:
    """Typed builder: `args` is an `AppArgs` or a dict of its fields (from `serve run ... key=value` or a config)."""
    import ray

    args = (args if isinstance(args, AppArgs) else AppArgs.model_validate(args)).resolved()
    num_gpus = args.num_gpus
    if num_gpus is None:  # never request a GPU a CPU-only cluster cannot schedule
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    scaling: dict[str, Any] = (
        {"autoscaling_config": args.autoscaling.model_dump()} if args.autoscaling else {"num_replicas": args.num_replicas}
    )
    engine = AttributionEngine.options(
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": args.num_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        **scaling,
    ).bind(args)
    return Ingress.bind(engine, args)
