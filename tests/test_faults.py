"""Replica deaths (tiny model, lean local Ray): the engine replica's process killed under load, readiness while no
engine runs, and the ingress's process killed with jobs in the table; plus `call_engine`'s retry rules without
Ray. Recovery times are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytestmark = pytest.mark.timeout(600)
APP = "faults"
CLIENT_DEADLINE_S = 240  # a client gives up (the test fails) after this long


def tokens_for(i: int, n: int = 24) -> list[int]:
    """A distinct prompt per client (token ids of the tiny model's vocabulary)."""
    return [0] + [4 + (i * 11 + j * 7) % 60 for j in range(n - 1)]


@pytest.fixture(scope="module")
def service(dirs, serve_url, tmp_path_factory):
    """(base url, graph store dir) of one app: ingress + one engine replica."""
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    store = tmp_path_factory.mktemp("store")
    args = AppArgs(model=str(dirs[0]), transcoder=str(dirs[1]), num_gpus=0, num_cpus=0.5, max_queued_requests=16,
                   max_prompt_tokens=64, graph_store=str(store), engine_wait_s=120)
    serve.run(app_builder(args), name=APP, route_prefix="/")
    return serve_url, store


@pytest.fixture(scope="module")
def local(dirs):
    from attribute_ray import ReplacementModel

    return ReplacementModel.from_pretrained(str(dirs[0]), str(dirs[1]))


def replica(deployment: str):
    """(actor handle, process id) of the one live replica of `deployment` in this module's app (a Ray worker we
    started)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    for _ in range(300):
        named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        if len(named) == 1:
            actor = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
            try:
                return actor, ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
            except ray.exceptions.RayActorError:
                pass  # a replica on its way out; ask again
        time.sleep(0.1)
    raise AssertionError(f"no single live {deployment} replica")


def post_graph(url: str, body: dict, deadline_s: float = CLIENT_DEADLINE_S, on_busy=lambda r: None) -> httpx.Response:
    """POST /v1/graphs, retrying 503 + Retry-After (and connection errors) until the deadline: a plain client;
    `on_busy(response)` sees each 503."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            r = httpx.post(f"{url}/v1/graphs", json=body, headers={"accept": "application/msgpack"}, timeout=deadline_s)
            if r.status_code != 503 or time.monotonic() > end:
                return r
            on_busy(r)
            time.sleep(float(r.headers["retry-after"]))
        except httpx.TransportError:
            if time.monotonic() > end:
                raise
            time.sleep(1)


def wait_ready(url: str, deadline_s: float = 180) -> list[tuple[float, int, str]]:
    """Poll /readyz until 200; every (time, status, detail) seen."""
    seen, end = [], time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            r = httpx.get(f"{url}/readyz", timeout=30)
            seen.append((time.monotonic(), r.status_code, r.json().get("detail", "")))
            if r.status_code == 200:
                return seen
        except httpx.TransportError as e:
            seen.append((time.monotonic(), 0, type(e).__name__))
        time.sleep(0.2)
    raise AssertionError(f"/readyz never answered 200: {seen[-5:]}")


def same_graph(data: bytes, tokens: list[int], local, batch_size: int = 2) -> None:
    from attribute_ray import Graph, attribute

    served, expected = Graph.from_msgpack(data), attribute(torch.tensor(tokens), local, batch_size=batch_size)
    assert torch.equal(served.active_features, expected.active_features)
    assert torch.equal(served.selected_features, expected.selected_features)
    torch.testing.assert_close(served.rows, expected.rows, atol=1e-5, rtol=1e-4)


def test_readiness_follows_the_engine_replica(service) -> None:
    url, _ = service
    wait_ready(url)
    killed = time.monotonic()
    os.kill(replica("AttributionEngine")[1], signal.SIGKILL)
    seen = []
    while not seen or seen[-1][1] != 503:  # (the first look may come before Ray has noticed the death)
        r = httpx.get(f"{url}/readyz", timeout=30)
        seen.append((time.monotonic(), r.status_code, r.json().get("detail", "")))
        assert time.monotonic() - killed < 60, f"/readyz stayed 200 with no engine process: {seen}"
        time.sleep(0.05)
    seen += wait_ready(url)
    down = [(t, detail) for t, status, detail in seen if status == 503]
    assert all("engine" in detail for _, detail in down)
    print(f"\n/readyz after the engine kill: first 503 after {down[0][0] - killed:.1f} s ({down[0][1]!r}), "
          f"200 again after {seen[-1][0] - killed:.1f} s")
    assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 200


def test_engine_killed_under_load_every_client_gets_its_graph(service, local) -> None:
    url, _ = service
    wait_ready(url)
    import ray

    engine, pid = replica("AttributionEngine")
    finished: list[float] = []
    busy_answers = []  # 503s the clients saw: none, when the ingress re-runs the lost work itself

    def client(i: int) -> tuple[int, bytes]:
        r = post_graph(url, {"tokens": tokens_for(i), "batch_size": 2}, on_busy=busy_answers.append)
        finished.append(time.monotonic())
        return r.status_code, r.content

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        while ray.get(engine.get_num_ongoing_requests.remote(), timeout=30) == 0:  # until the engine works on one
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)  # one graph is being computed, the others wait behind it
        killed, done_before = time.monotonic(), len(finished)
        results = [f.result(timeout=CLIENT_DEADLINE_S + 60) for f in futures]
    assert done_before < 8, "every graph was done before the kill"
    for i, (status, content) in enumerate(results):
        assert status == 200, (status, content[:300])
        same_graph(content, tokens_for(i), local)
    assert busy_answers == []
    after = sorted(t - killed for t in finished if t >= killed)
    print(f"\nengine killed with {8 - done_before} of 8 graphs unfinished; the first of them arrived "
          f"{after[0]:.1f} s after the kill, the last {after[-1]:.1f} s")
    assert replica("AttributionEngine")[1] != pid


def test_jobs_survive_an_ingress_kill(service, local) -> None:
    url, store = service
    wait_ready(url)
    job_ids = {}
    for i in range(8, 14):
        r = httpx.post(f"{url}/v1/graphs", params={"wait": "false"}, json={"tokens": tokens_for(i, 40), "batch_size": 1},
                       timeout=60)
        assert r.status_code == 202, r.text
        job_ids[i] = r.json()["job_id"]
    os.kill(replica("Ingress")[1], signal.SIGKILL)
    killed = time.monotonic()
    records = [(store / "jobs" / f"{j}.json").read_text() for j in job_ids.values()]
    assert any('"status":"queued"' in rec for rec in records), "every job ended before the kill"
    views = {}
    for i, job_id in job_ids.items():
        end = time.monotonic() + CLIENT_DEADLINE_S
        while time.monotonic() < end:
            try:
                r = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30)
                if r.status_code == 200 and r.json()["status"] not in ("queued", "running"):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        views[i] = r.json()
        assert r.status_code == 200 and views[i]["status"] == "done", views[i]
    print(f"\ningress killed with jobs unfinished; all {len(job_ids)} done {time.monotonic() - killed:.1f} s after")
    for i, view in views.items():
        g = httpx.get(f"{url}/v1/graphs/{view['graph_id']}", headers={"accept": "application/msgpack"}, timeout=60)
        assert view["job_id"] == job_ids[i] and g.status_code == 200
        same_graph(g.content, tokens_for(i, 40), local, batch_size=1)
    gone = httpx.get(f"{url}/v1/jobs/{'0' * 32}", timeout=30)
    assert gone.status_code == 404 and "submit the graph request again" in gone.json()["detail"]


# --- call_engine's rules, without Ray ---

class FakeWatch:
    """Scripted replica counts: `running` replicas now."""

    def __init__(self, running: int):
        self.count = running

    async def running(self) -> int:
        return self.count

    async def watch(self, wait_s: float) -> None:
        from deployments.retry import EngineWatch

        await EngineWatch.watch(self, wait_s)  # the real loop over the scripted counts

    poll_s = 0.01


def test_call_engine_reruns_after_replica_deaths_then_gives_up() -> None:
    from ray.exceptions import ActorDiedError, RayTaskError

    from deployments.retry import EngineUnavailable, call_engine

    runs = []

    async def dies_twice() -> str:
        runs.append(1)
        if len(runs) <= 2:
            raise ActorDiedError()
        return "graph"

    async def main() -> None:
        assert await call_engine(dies_twice, FakeWatch(1), what="t", attempts=3, wait_s=5) == "graph"
        assert len(runs) == 3
        runs.clear()
        with pytest.raises(EngineUnavailable, match="died 2 times"):
            await call_engine(dies_twice, FakeWatch(1), what="t", attempts=2, wait_s=5)
        assert len(runs) == 2

        async def bad_input() -> str:
            runs.append(1)
            raise RayTaskError("f", "tb", ValueError("bad"))  # the work failed, the replica is fine: no re-run

        runs.clear()
        with pytest.raises(RayTaskError):
            await call_engine(bad_input, FakeWatch(1), what="t", attempts=3, wait_s=5)
        assert len(runs) == 1

    asyncio.run(asyncio.wait_for(main(), 30))


def test_call_engine_answers_unavailable_when_no_replica_runs_in_time() -> None:
    from deployments.retry import EngineUnavailable, call_engine

    cancelled = []

    async def waits_for_a_replica() -> str:
        try:
            await asyncio.sleep(3600)  # what a handle call does while no replica exists
        except asyncio.CancelledError:
            cancelled.append(1)
            raise
        return "never"

    async def main() -> None:
        watch = FakeWatch(0)
        with pytest.raises(EngineUnavailable, match="no attribution engine replica has been running for 0.2 s"):
            await call_engine(waits_for_a_replica, watch, what="t", attempts=3, wait_s=0.2)
        await asyncio.sleep(0.05)
        assert cancelled == [1]  # the waiting call is withdrawn
        watch.count = 1  # a running replica (however busy) keeps the call waiting
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call_engine(waits_for_a_replica, watch, what="t", attempts=3, wait_s=0.05), 0.5)

    asyncio.run(asyncio.wait_for(main(), 30))
