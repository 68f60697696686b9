"""Client parity with the service: every documented HTTP route has a client method, sync and async with the same
signature, and each works against a real service (tiny pair); 32 concurrent clients with default settings against
a small queue lose no graph (the time-based retry budget)."""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from attribute_ray import Graph, Intervention, ReplacementModel, attribute, intervene
from attribute_ray.api import InterventionRequest, InterventionResponse, SteerResponse, StreamEvent
from attribute_ray.client import ROUTES, AsyncClient, Client, ServiceError

pytestmark = pytest.mark.timeout(600)
SMALL = dict(max_feature_nodes=32, batch_size=64)


@pytest.fixture(scope="module")
def apps(dirs, serve_url, tmp_path_factory) -> tuple[str, str]:
    """(url of an app with the defaults, url of an app with one engine replica and max_queued_requests=4)."""
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    model_dir, tc_dir = dirs
    common = dict(model=str(model_dir), transcoder=str(tc_dir), num_gpus=0, num_cpus=0.5, num_replicas=1)
    serve.run(app_builder(AppArgs(**common, graph_store=str(tmp_path_factory.mktemp("store")))), name="parity",
              route_prefix="/")
    serve.run(app_builder(AppArgs(**common, max_queued_requests=4, graph_store=str(tmp_path_factory.mktemp("busy")))),
              name="busy", route_prefix="/busy")
    return serve_url, f"{serve_url}/busy"


@pytest.fixture(scope="module")
def local(dirs) -> ReplacementModel:
    return ReplacementModel.from_pretrained(str(dirs[0]), str(dirs[1]))


def test_every_documented_route_has_a_client_method(apps) -> None:
    spec = httpx.get(f"{apps[0]}/openapi.json", timeout=60).raise_for_status().json()
    served = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert served == set(ROUTES)
    names = {name for methods in ROUTES.values() for name in methods}
    for name in names:
        sync, coro = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(coro) and not inspect.iscoroutinefunction(sync), name
        assert list(inspect.signature(sync).parameters) == list(inspect.signature(coro).parameters), name
        for a, b in zip(inspect.signature(sync).parameters.values(), inspect.signature(coro).parameters.values()):
            assert (a.kind, a.default) == (b.kind, b.default), (name, a.name)


def test_each_method_against_the_service(apps, local) -> None:
    url = apps[0]
    prompt = "the cat sat"
    with Client(url) as c:
        g = c.graph(prompt, **SMALL)
        expected = attribute(prompt, local, **SMALL)
        assert isinstance(g, Graph) and torch.equal(g.input_tokens, expected.input_tokens)
        assert torch.allclose(g.rows, expected.rows, atol=1e-5)
        assert c.graph_json(prompt, **SMALL)["metadata"]["prompt_tokens"]
        job = c.submit("the dog ran", **SMALL)
        assert torch.equal(c.wait(job).input_tokens, local.tokenize("the dog ran").cpu())
        events = list(c.stream("the red river", **SMALL))
        assert all(isinstance(e, StreamEvent) for e in events) and events[-1].event == "done"
        assert events[-1].graph_id in {r["graph_id"] for r in c.graphs(limit=10)}
        assert c.fetch(events[-1].graph_id, "json", node_threshold=0.5)["nodes"]
        if job.job_id:
            assert c.job(job.job_id).status == "done" and c.cancel(job.job_id).status == "done"

        # interventions and steering, with the library's Intervention and (layer, position, feature) reads
        node = tuple(expected.selected_nodes[0].tolist())
        ivs = [Intervention.at(node, "scale", -1.0)]
        r = c.intervene(prompt, ivs, read_features=[node], top_k=3)
        mine = intervene(local, prompt, ivs, read_features=[node], top_k=3)
        assert isinstance(r, InterventionResponse) and r.read_features == [node]
        assert [t.token_id for t in r.top_after] == [t.token_id for t in mine.top_after]
        assert r.activations_after == pytest.approx(mine.activations_after.tolist(), abs=1e-4)
        assert r.activations_after[0] == pytest.approx(-r.activations_before[0], abs=1e-4)
        s = c.steer(prompt, supernodes=[{"label": "s", "features": [[node[0], node[2]]], "op": "scale", "value": 5}],
                    max_new_tokens=4)
        assert isinstance(s, SteerResponse) and len(s.plain_ids) == len(s.steered_ids) == 4
        with pytest.raises(ServiceError) as ei:  # this app has no feature store: the route answers, with a reason
            c.feature(node[0], node[2])
        assert ei.value.status_code == 404 and "feature store" in ei.value.detail
        with pytest.raises(ServiceError) as ei:
            c.feature_by_cantor(7)
        assert ei.value.status_code == 404
        assert c.health() and c.health(ready=False) and c.models()["n_layers"] == local.n_layers
        with pytest.raises(TypeError, match="unknown intervention fields"):
            c.intervene(prompt, ivs, max_feature_nodes=3)

    async def main():
        async with AsyncClient(url) as a:
            g = await a.graph(prompt, **SMALL)
            events = [e async for e in await a.stream("the red river", **SMALL)]
            r = await a.intervene(prompt, ivs, read_features=[node], top_k=3)
            s = await a.steer(prompt, ivs, max_new_tokens=2)
            return g, events, r, s, await a.graphs(limit=5)

    g2, events2, r2, s2, recent = asyncio.run(main())
    assert torch.equal(g2.rows, g.rows) and events2[-1].graph_id == events[-1].graph_id
    assert r2 == r and isinstance(s2, SteerResponse) and recent


def test_request_bodies_are_the_shared_models() -> None:
    """What the client sends validates as the service's model, with the library Intervention's fields."""
    seen = []
    def echo(request: httpx.Request) -> httpx.Response:
        seen.append(InterventionRequest.model_validate_json(request.content))
        return httpx.Response(200, json={"tokens": [0, 1], "plain": "", "plain_ids": [], "steered": "", "steered_ids": []})

    with Client("http://x.test", transport=httpx.MockTransport(echo)) as c:
        c.steer([1, 2], [Intervention(1, 2, "add", 3.0, [-1]), {"layer": 0, "feature": None, "op": "scale", "value": 2}],
                supernodes=[{"label": "g", "features": [(1, 4)]}], max_new_tokens=3, seed=7)
    (req,) = seen
    assert [(i.layer, i.feature, i.op, i.value, i.positions) for i in req.interventions] == [
        (1, 2, "add", 3.0, [-1]), (0, None, "scale", 2.0, "all")]
    assert req.supernodes[0].features == [(1, 4)] and req.tokens == [1, 2] and (req.max_new_tokens, req.seed) == (3, 7)


def test_32_clients_default_retries_lose_nothing(apps) -> None:
    """64 distinct graphs from 32 threads, each with its own default Client, against a queue of 4: all arrive."""
    url = apps[1]
    prompts = [[5 + i % 20, 30 + i // 20, 7] for i in range(64)]  # distinct token lists: no de-duplication

    def two(k: int) -> list[Graph]:
        with Client(url) as c:  # default settings: the time-based retry budget
            return [c.graph(prompts[k], **SMALL), c.graph(prompts[k + 32], **SMALL)]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(two, range(32)))
    graphs = [g for pair in results for g in pair]
    got = sorted(g.input_tokens.tolist()[1:] for g in graphs)  # without the BOS the service prepends
    assert len(graphs) == 64 and got == sorted(prompts)
    print(f"\n32 clients, 64 graphs, max_queued_requests=4: {len(graphs)} arrived, 0 lost")
