"""`AttributionEngine`: the deployment that keeps one `ReplacementModel` resident and does the heavy work.

Attribution, interventions and steering run in a worker thread, never on the replica's event loop. `run`
streams progress events and then the graph's msgpack bytes in `STREAM_CHUNK` pieces, so only bytes cross the
handle (docs/ray-notes.md, "Serve application structure" 4) and the ingress never holds a whole graph; a
cancelled stream stops the worker at its next batch. Every attribution is admitted by the memory model
(docs/memory.md) against the replica's budget: run as asked, trimmed, or refused before the heavy work. Whatever
way it ends, its memory goes back to the operating system.
"""

import asyncio
import threading
import time
import traceback
from collections.abc import AsyncIterator

import torch
from ray import serve

from attribute_ray.api import InterventionRequest
from attribute_ray.devices import resolve_device, resolve_dtype
from attribute_ray.explanations.store import feature_labels
from attribute_ray.memory import STREAM_CHUNK, MemoryBudget, MemoryBudgetExceeded, available_bytes, release_memory
from attribute_ray.settings import AttributionSettings
from deployments.config import AppArgs


class Cancelled(Exception):
    """Raised inside the worker thread when the request was cancelled."""


# A short health check period: the controller notices a dead replica (and starts another) only at its next check.
@serve.deployment(name="AttributionEngine", health_check_period_s=2, health_check_timeout_s=30)
class AttributionEngine:
    """Holds model + transcoder; `run` streams {"event": "progress", ...} dicts, then the graph as {"event": "data",
    "data": bytes} pieces and {"event": "result", "size": bytes, "trimmed": {...} | None}; or {"event": "refused",
    "error": why} when the request does not fit the memory budget."""

    def __init__(self, args: AppArgs):
        from attribute_ray import ReplacementModel

        torch.set_num_threads(max(1, int(args.num_cpus)))  # replicas sharing a node must not oversubscribe it
        device = resolve_device(args.device)
        self.model = ReplacementModel.from_pretrained(args.model, args.transcoder, device=device,
                                                      dtype=resolve_dtype(args.dtype, device))
        self.args = args
        self.broken: str | None = None
        self._smoke_test()
        release_memory()
        free = available_bytes()
        if device.type == "cuda":  # the trace and the backward live there, the rows in host memory: the smaller
            free = min(free, torch.cuda.mem_get_info(device)[0])
        share = args.engine_memory_bytes or int(free * args.engine_memory_fraction / args.max_ongoing_requests)
        self.memory = MemoryBudget(max_bytes=share, on_exceed=args.memory_policy)

    def _smoke_test(self) -> None:
        """The model must produce finite logits, or the replica reports itself unhealthy. (A linearised trace: its
        one-off allocations belong to the resident baseline, not to the first request's budget.)"""
        try:
            tokens = self.model.tokenize([self.model.tokenizer.all_special_ids[0], 1, 2])
            logits = self.model.trace(tokens, linearise=True).logits
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
            "model": m.name, "transcoder": tc.name, "preset": self.args.preset, "family": m.family.name,
            "n_layers": m.n_layers, "d_model": m.d_model, "vocab_size": m.model.config.vocab_size,
            "transcoder_kind": "clt" if tc.is_cross_layer else "plt", "features_per_layer": tc.n_features(0),
            "skip": tc.has_skip, "activation": tc.activation.kind, "hookpoints": [tc.hookpoints.input, tc.hookpoints.output],
            "device": str(m.device), "dtype": str(tc.dtype).removeprefix("torch."),
            "memory_budget_bytes": self.memory.max_bytes, "memory_policy": self.memory.on_exceed,
        }

    @staticmethod
    def _interventions(req: InterventionRequest) -> list:
        from attribute_ray.interventions import Intervention, Supernode

        items = [Intervention(i.layer, i.feature, i.op, i.value, i.positions) for i in req.interventions]
        for sn in req.supernodes:
            items += Supernode(sn.label, [tuple(f) for f in sn.features]).interventions(sn.op, sn.value, sn.positions)
        return items

    async def intervene(self, tokens: list[int], req: InterventionRequest) -> dict:
        """Next-token distribution and feature activations before vs after the interventions."""
        from attribute_ray.errors import InterventionError
        from attribute_ray.interventions import intervene

        def work() -> dict:
            r = intervene(self.model, tokens, self._interventions(req), freeze_attention=req.freeze_attention,
                          constrained_layers=req.constrained_layers, direct_only=req.direct_only,
                          top_k=req.top_k, read_features=[tuple(f) for f in req.read_features or []])
            if not (torch.isfinite(r.probs_after).all() and torch.isfinite(r.activations_after).all()):  # e.g. fp16
                raise InterventionError("the interventions drive the model's outputs to non-finite values; use "
                                        "smaller intervention values")
            top = lambda ps: [{"token_id": t.token_id, "token": t.token, "prob": t.prob} for t in ps]  # noqa: E731
            return {"tokens": r.tokens.tolist(), "top_before": top(r.top_before), "top_after": top(r.top_after),
                    "read_features": [list(f) for f in r.read_features], "warnings": r.warnings,
                    "activations_before": r.activations_before.tolist(), "activations_after": r.activations_after.tolist()}

        try:
            return await asyncio.to_thread(work)
        except InterventionError as e:
            return {"error": str(e)}

    async def steer(self, tokens: list[int], req: InterventionRequest) -> dict:
        """Generated continuation with and without the interventions (KV-cached generation)."""
        from attribute_ray.errors import InterventionError
        from attribute_ray.interventions import generate_with_interventions, intervention_warnings

        def work() -> dict:
            kw = dict(max_new_tokens=req.max_new_tokens, temperature=req.temperature, seed=req.seed)
            items = self._interventions(req)
            plain, plain_ids = generate_with_interventions(self.model, tokens, [], **kw)
            steered, steered_ids = generate_with_interventions(self.model, tokens, items, **kw)
            return {"tokens": tokens, "plain": plain, "plain_ids": plain_ids, "steered": steered, "steered_ids": steered_ids,
                    "warnings": intervention_warnings(self.model, tokens, items)}

        try:
            return await asyncio.to_thread(work)
        except InterventionError as e:
            return {"error": str(e)}

    async def run(self, tokens: list[int], settings: AttributionSettings, targets: list | None) -> AsyncIterator[dict]:
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

        def compute() -> tuple[bytes, dict | None]:
            from attribute_ray.attribution import attribute

            graph = attribute(torch.tensor(tokens), self.model, targets=targets, settings=settings, memory=self.memory,
                              on_progress=on_progress)
            if self.args.feature_store:
                graph.label_features(feature_labels(self.args.feature_store))
            return graph.to_msgpack(), graph.settings.get("trimmed")

        def work() -> tuple[bytes, dict | None]:
            try:
                return compute()
            except BaseException as e:
                traceback.clear_frames(e.__traceback__)  # the frames' tensors (trace, rows) must not outlive the call
                raise
            finally:
                release_memory()

        task = loop.run_in_executor(None, work)
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            data, trimmed = await task
        except MemoryBudgetExceeded as e:
            yield {"event": "refused", "error": str(e)}
            return
        except BaseException:
            cancel.set()  # client went away or the request was cancelled: stop the worker at its next batch
            raise
        try:
            for i in range(0, len(data), STREAM_CHUNK):
                yield {"event": "data", "data": data[i : i + STREAM_CHUNK]}
            yield {"event": "result", "size": len(data), "trimmed": trimmed}
        finally:
            del data
            release_memory()
