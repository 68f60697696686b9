"""`Ingress`: the HTTP front of the service (FastAPI inside Ray Serve), one replica, no heavy work.

It validates requests (`attribute_ray.api`), owns the job table (hence one replica; jobs are also kept in a
`JobStore` beside the graph store, so a restarted ingress finds them), calls the engine through `EngineClient`
(a request whose engine replica dies is re-run on a live one), answers 503 + Retry-After when the queue is full
or no engine replica is running, keeps results in the content-addressed `GraphStore` and picks msgpack or JSON from
`Accept`. Graphs are written to the store as the engine streams them and answered from it, so the ingress never
holds a whole graph unless a client asks for JSON or a pruned view (docs/memory.md). Its FastAPI app is built
per replica by `__serve_build_asgi_app__` (the late-bound form of `@serve.ingress()`), so the route table and
the bearer-token check come from this instance's `AppArgs`.
No `from __future__ import annotations` here: FastAPI would misread the route signatures (docs/ray-notes.md #1).
"""

import asyncio
import hmac
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from attribute_ray import __version__
from attribute_ray.api import GraphRequest, InterventionRequest, JobView, StreamEvent
from attribute_ray.explanations.store import labels_version
from attribute_ray.features.storage import read_feature
from attribute_ray.loading import load_tokenizer
from attribute_ray.presets import display_name
from attribute_ray.settings import AttributionSettings, GraphSettings, PruneSettings
from attribute_ray.store import KEY_RE, GraphStore, graph_key
from deployments.checks import cantor_address, check_targets, feature_address, graph_view, prompt_tokens, ui_path
from deployments.config import AppArgs
from deployments.docs_page import documented_app, request_body
from deployments.encoding import graph_response, parse_body, result_response, stored_graph_response, wants_msgpack
from deployments.engine_client import EngineClient
from deployments.failures import RETRY_AFTER, EngineBusy, InternalError, handle_unexpected
from deployments.job_store import JobRecord, JobStore
from deployments.job_table import Job, JobTable, TableFull
from deployments.limits import Gate, install_limits

UI_DIR = Path(__file__).parent / "ui"


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    def __init__(self, engine: DeploymentHandle, args: AppArgs):
        self.engine = EngineClient(engine, attempts=args.engine_attempts, wait_s=args.engine_wait_s,
                                   scales_to_zero=bool(args.autoscaling and args.autoscaling.min_replicas == 0),
                                   expected=args.autoscaling.min_replicas if args.autoscaling else args.num_replicas)
        self.args = args
        self.store = GraphStore(args.graph_store, args.graph_store_max_bytes)
        self.tokenizer = load_tokenizer(args.model)
        self.names = (display_name(args.model), display_name(args.transcoder))  # what clients see, never paths
        self.gate = Gate()  # closed by `drain` when the service stops
        self.jobs = JobTable(capacity=args.max_queued_requests + args.max_ongoing_requests * (
            args.autoscaling.max_replicas if args.autoscaling else args.num_replicas),
            store=JobStore(args.job_store or f"{args.graph_store.rstrip('/')}/jobs"))

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The routes, bound to this replica; `auth` ones need the bearer token when `AppArgs.api_token` is set."""
        app = documented_app((GraphRequest, InterventionRequest), title="attribute-ray", version=__version__,
                             description="Attribution graphs (circuit tracing) for transcoders, served with Ray Serve.")
        handle_unexpected(app)  # anything unexpected: 500 with an error id, details only in the log
        install_limits(app, max_body_bytes=self.args.max_body_bytes, cors_origins=self.args.cors_origins, gate=self.gate)
        auth = [Depends(self._authorize)]
        app.get("/", include_in_schema=False)(self.ui_index)
        app.get("/ui/{path:path}", include_in_schema=False)(self.ui_file)
        app.get("/healthz")(self.healthz)
        app.get("/readyz")(self.readyz)
        app.get("/v1/models", dependencies=auth)(self.models)
        graph_body, intervention_body = request_body(GraphRequest), request_body(InterventionRequest)
        app.post("/v1/graphs", dependencies=auth, openapi_extra=graph_body)(self.create_graph)
        app.post("/v1/graphs/stream", dependencies=auth, openapi_extra=graph_body)(self.stream_graph)
        app.get("/v1/graphs", dependencies=auth)(self.list_graphs)
        app.get("/v1/graphs/{graph_id}", dependencies=auth)(self.get_graph)
        app.post("/v1/interventions", dependencies=auth, openapi_extra=intervention_body)(self.interventions)
        app.post("/v1/steer", dependencies=auth, openapi_extra=intervention_body)(self.steer)
        app.get("/v1/features/{layer}/{index}", dependencies=auth)(self.feature)
        app.get("/v1/features/{cantor_id}.json", dependencies=auth)(self.feature_by_cantor)
        app.get("/v1/jobs/{job_id}", dependencies=auth)(self.get_job)
        app.delete("/v1/jobs/{job_id}", dependencies=auth)(self.cancel_job)
        return app

    def _authorize(self, request: Request) -> None:
        token = self.args.api_token
        given = request.headers.get("authorization", "").encode()
        if token and not hmac.compare_digest(given, f"Bearer {token}".encode()):  # constant time
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    # --- web UI (static files, no build step) ---
    async def ui_index(self) -> Response:
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def ui_file(self, path: str) -> Response:
        return FileResponse(ui_path(UI_DIR, path), headers={"Cache-Control": "no-cache"})  # modules of one version

    # --- health and metadata ---
    async def drain(self, timeout_s: float) -> int:
        """Stop letting requests in (503) and wait up to `timeout_s` for those in flight; how many are left."""
        return await self.gate.close(timeout_s)

    async def healthz(self) -> dict:
        """Liveness: answers as soon as the HTTP path works; "starting" until an engine replica has answered."""
        return {"status": "ok" if self.engine.started() else "starting"}

    async def readyz(self) -> dict:
        """200 while an engine replica is running now: "ready", or "degraded" while fewer run than the application
        asks for (it still serves, so a load balancer keeps it); 503 with the reason when none runs."""
        reason = await self.engine.readiness()
        if reason:
            raise HTTPException(503, reason, headers=RETRY_AFTER)
        running, expected = self.engine.running, self.engine.expected
        return {"status": "degraded" if running < expected else "ready", "engine_replicas": running, "expected": expected}

    async def models(self) -> dict:
        info = await self.engine.info()
        return {**info, "limits": {"max_prompt_tokens": self.args.max_prompt_tokens,
                                   "max_queued_requests": self.args.max_queued_requests,
                                   "max_body_bytes": self.args.max_body_bytes},
                "defaults": self.args.defaults.model_dump()}

    # --- graphs ---
    async def _tokens(self, prompt: str | None, tokens: list[int] | None) -> list[int]:
        vocab = (await self.engine.info())["vocab_size"]
        return prompt_tokens(self.tokenizer, prompt, tokens, max_tokens=self.args.max_prompt_tokens, vocab=vocab)

    async def _prepare(self, req: GraphRequest) -> tuple[str, list[int], GraphSettings]:
        """(graph key, prompt tokens, settings) of a request; 422 for a prompt or targets the model cannot have."""
        tokens = await self._tokens(req.prompt, req.tokens)
        check_targets(self.tokenizer, req.targets, vocab=(await self.engine.info())["vocab_size"])
        settings = req.settings(self.args.defaults)
        key = graph_key(self.args.model, self.args.transcoder, tokens,  # the stored bytes carry the display names
                        {**settings.attribution().model_dump(), "targets": req.targets, "names": list(self.names),
                         "labels": labels_version(self.args.feature_store),  # a trim depends on the budget:
                         "memory": [self.args.engine_memory_bytes, self.args.engine_memory_fraction, self.args.memory_policy]})
        return key, tokens, settings

    def _submit(self, key: str, tokens: list[int], settings: AttributionSettings, targets: list | None,
                job_id: str | None = None) -> Job:
        """The running job for `key`, or a new one (kept in the job store); 503 when the queue is full."""
        request = {"tokens": tokens, "settings": settings.model_dump(), "targets": targets}
        try:
            return self.jobs.submit(key, self.tokenizer.decode(tokens), lambda job: self._compute(job, tokens, settings, targets),
                                    request=request, job_id=job_id)
        except TableFull as e:
            raise HTTPException(503, str(e), headers=RETRY_AFTER) from e

    async def _compute(self, job: Job, tokens: list[int], settings: AttributionSettings, targets: list | None) -> list[str]:
        """A job's work: the engine's graph (its progress reported into the job), written into the store as it
        arrives; the job's warnings."""
        result = await self.engine.graph(tokens, settings, targets, job.report, self.store, job.key)
        return [result["trimmed"]["reason"]] if result.get("trimmed") else []

    async def _respond(self, request: Request, key: str, prune: PruneSettings, slug: str | None = None,
                       pruned: bool = False) -> Response:
        """The stored graph as the client asked: its file streamed as is (msgpack), or decoded for JSON or a pruned
        view (the one case where the ingress holds a whole graph)."""
        if wants_msgpack(request) and not pruned:
            response = await asyncio.to_thread(stored_graph_response, self.store, key)
        else:
            data = await asyncio.to_thread(self.store.get, key)
            response = data and await asyncio.to_thread(
                graph_response, data, key, msgpack_wanted=wants_msgpack(request), prune=prune, pruned=pruned, slug=slug,
                scan=self.names[1], feature_json_base_url=self.args.feature_json_base_url)
        if response is None:
            raise HTTPException(404, f"graph {key} is not in the store")
        return response

    @staticmethod
    def _raise_unless_done(job: Job) -> None:
        if job.status == "failed":
            if job.http_status == 503:  # engine queue full, or no engine replica running in time
                raise HTTPException(503, job.error.removeprefix("EngineBusy: "), headers=RETRY_AFTER)
            raise HTTPException(job.http_status, job.error)
        if job.status == "cancelled":
            raise HTTPException(409, "the job was cancelled")

    async def create_graph(self, request: Request, wait: bool = True) -> Response:
        req = await parse_body(request, GraphRequest, self.args.max_body_bytes)
        key, tokens, settings = await self._prepare(req)
        if key in self.store:
            self.jobs.remember(key, self.tokenizer.decode(tokens))
            if not wait:
                return JSONResponse(JobView(job_id=None, graph_id=key, status="done").model_dump(), 202)
            return await self._respond(request, key, settings.pruning(), req.slug, req.pruned)
        job = self._submit(key, tokens, settings.attribution(), req.targets)
        if not wait:
            return JSONResponse(job.view().model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
        await asyncio.shield(job.done.wait())
        self._raise_unless_done(job)
        return await self._respond(request, key, settings.pruning(), req.slug, req.pruned)

    async def stream_graph(self, request: Request) -> StreamingResponse:
        """NDJSON: {"event": "queued"|"progress"|"done"|"failed"|"cancelled", ...}; "done" carries graph_id."""
        req = await parse_body(request, GraphRequest, self.args.max_body_bytes)
        key, tokens, settings = await self._prepare(req)
        job = None if key in self.store else self._submit(key, tokens, settings.attribution(), req.targets)

        async def events():
            line = lambda **fields: StreamEvent(**fields).model_dump_json(exclude_unset=True) + "\n"  # noqa: E731
            if job is None:
                yield line(event="done", graph_id=key, cached=True)
                return
            yield line(event="queued", job_id=job.id)
            async for progress in job.updates():
                yield line(event="progress", **progress)
            end = {"graph_id": key, "warnings": job.warnings} if job.status == "done" else {"error": job.error}
            yield line(event=job.status, job_id=job.id, **end)

        return StreamingResponse(events(), media_type="application/x-ndjson")

    async def list_graphs(self, limit: int = 50) -> dict:
        """The most recent graphs in the store: [{"graph_id", "prompt", "created"}], newest first."""
        if not 1 <= limit <= 1000:
            raise HTTPException(422, "limit must be in [1, 1000]")
        return {"graphs": self.jobs.recent_graphs(limit)}

    async def get_graph(self, request: Request, graph_id: str, node_threshold: float | None = None,
                        edge_threshold: float | None = None, slug: str | None = None, pruned: bool = False) -> Response:
        if not KEY_RE.match(graph_id):
            raise HTTPException(404, f"no graph {graph_id[:100]!r}")
        view = graph_view(self.args.defaults, node_threshold, edge_threshold, slug, pruned)
        return await self._respond(request, graph_id, view, view.slug, view.pruned)

    # --- interventions and steering ---
    async def _intervention_call(self, request: Request, method: str) -> Response:
        req = await parse_body(request, InterventionRequest, self.args.max_body_bytes)
        tokens = await self._tokens(req.prompt, req.tokens)
        if not (req.interventions or req.supernodes) and method == "intervene":
            raise HTTPException(422, "give at least one intervention or supernode")
        try:
            result = await self.engine.call(method, tokens, req)
        except EngineBusy as e:
            raise HTTPException(503, str(e), headers=RETRY_AFTER) from e
        except InternalError as e:
            raise HTTPException(500, str(e)) from e
        if "error" in result:
            raise HTTPException(422, result["error"])
        return result_response(request, result)

    async def interventions(self, request: Request) -> Response:
        """Set / scale / add to / ablate features (or ablate/scale error nodes, or whole supernodes) at chosen
        positions; returns the top next tokens and requested feature activations before vs after."""
        return await self._intervention_call(request, "intervene")

    async def steer(self, request: Request) -> Response:
        """Generate with the interventions applied to the prompt and/or generated tokens; plain vs steered text."""
        return await self._intervention_call(request, "steer")

    # --- feature dashboards ---
    def _feature(self, layer: int, index: int) -> dict:
        if not self.args.feature_store:
            raise HTTPException(404, "this application has no feature store (AppArgs.feature_store)")
        layer, index = feature_address(layer, index)
        dashboard = read_feature(self.args.feature_store, layer, index)
        if dashboard is None:
            raise HTTPException(404, f"feature {index} of layer {layer} has no dashboard (never active, or no such feature)")
        return {**dashboard, "transcoder_id": display_name(dashboard.get("transcoder_id", ""))}  # never a path

    async def feature(self, layer: int, index: int) -> dict:
        """A feature's dashboard (Anthropic/Neuronpedia feature JSON: examples, logits, histogram, frequency)."""
        return await asyncio.to_thread(self._feature, layer, index)

    async def feature_by_cantor(self, cantor_id: int) -> dict:
        """The same, at the path graph JSON's `feature_json_base_url` points frontends to."""
        return await asyncio.to_thread(self._feature, *cantor_address(cantor_id))

    # --- jobs ---
    async def _job(self, job_id: str) -> Job:
        """The job, from this table or else from the job store (a job of an earlier ingress: finished ones as they
        ended, unfinished ones run again under the same id); 404 saying so when it is in neither."""
        job = self.jobs.get(job_id) or await self._resume(await asyncio.to_thread(self.jobs.recorded, job_id[:64]))
        if job is None:
            raise HTTPException(404, f"no job {job_id[:64]!r}: unknown, or lost when the service restarted; "
                                "submit the graph request again")
        return job

    async def _resume(self, record: JobRecord | None) -> Job | None:
        if record is None:
            return None
        if record.status in ("queued", "running"):  # its ingress stopped before it ended
            if record.graph_id not in self.store:
                r = record.request
                return self._submit(record.graph_id, r["tokens"], AttributionSettings.model_validate(r["settings"]),
                                    r["targets"], job_id=record.job_id)
            record = record.model_copy(update={"status": "done"})  # it ended after all (or another job stored it)
        return self.jobs.restore(record)

    async def get_job(self, job_id: str) -> JobView:
        return (await self._job(job_id)).view()

    async def cancel_job(self, job_id: str) -> JobView:
        return (await self.jobs.cancel(await self._job(job_id))).view()
