"""Surviving engine replica deaths: which errors mean "the replica died", how many engine replicas are running
now (each replica asked, not a cached first success), and `call_engine`, which re-runs a call on
a live replica.

A re-run is safe because every engine call is a pure function of its inputs (graphs are content-addressed,
`attribute_ray.store.graph_key`). A call is given up with `EngineUnavailable` (the ingress answers 503 +
Retry-After) after `attempts` replica deaths, or when no engine replica has been running for `wait_s` seconds
while the call waited.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

log = logging.getLogger("ray.serve")
T = TypeVar("T")
# ActorDiedError and ActorUnavailableError are RayActorErrors; a streaming call whose replica dies mid-stream
# raises ActorDiedError from its `async for`.
LOST = (RayActorError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError)


class EngineUnavailable(Exception):
    """No engine replica could take the call in time (the client should retry after a while)."""


def replica_lost(e: BaseException) -> bool:
    """Whether `e` says the engine replica (or its process) went away, rather than the work itself failing."""
    return isinstance(e, LOST) or (isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), LOST))


class EngineWatch:
    """How many replicas of one Serve deployment answer a health check now, at most one look per `poll_s`.

    The replicas are found by their actor names and asked directly (`check_health`, an actor call that Serve's
    per-replica request limit does not queue), because the controller notices a dead replica only at its next
    health check period and readiness must not wait for that.
    """

    def __init__(self, app_name: str, deployment: str, poll_s: float = 1.0, ping_s: float = 5.0):
        self.prefix = f"SERVE_REPLICA::{app_name}#{deployment}#" if app_name else f"SERVE_REPLICA::{deployment}#"
        self.poll_s, self.ping_s = poll_s, ping_s
        self._counts = (0, 0)
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    def _replicas(self) -> list:
        import ray

        named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(self.prefix)]
        handles = []
        for a in named:
            try:
                handles.append(ray.get_actor(a["name"], namespace=a["namespace"]))
            except ValueError:  # gone since the listing
                pass
        return handles

    async def _ping(self, replica) -> bool:
        try:
            await asyncio.wait_for(replica.check_health.remote(), self.ping_s)
            return True
        except Exception:  # noqa: BLE001 - dead, still loading, unhealthy or too slow: not running
            return False

    async def counts(self, fresh: bool = False) -> tuple[int, int]:
        """(replica processes found, replicas answering their health check): a look at most `poll_s` old, or a
        new one (`fresh`)."""
        async with self._lock:  # one look serves every caller waiting on it
            if fresh or time.monotonic() - self._at >= self.poll_s:
                replicas = await asyncio.to_thread(self._replicas)
                self._counts = (len(replicas), sum(await asyncio.gather(*map(self._ping, replicas))))
                self._at = time.monotonic()
            return self._counts

    async def running(self) -> int:
        return (await self.counts())[1]

    async def watch(self, wait_s: float) -> None:
        """Return once no engine replica has been running for `wait_s` seconds in a row (else wait forever)."""
        down_since = None
        while True:
            if await self.running() > 0:
                down_since = None
            elif down_since is None:
                down_since = time.monotonic()
            elif time.monotonic() - down_since >= wait_s:
                return
            await asyncio.sleep(self.poll_s)


async def call_engine(attempt: Callable[[], Awaitable[T]], watch: EngineWatch, *, what: str, attempts: int,
                      wait_s: float) -> T:
    """`await attempt()`, re-run after a replica death (at most `attempts` runs in all); `EngineUnavailable` when
    the attempts are spent or no engine replica has been running for `wait_s` s while an attempt waited."""
    for n in range(1, attempts + 1):
        work = asyncio.ensure_future(attempt())
        down = asyncio.ensure_future(watch.watch(wait_s))
        try:
            await asyncio.wait({work, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when our caller is cancelled: cancel the engine call, stop watching
            down.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise EngineUnavailable(f"no attribution engine replica has been running for {wait_s:g} s")
        try:
            return work.result()
        except Exception as e:
            if not replica_lost(e):
                raise
            log.warning("%s: engine replica lost (attempt %d of %d): %s", what, n, attempts, type(e).__name__)
    raise EngineUnavailable(f"the attribution engine replica died {attempts} times during this request")
