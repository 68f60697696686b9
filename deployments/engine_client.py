"""`EngineClient`: how the ingress calls the `AttributionEngine` deployment, surviving replica deaths.

Every call goes through `deployments.retry.call_engine` (re-run on a live replica, bounded attempts), so a
replica that dies under a request costs the client time, not the request. What the ingress then sees:
`EngineBusy` (the engine's queue is full, or no replica is running / they keep dying: 503 + Retry-After),
`Refused` (over the engine's memory budget: 413), `InternalError` (anything else: a 500 with an error id), or
the result.
"""

import asyncio
from collections.abc import Callable
from contextlib import ExitStack

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from attribute_ray.api import InterventionRequest
from attribute_ray.settings import AttributionSettings
from attribute_ray.store import GraphStore
from deployments.failures import EngineBusy, Refused, public_failure
from deployments.retry import EngineUnavailable, EngineWatch, call_engine


class EngineClient:
    def __init__(self, handle: DeploymentHandle, attempts: int, wait_s: float, scales_to_zero: bool = False,
                 expected: int = 1):
        self.handle = handle
        self.expected = expected  # engine replicas the application asks for (autoscaling: its minimum)
        self.running = 0  # replicas running at the last `readiness` check
        self.scales_to_zero = scales_to_zero  # autoscaling min_replicas 0: no replica at all is a ready state
        self.attempts = attempts  # runs of one call, in all, when replicas die under it
        self.wait_s = wait_s  # how long a call waits while no engine replica is running
        self.watch = EngineWatch(handle.app_name, handle.deployment_name)
        self._info: dict | None = None
        self._fetching: asyncio.Future | None = None

    async def _call(self, what: str, attempt: Callable) -> object:
        try:
            return await call_engine(attempt, self.watch, what=what, attempts=self.attempts, wait_s=self.wait_s)
        except EngineUnavailable as e:
            raise EngineBusy(str(e)) from e
        except BackPressureError as e:  # the engine's own queue (max_queued_requests) is full
            raise EngineBusy("the attribution engine queue is full; retry later") from e
        except Refused:
            raise
        except Exception as e:  # noqa: BLE001 - the client gets an error id, the log the details
            raise public_failure(what, e) from e

    def started(self) -> bool:
        """True once an engine replica has answered; the first call starts fetching its info in the background."""
        if self._info is None and self._fetching is None:
            self._fetching = asyncio.ensure_future(self.info())
            self._fetching.add_done_callback(lambda f: setattr(self, "_fetching", None) if f.exception() else None)
        return self._info is not None

    async def info(self) -> dict:
        """The engine's description (model, sizes); static for an application, so fetched once."""
        if self._info is None:
            async def once() -> dict:
                return await self.handle.info.remote()

            self._info = await self._call("engine info", once)
        return self._info

    async def readiness(self, timeout_s: float = 10) -> str | None:
        """None when an engine replica is running now (each replica asked at every call), else why not."""
        try:
            found, running = await asyncio.wait_for(self.watch.counts(fresh=True), timeout_s)
            self.running = running
            if running == 0 and not (found == 0 and self.scales_to_zero):  # a request would start one
                return f"no attribution engine replica is running ({found} starting or unresponsive)"
            if running:
                await asyncio.wait_for(self.info(), timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure means not ready; the reason names only its kind
            return f"engine not ready: {type(e).__name__}"
        return None

    async def graph(self, tokens: list[int], settings: AttributionSettings, targets: list | None,
                    report: Callable[[dict], None], store: GraphStore, key: str) -> dict:
        """Compute the graph and write it into `store` under `key` as its pieces arrive (never whole in memory
        here); `report({"phase", "done", "total"})` at each progress event (a re-run starts its progress over).
        Returns the engine's result event: {"size": bytes, "trimmed": {...} | None}."""

        async def once() -> dict:
            stream = self.handle.options(stream=True).run.remote(tokens, settings, targets)
            result, f = None, None
            try:
                with ExitStack() as writing:  # a failed or cancelled attempt leaves nothing behind
                    async for event in stream:
                        if event["event"] == "progress":
                            report({k: event[k] for k in ("phase", "done", "total")})
                        elif event["event"] == "data":
                            # opened at the first piece, not while computing: a temp file older than the store's
                            # stale limit would be taken for a dead write
                            f = f or writing.enter_context(store.writer(key))
                            await asyncio.to_thread(f.write, event["data"])
                        elif event["event"] == "refused":
                            raise Refused(event["error"])
                        else:
                            result = event
                    if result is None or f is None:
                        raise RuntimeError("the engine's stream ended without a graph")
            except asyncio.CancelledError:
                stream.cancel()
                raise
            return result

        return await self._call("attribution", once)

    async def call(self, method: str, tokens: list[int], req: InterventionRequest) -> dict:
        """`intervene` or `steer` on a live replica."""

        async def once() -> dict:
            return await getattr(self.handle, method).remote(tokens, req)

        return await self._call(method, once)
