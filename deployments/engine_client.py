"""`EngineClient`: how the ingress calls the `AttributionEngine` deployment, surviving replica deaths.

Every call goes through `deployments.retry.call_engine` (re-run on a live replica, bounded attempts), so a
replica that dies under a request costs the client time, not the request. What the ingress then sees:
`EngineBusy` (the engine's queue is full, or no replica is running / they keep dying: 503 + Retry-After),
`InternalError` (anything else: a 500 with an error id), or the result.
"""

import asyncio
from collections.abc import Callable

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from attribute_ray.api import InterventionRequest
from attribute_ray.settings import AttributionSettings
from deployments.failures import EngineBusy, public_failure
from deployments.retry import EngineUnavailable, EngineWatch, call_engine


class EngineClient:
    def __init__(self, handle: DeploymentHandle, attempts: int, wait_s: float, scales_to_zero: bool = False):
        self.handle = handle
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
            if running == 0 and not (found == 0 and self.scales_to_zero):  # a request would start one
                return f"no attribution engine replica is running ({found} starting or unresponsive)"
            if running:
                await asyncio.wait_for(self.info(), timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure means not ready; the reason names only its kind
            return f"engine not ready: {type(e).__name__}"
        return None

    async def graph(self, tokens: list[int], settings: AttributionSettings, targets: list | None,
                    report: Callable[[dict], None]) -> bytes:
        """The graph's msgpack bytes; `report({"phase", "done", "total"})` at each progress event (a re-run starts
        its progress over)."""

        async def once() -> bytes:
            stream = self.handle.options(stream=True).run.remote(tokens, settings, targets)
            data = None
            try:
                async for event in stream:
                    if event["event"] == "progress":
                        report({k: event[k] for k in ("phase", "done", "total")})
                    else:
                        data = event["data"]
            except asyncio.CancelledError:
                stream.cancel()
                raise
            if data is None:
                raise RuntimeError("the engine's stream ended without a result")
            return data

        return await self._call("attribution", once)

    async def call(self, method: str, tokens: list[int], req: InterventionRequest) -> dict:
        """`intervene` or `steer` on a live replica."""

        async def once() -> dict:
            return await getattr(self.handle, method).remote(tokens, req)

        return await self._call(method, once)
