"""The Ray Serve service end to end over HTTP, on one Ray session for the whole module (tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgpack
import pytest
import torch

from attribute_ray import Graph, ReplacementModel, attribute
from attribute_ray.neuronpedia import graph_json
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(300)
TOKEN = "s3cret-token-value"
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def service(dirs, serve_url, tmp_path_factory):
    """(base url of the open app, base url of the token-protected app)."""
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    model_dir, tc_dir = dirs
    features = _feature_store(model_dir, tc_dir, tmp_path_factory.mktemp("features"))
    common = dict(model=str(model_dir), transcoder=str(tc_dir), num_gpus=0, num_cpus=0.5, max_queued_requests=4,
                  max_prompt_tokens=MAX_TOKENS, max_body_bytes=20_000)
    serve.run(app_builder(AppArgs(**common, graph_store=str(tmp_path_factory.mktemp("store")), feature_store=str(features))),
              name="open", route_prefix="/")
    serve.run(app_builder(AppArgs(**common, graph_store=str(tmp_path_factory.mktemp("store2")), api_token=TOKEN)),
              name="secure", route_prefix="/secure")
    return serve_url, f"{serve_url}/secure"


def _feature_store(model_dir: Path, tc_dir: Path, root: Path) -> Path:
    """A real activation cache + dashboards for the tiny model (the caching job, then build_features)."""
    from jobs.build_features import build
    from jobs.cache_activations import CacheConfig, run

    corpus = root / "docs.txt"
    corpus.write_text(" ".join(["the cat sat on the red river", "where is the big blue city", "the dog ran over two"] * 40))
    cfg = CacheConfig(model=str(model_dir), transcoder=str(tc_dir), dataset=str(corpus), n_tokens=600, ctx_len=16,
                      out=str(root / "cache"), shard_windows=20, num_actors=1, build_features=False)
    run(cfg)
    build(cfg.out, top_k=5, n_bins=8)
    return root / "cache"


@pytest.fixture(scope="module")
def local(dirs) -> ReplacementModel:
    return ReplacementModel.from_pretrained(str(dirs[0]), str(dirs[1]))


def post(url: str, body, *, accept: str = "application/json", params=None, headers=None, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/graphs", json=body, params=params, timeout=120,
                      headers={"accept": accept, **(headers or {})}, **kw)


def test_results_equal_in_process_attribution(service, local) -> None:
    url, _ = service
    body = {"prompt": "the capital of france is", "max_feature_nodes": 30, "batch_size": 8}
    r = post(url, body, accept="application/msgpack")
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    served = Graph.from_msgpack(r.content)
    expected = attribute("the capital of france is", local, max_feature_nodes=30, batch_size=8)
    assert torch.equal(served.active_features, expected.active_features)
    assert torch.equal(served.selected_features, expected.selected_features)
    torch.testing.assert_close(served.rows, expected.rows, atol=1e-5, rtol=1e-4)  # other process, other threads
    j = post(url, {**body, "slug": "capital"}).json()
    want = graph_json(expected, "capital")
    assert j["metadata"]["slug"] == "capital" and j["metadata"]["prompt_tokens"] == want["metadata"]["prompt_tokens"]
    assert [n["node_id"] for n in j["nodes"]] == [n["node_id"] for n in want["nodes"]]
    assert [(l["source"], l["target"]) for l in j["links"]] == [(l["source"], l["target"]) for l in want["links"]]
    # the same graph fetched by id, and a cache hit on repeat: done at once, no job
    gid = r.headers["x-graph-id"]
    again = post(url, body, params={"wait": "false"})
    assert again.status_code == 202 and again.json() == {"job_id": None, "graph_id": gid, "status": "done",
                                                         "progress": None, "error": None, "warnings": []}
    fetched = httpx.get(f"{url}/v1/graphs/{gid}", headers={"accept": "application/msgpack"}, timeout=60)
    assert fetched.content == r.content
    small = httpx.get(f"{url}/v1/graphs/{gid}", params={"pruned": "true", "node_threshold": 0.7},
                      headers={"accept": "application/msgpack"}, timeout=60)
    want_pruned = served.pruned(0.7, 0.98)
    torch.testing.assert_close(Graph.from_msgpack(small.content).rows, want_pruned.rows, atol=0, rtol=0)


def test_async_job_lifecycle_with_progress(service) -> None:
    url, _ = service
    r = post(url, {"prompt": "the cat sat on the red river", "batch_size": 4}, params={"wait": "false"})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running") and job["graph_id"] is None
    seen = []
    deadline = time.time() + 120
    while job["status"] in ("queued", "running") and time.time() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job['job_id']}", timeout=30).json()
        if job["progress"]:
            seen.append(job["progress"]["done"])
        time.sleep(0.05)
    assert job["status"] == "done" and job["graph_id"]
    assert seen == sorted(seen)
    g = httpx.get(f"{url}/v1/graphs/{job['graph_id']}", params={"node_threshold": 0.5}, timeout=60).json()
    assert g["metadata"]["node_threshold"] == 0.5


def test_cancel_a_running_job(service) -> None:
    url, _ = service
    tokens = [0] + [4 + (i * 7) % 60 for i in range(MAX_TOKENS - 1)]
    r = post(url, {"tokens": tokens, "batch_size": 1}, params={"wait": "false"})
    job_id = r.json()["job_id"]
    for _ in range(400):  # wait until it is really running
        if httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["status"] == "running":
            break
        time.sleep(0.05)
    cancelled = httpx.delete(f"{url}/v1/jobs/{job_id}", timeout=60).json()
    assert cancelled["status"] == "cancelled" and cancelled["graph_id"] is None
    # the engine is free again soon: a fresh small graph completes
    assert post(url, {"prompt": "one two three"}).status_code == 200


def test_streaming_progress_events(service) -> None:
    url, _ = service
    with httpx.stream("POST", f"{url}/v1/graphs/stream", json={"prompt": "the big blue city", "batch_size": 4}, timeout=120) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0]["event"] == "queued" and events[-1]["event"] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    assert httpx.get(f"{url}/v1/graphs/{events[-1]['graph_id']}", timeout=60).status_code == 200


def test_auth(service) -> None:
    _, secure = service
    assert httpx.get(f"{secure}/healthz", timeout=30).status_code == 200  # health routes stay open
    assert httpx.get(f"{secure}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{secure}/v1/models", headers={"authorization": "Bearer wrong"}, timeout=30).status_code == 401
    ok = httpx.get(f"{secure}/v1/models", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["n_layers"] == 3 and TOKEN not in ok.text
    assert post(secure, {"prompt": "the cat"}).status_code == 401
    assert post(secure, {"prompt": "the cat"}, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"prompt": ""}, 422, "at least 1 character"),
        ({}, 422, "exactly one of"),
        ({"prompt": "a", "tokens": [1]}, 422, "exactly one of"),
        ({"prompt": " ".join(["the"] * (MAX_TOKENS + 5))}, 422, "the limit is 128"),
        ({"prompt": "the cat", "batch_size": 0}, 422, "greater than or equal to 1"),
        ({"prompt": "the cat", "desired_logit_prob": 1.5}, 422, "less than or equal to 1"),
        ({"prompt": "the cat", "max_n_logits": "ten"}, 422, "valid integer"),
        ({"prompt": 42}, 422, "valid string"),
        ({"prompt": "the cat", "node_threshold": -0.1}, 422, "greater than or equal to 0"),
        ({"prompt": "the cat", "colour": "red"}, 422, "Extra inputs"),
        ({"tokens": [0, 5, 999]}, 422, "outside the vocabulary"),
        ({"prompt": "the cat", "targets": ["the cat"]}, 422, "exactly one token"),
        ({"prompt": "the cat", "targets": [5000]}, 422, "outside the vocabulary"),
        ({"prompt": "the cat", "slug": "bad slug!"}, 422, "pattern"),
        ([1, 2], 422, "must be an object"),
    ],
)
def test_bad_inputs_get_4xx(service, body, status, needle) -> None:
    url, _ = service
    r = post(url, body)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_bad_bodies_ids_and_sizes(service) -> None:
    url, _ = service
    raw = lambda content, ctype: httpx.post(f"{url}/v1/graphs", content=content, headers={"content-type": ctype}, timeout=30)  # noqa: E731
    assert raw(b"{not json", "application/json").status_code == 400
    assert raw(b"\xc1\xc1\xc1", "application/msgpack").status_code == 400
    ok = raw(msgpack.packb({"prompt": "the red cat"}), "application/msgpack")
    assert ok.status_code == 200  # msgpack request bodies are accepted
    big = raw(json.dumps({"prompt": "x" * 30_000}).encode(), "application/json")
    assert big.status_code == 413 and "exceeds" in big.text
    assert httpx.get(f"{url}/v1/jobs/nope", timeout=30).status_code == 404
    assert httpx.delete(f"{url}/v1/jobs/nope", timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/graphs/{'0' * 32}", timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/graphs/..%2F..%2Fetc%2Fpasswd", timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/graphs/{'a' * 32}", params={"node_threshold": 3}, timeout=30).status_code == 422


def test_sixteen_concurrent_clients_on_one_replica(service) -> None:
    from attribute_ray.client import Client

    url, _ = service
    prompts = [f"the {w} sat on the {v}" for w in ("cat", "dog", "city", "river") for v in ("one", "two", "three", "game")]

    def one(prompt: str) -> Graph:
        with Client(url, retries=30, backoff=0.2, max_backoff=2.0) as c:
            return c.graph(prompt, batch_size=8)

    with ThreadPoolExecutor(16) as pool:
        graphs = list(pool.map(one, prompts))
    assert len({g.input_string for g in graphs}) == 16
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    # more requests than the queue admits get 503 + Retry-After (the client above retried them)
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: post(url, {"tokens": [0] + [5 + i] * 100, "batch_size": 1},
                                                  params={"wait": "false"}).status_code, range(12)))
    assert 503 in codes and 202 in codes
    busy = post(url, {"tokens": [0, 7, 7, 7, 9], "batch_size": 1}, params={"wait": "false"})
    if busy.status_code == 503:
        assert int(busy.headers["retry-after"]) > 0


def test_client_against_live_service(service, local) -> None:
    from attribute_ray.client import Client

    url, secure = service
    with Client(secure, token=TOKEN) as c:
        assert c.models()["d_model"] == 32
        g = c.graph("the blue river ran", max_feature_nodes=20, batch_size=8)
        expected = attribute("the blue river ran", local, max_feature_nodes=20, batch_size=8)
        torch.testing.assert_close(g.rows, expected.rows, atol=1e-5, rtol=1e-4)
        job = c.submit("where is the big red dog", batch_size=4)
        seen = []
        g2 = c.wait(job, progress=lambda j: seen.append(j.status))
        assert g2.prompt_tokens[1:] == ["where", "is", "the", "big", "red", "dog"] and seen


def test_cli_serve_stops_cleanly_on_sigint(dirs, tmp_path) -> None:
    """`attribute-ray serve` comes up on the given port and exits 0 on SIGINT (own Ray instance)."""
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "serve", "--model", str(dirs[0]), "--transcoder", str(dirs[1]),
         "--port", str(port), "--graph-store", str(tmp_path / "store")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        assert post(f"http://127.0.0.1:{port}", {"prompt": "the cat"}).status_code == 200
        for line in proc.stdout:  # serve.run has returned once the banner is out
            if "Ctrl-C to stop" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "stopping" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_feature_dashboards_are_served(service) -> None:
    from attribute_ray.neuronpedia import cantor

    url, _ = service
    j = post(url, {"prompt": "the cat sat on the red river"}).json()
    assert j["metadata"]["feature_details"]["feature_json_base_url"] == "/v1/features"
    feats = [n for n in j["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats
    layer, feat, _ = map(int, feats[0]["node_id"].split("_"))
    d = httpx.get(f"{url}/v1/features/{layer}/{feat}", timeout=30)
    assert d.status_code == 200 and d.json()["index"] == cantor(layer, feat) == feats[0]["feature"]
    assert d.json()["examples_quantiles"][0]["examples"]
    same = httpx.get(f"{url}/v1/features/{cantor(layer, feat)}.json", timeout=30)
    assert same.json() == d.json()
    assert httpx.get(f"{url}/v1/features/2/100000", timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/features/99/1", timeout=30).status_code == 404


def test_interventions_and_steering_routes(service, local) -> None:
    from attribute_ray.interventions import Intervention, generate_with_interventions, intervene

    url, _ = service
    trace = local.trace(local.tokenize("the capital of france is"))
    layer, pos, feat = trace.features.as_matrix()[0].tolist()
    body = {"prompt": "the capital of france is", "direct_only": True, "top_k": 5, "read_features": [[layer, pos, feat]],
            "interventions": [{"layer": layer, "feature": feat, "op": "scale", "value": 3.0, "positions": [pos]}]}
    r = httpx.post(f"{url}/v1/interventions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = intervene(local, "the capital of france is", [Intervention(layer, feat, "scale", 3.0, [pos])],
                     direct_only=True, top_k=5, read_features=[(layer, pos, feat)])
    got = r.json()
    assert [t["token_id"] for t in got["top_after"]] == [t.token_id for t in want.top_after]
    assert got["top_after"][0]["prob"] == pytest.approx(want.top_after[0].prob, abs=1e-4)
    assert got["activations_after"][0] == pytest.approx(3 * got["activations_before"][0], rel=1e-4)
    packed = httpx.post(f"{url}/v1/interventions", json=body, headers={"accept": "application/msgpack"}, timeout=120)
    assert msgpack.unpackb(packed.content)["top_after"] == got["top_after"]
    # supernodes and steering; zero-change steering is plain greedy generation
    steer = httpx.post(f"{url}/v1/steer", json={"prompt": "the cat", "max_new_tokens": 6, "supernodes": [
        {"label": "s", "features": [[layer, feat]], "op": "scale", "value": 1.0}]}, timeout=120).json()
    plain, _ = generate_with_interventions(local, "the cat", [], max_new_tokens=6)
    assert steer["plain"] == steer["steered"] == plain
    # bad interventions get a 422 naming the problem
    for bad, needle in [({"layer": 99, "feature": 0}, "layer"), ({"layer": 0, "feature": 10_000}, "feature"),
                        ({"layer": 0, "feature": 1, "positions": [500]}, "position"), ({"layer": 0, "op": "set"}, "error node"),
                        ({"layer": 0, "feature": 1, "op": "boost"}, "literal_error")]:
        r = httpx.post(f"{url}/v1/interventions", json={"prompt": "the cat", "interventions": [bad]}, timeout=60)
        assert r.status_code == 422 and needle in r.text, (bad, r.text)
