"""Scale-out on a local 3-node Ray cluster (tests/cluster.py: a head with no CPUs and two workers, all on
127.0.0.1): the caching job submitted with `ray job submit` spreads its actors over both workers and survives the
loss of one; the service's engine replicas spread over both workers and every graph arrives while one is lost.
Measured times are printed (run with -s to see them)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests import cluster as local_cluster
from tests import test_cache_job

pair, corpus = test_cache_job.pair, test_cache_job.corpus  # the caching tests' fixtures: tiny model pair, offline texts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).parent.parent
RAY_LINE = "has constructor arguments in the object store"  # Ray's error-level line for restartable actors (ray #53727)
KEYS = ["sequence", "position", "layer", "feature"]


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster.start(workers=2, worker_cpus=2)
    try:
        yield c
    finally:
        c.stop()


def job_command(cluster, pair, corpus, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={cluster.dashboard_url}",
            "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": [".git", ".venv", "*.egg-info"]}),
            "--", "python", "-m", "jobs.cache_activations", "--model", str(pair[0]), "--transcoder", str(pair[1]),
            "--dataset", str(corpus), "--n-tokens", "12000", "--ctx-len", "16", "--shard-windows", "4",
            "--batch-size", "1", "--num-actors", "2", "--out", str(out), "--no-features"]


def encoder_nodes(cluster) -> dict[str, str]:
    """{actor id: node name} of the live caching actors (Ray's state API)."""
    from ray.util.state import list_actors

    names = {v: k for k, v in cluster.node_ids().items()}
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "ShardEncoder"),
                                                                 ("state", "=", "ALIVE")], raise_on_missing_output=False)
    return {a.actor_id: names.get(a.node_id, a.node_id) for a in actors}


def rows_of(out: Path) -> pd.DataFrame:
    parts = [pd.read_parquet(p) for p in sorted((out / "shards").glob("*.parquet"))]
    return pd.concat(parts, ignore_index=True).sort_values(KEYS, ignore_index=True)


def content_hash(rows: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for col in [*KEYS, "activation"]:
        h.update(np.ascontiguousarray(rows[col].to_numpy()).tobytes())
    return h.hexdigest()


def reference_rows(pair, corpus, ctx_len: int, n_tokens: int, shard_windows: int) -> pd.DataFrame:
    """The uninterrupted computation, in this process: every shard encoded in order, one thread like an actor."""
    import torch

    from attribute_ray import ReplacementModel
    from attribute_ray import activation_cache as cache
    from attribute_ray.corpus import read_texts, token_windows

    rm = ReplacementModel.from_pretrained(str(pair[0]), str(pair[1]))
    windows = token_windows(rm.tokenizer, read_texts(str(corpus)), ctx_len=ctx_len, n_tokens=n_tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tables = [cache.encode_windows(rm, windows[first : first + n], first, batch_size=1, threshold=0.0, bos=True)
                  for _, first, n in cache.plan_shards(len(windows), shard_windows)]
    finally:
        torch.set_num_threads(threads)
    return pd.concat([t.to_pandas() for t in tables], ignore_index=True).sort_values(KEYS, ignore_index=True)


def test_caching_spreads_over_the_workers_and_survives_losing_one(cluster, pair, corpus, tmp_path) -> None:
    from jobs.cache_activations import CacheConfig, run

    out = tmp_path / "cache"
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        job = subprocess.Popen(job_command(cluster, pair, corpus, out), stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        placed: dict[str, str] = {}
        deadline = time.monotonic() + 240
        while set(placed.values()) != {"w1", "w2"}:  # the two actors, one on each worker
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"actors never on both workers: {placed}"
            placed = encoder_nodes(cluster)
            time.sleep(0.2)
        t_spread = time.monotonic() - t0
        while not list((out / "shards").glob("*.parquet")):  # encoding has begun
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        cluster.kill_node("w1")
        t_kill = time.monotonic()
        done_at_kill = len(list((out / "shards").glob("*.parquet")))
        assert job.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    t_job = time.monotonic() - t_kill
    output = log.read_text()
    assert "succeeded" in output.lower()
    assert RAY_LINE not in output
    manifest = json.loads((out / "manifest.json").read_text())
    n_shards = len(manifest["shards"])
    assert 0 < done_at_kill < n_shards, "the worker was not lost mid-run"

    # every shard exactly once, complete, nothing partial; the same rows as the uninterrupted computation
    assert sorted(int(p.stem) for p in (out / "shards").glob("*.parquet")) == list(range(n_shards))
    assert sorted(int(p.stem) for p in (out / "tokens").glob("*.parquet")) == list(range(n_shards))
    assert not list(out.rglob("*.tmp"))
    rows = rows_of(out)
    assert not rows.duplicated(KEYS).any()
    want = reference_rows(pair, corpus, ctx_len=16, n_tokens=12000, shard_windows=4)
    assert len(rows) == len(want) == sum(s["n_activations"] for s in manifest["shards"]) > 0
    assert content_hash(rows) == content_hash(want)

    # the rerun resumes: nothing to encode, no shard rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    cfg = CacheConfig(model=str(pair[0]), transcoder=str(pair[1]), dataset=str(corpus), n_tokens=12000, ctx_len=16,
                      shard_windows=4, batch_size=1, num_actors=2, out=str(out), build_features=False)
    assert run(cfg)["last_run"]["encoded_tokens"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == stamps
    requeued = output.count("re-queued")
    print(f"\ncaching: actors on both workers {t_spread:.1f} s after submit; w1 killed with {done_at_kill}/{n_shards} "
          f"shards written, {requeued} shard(s) re-queued; the job finished {t_job:.1f} s after the kill")
    cluster.start_worker("w1")  # for the next test
    cluster.wait_nodes({"head", "w1", "w2"})


# ----- serving ---------------------------------------------------------------------------------------------------

ENGINE = "AttributionEngine"


def tokens_for(i: int, n: int = 16) -> list[int]:
    """A distinct prompt per request (token ids of the tiny model's vocabulary)."""
    return [0] + [4 + (i * 11 + j * 7) % 60 for j in range(n - 1)]


@pytest.fixture(scope="module")
def serve_on_cluster(cluster):
    """The test process as a driver of the cluster, with Serve's one HTTP proxy on the head (127.0.0.1)."""
    import ray
    from ray import serve

    ray.init(address=cluster.gcs_address, log_to_driver=False, namespace="scale-out")
    try:
        port = local_cluster.free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()


def engine_replicas(cluster, app: str) -> dict[str, str]:
    """{actor name: node name} of the app's live engine replicas (Ray's state API)."""
    from ray.util.state import list_actors

    names = {v: k for k, v in cluster.node_ids().items()}
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", f"ServeReplica:{app}:{ENGINE}"),
                                                                 ("state", "=", "ALIVE")], raise_on_missing_output=False)
    return {a.name: names.get(a.node_id, a.node_id) for a in actors}


def running(app: str) -> int:
    """RUNNING engine replicas of `app`, from Serve's status."""
    from ray import serve

    states = serve.status().applications[app].deployments[ENGINE].replica_states
    return int(states.get("RUNNING", 0))


def wait_for(what: str, check, timeout_s: float = 180, every_s: float = 0.5):
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {last!r})")


def engine_actor(cluster, app: str, node: str):
    """(actor handle, process id) of the app's live engine replica on `node`."""
    import ray
    from ray.util.state import list_actors

    name = next(n for n, where in engine_replicas(cluster, app).items() if where == node)
    (state,) = list_actors(address=cluster.dashboard_url, filters=[("name", "=", name), ("state", "=", "ALIVE")],
                           raise_on_missing_output=False)
    return ray.get_actor(name, namespace="serve"), state.pid


def under_load(url: str, first: int, n_clients: int, busy, fault, local, on_the_side=lambda: None) -> dict:
    """`n_clients` Python clients each ask for one distinct graph; once `busy()` is true, `fault()`; every graph
    must arrive, equal to the in-process computation. Returns {"unfinished": graphs not done at the fault,
    "last_s": seconds from the fault to the last graph, "side": what `on_the_side()` returned while waiting}."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from attribute_ray import attribute
    from attribute_ray.client import Client

    finished: list[float] = []

    def client(i: int) -> tuple[int, object]:
        with Client(url, timeout=120, retry_deadline=300) as c:  # each request ends or fails by its deadline
            g = c.graph(tokens_for(i), batch_size=2)
        finished.append(time.monotonic())
        return i, g

    side = []
    with ThreadPoolExecutor(n_clients) as pool:
        futures = [pool.submit(client, i) for i in range(first, first + n_clients)]
        wait_for("load on the engine", busy, timeout_s=120, every_s=0.02)
        fault()
        t_fault, done_before = time.monotonic(), len(finished)
        while not all(f.done() for f in futures):
            side.append(on_the_side())
            time.sleep(0.5)
        results = dict(f.result(timeout=1) for f in futures)
    t_check = time.monotonic()
    for i, served in results.items():
        expected = attribute(torch.tensor(tokens_for(i)), local, batch_size=2)
        assert torch.equal(served.active_features, expected.active_features)
        torch.testing.assert_close(served.rows, expected.rows, atol=1e-5, rtol=1e-4)
    assert done_before < n_clients, "every graph was done before the fault"
    print(f"(graphs checked in {time.monotonic() - t_check:.1f} s)")
    return {"unfinished": n_clients - done_before, "last_s": max(finished) - t_fault, "side": side}


def test_serving_spreads_over_the_workers_and_survives_losing_one(cluster, serve_on_cluster, dirs, tmp_path) -> None:
    import os
    import signal

    import httpx
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from attribute_ray import ReplacementModel
    from deployments.app import app_builder
    from deployments.config import AppArgs

    app, url = "scale", serve_on_cluster
    store = tmp_path / "graphs"  # one directory every node sees (an fsspec URI on a real cluster)
    args = AppArgs(model=str(dirs[0]), transcoder=str(dirs[1]), num_gpus=0, num_cpus=1, num_replicas=2,
                   max_replicas_per_node=1, ingress_resources={"node_head": 0.01}, graph_store=str(store),
                   max_prompt_tokens=64, max_queued_requests=32, engine_wait_s=120)
    local = ReplacementModel.from_pretrained(str(dirs[0]), str(dirs[1]))
    t0 = time.monotonic()
    stamp = lambda: f"[{time.monotonic() - t0:.0f} s]"  # noqa: E731
    serve.run(app_builder(args), name=app, route_prefix="/")
    both = lambda: sorted(engine_replicas(cluster, app).values()) == ["w1", "w2"] and running(app) == 2  # noqa: E731
    wait_for("engine replicas on both workers", both)
    print(f"\n{stamp()} serving: 2 engine replicas on w1 and w2 {time.monotonic() - t0:.1f} s after serve.run")

    def readyz() -> tuple[int, str]:  # answers within its timeout all along
        r = httpx.get(f"{url}/readyz", timeout=30)
        return r.status_code, r.json().get("status", "")

    # 1. a worker node lost under load
    replica_w1, _ = engine_actor(cluster, app, "w1")
    lost = under_load(url, 0, 6, lambda: ray.get(replica_w1.get_num_ongoing_requests.remote(), timeout=30) > 0,
                      lambda: cluster.kill_node("w1"), local, on_the_side=lambda: (readyz(), running(app)))
    wait_for("Serve's status: one engine replica running", lambda: running(app) == 1, timeout_s=60)
    degraded = readyz()
    assert degraded == (200, "degraded")  # still serving, with reduced capacity
    assert any(p.is_file() for p in store.rglob("*"))  # the graphs went to the shared store
    cluster.start_worker("w1")  # the node comes back: Serve places the missing replica there
    t_back = time.monotonic()
    wait_for("engine replicas on both workers again", both)
    back_s = time.monotonic() - t_back
    assert readyz() == (200, "ready")
    print(f"{stamp()} serving: w1 killed with {lost['unfinished']}/6 graphs unfinished, the last arrived {lost['last_s']:.1f} s "
          f"after the kill; with w1 down Serve's status said 1 engine replica running and /readyz {degraded} "
          f"(during the load: {sorted(set(lost['side']))}); both replicas back {back_s:.1f} s after w1 restarted")

    # 2. an engine replica's process killed under load (its node stays)
    replica_w2, pid = engine_actor(cluster, app, "w2")
    killed = under_load(url, 6, 3, lambda: ray.get(replica_w2.get_num_ongoing_requests.remote(), timeout=30) > 0,
                        lambda: os.kill(pid, signal.SIGKILL), local)
    print(f"{stamp()} serving: engine replica killed with {killed['unfinished']}/3 graphs unfinished, the last arrived "
          f"{killed['last_s']:.1f} s after")

    # 3. the Serve controller's process killed under load (Ray restarts it; proxy and replicas keep serving)
    (controller,) = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "ServeController"),
                                                                         ("state", "=", "ALIVE")],
                                  raise_on_missing_output=False)
    replica_w1, _ = engine_actor(cluster, app, "w1")  # (w2's replacement may still be starting)
    restarted = under_load(url, 9, 3, lambda: ray.get(replica_w1.get_num_ongoing_requests.remote(), timeout=30) > 0,
                           lambda: os.kill(controller.pid, signal.SIGKILL), local)
    wait_for("the controller back, both replicas running", both)
    print(f"{stamp()} serving: Serve controller killed with {restarted['unfinished']}/3 graphs unfinished, the last arrived "
          f"{restarted['last_s']:.1f} s after")
    print(f"{stamp()} serving: done")
    serve.delete(app)


def test_autoscaling_follows_the_load_within_the_cluster(cluster, serve_on_cluster, dirs, tmp_path) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from attribute_ray.client import Client
    from deployments.app import app_builder
    from deployments.config import AppArgs, Autoscaling

    app, url = "auto", serve_on_cluster
    scaling = Autoscaling(min_replicas=1, max_replicas=3, target_ongoing_requests=1, upscale_delay_s=1,
                          downscale_delay_s=5, look_back_period_s=11)
    args = AppArgs(model=str(dirs[0]), transcoder=str(dirs[1]), num_gpus=0, num_cpus=1, autoscaling=scaling,
                   ingress_resources={"node_head": 0.01}, graph_store=str(tmp_path / "graphs"), max_prompt_tokens=64,
                   max_queued_requests=64)
    serve.run(app_builder(args), name=app, route_prefix="/auto")
    wait_for("one engine replica", lambda: running(app) == 1)
    stop, served = threading.Event(), []

    def load(k: int) -> None:  # distinct prompts, so that none is answered from the graph store
        with Client(f"{url}/auto", timeout=120, retry_deadline=300) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                c.graph([0, *np.random.default_rng(k * 10_000 + i).integers(4, 64, 31).tolist()], batch_size=2)
                served.append(time.monotonic())

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        loaders = [pool.submit(load, k) for k in range(4)]
        try:
            wait_for("three engine replicas under load", lambda: running(app) == 3, timeout_s=180)
            t_up = time.monotonic() - t0
            nodes = engine_replicas(cluster, app)
        finally:
            stop.set()
        for f in loaders:
            f.result(timeout=180)
    assert len(nodes) == 3 and set(nodes.values()) == {"w1", "w2"}  # the workers' 4 CPUs, none on the CPU-less head
    t_idle = time.monotonic()
    wait_for("back to one engine replica when idle", lambda: running(app) == 1, timeout_s=180)
    print(f"\nautoscaling: 1 → 3 engine replicas {t_up:.1f} s into the load ({len(served)} graphs served), "
          f"3 → 1 {time.monotonic() - t_idle:.1f} s after it stopped; replicas on {sorted(nodes.values())}")
    serve.delete(app)
