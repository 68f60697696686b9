"""The service's overheads, side by side in one run.

    python -m bench.serve [--layers 6 --d-model 256 --features 2048 --tokens 32 --requests 16] [--quick]

1. HTTP + msgpack end-to-end latency vs the in-process `attribute()` call for the same graph (goal ≤ 1.1×).
2. msgpack vs Neuronpedia JSON: bytes on the wire and client decode time (goals ≤ 0.25×, ≤ 0.1×).
3. graphs/s with 2 vs 1 engine replicas (goal ≥ 1.7×; each replica gets one CPU thread).

Starts a local Ray (4 logical CPUs) and shuts it down at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    Comparison,
    add_model_size,
    free_port,
    parse_args,
    print_table,
    quiet_ray,
    seconds,
    write_tiny_pair,
)

QUICK = dict(layers=2, d_model=64, features=256, tokens=8, requests=4)
REPEAT = 5


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    add_model_size(p, layers=6, d_model=256, features=2048)
    p.add_argument("--tokens", type=int, default=32, help="prompt length, BOS included")
    p.add_argument("--requests", type=int, default=16, help="graphs requested in the throughput test")
    args = parse_args(p, QUICK)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        print_table(*measure(args, Path(tmp)))


def measure(args: argparse.Namespace, root: Path) -> tuple[str, list[Comparison], list[str]]:
    """Run the three measurements with every file under `root`; (title, rows, notes) for `print_table`."""
    quiet_ray()
    import httpx
    import ray
    import torch
    from ray import serve

    from attribute_ray import Graph, ReplacementModel, attribute
    from attribute_ray.client import Client
    from deployments.app import app_builder
    from deployments.config import AppArgs

    torch.set_num_threads(1)
    model_dir, tc_dir = write_tiny_pair(root, layers=args.layers, d_model=args.d_model, features=args.features)
    tokens = [0] + [4 + (i * 11) % 60 for i in range(args.tokens - 1)]
    rm = ReplacementModel.from_pretrained(str(model_dir), str(tc_dir))
    graphs: list[Graph] = []
    in_process = seconds(lambda: graphs.append(attribute(tokens, rm, batch_size=64)), REPEAT)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    common = dict(model=str(model_dir), transcoder=str(tc_dir), num_gpus=0, num_cpus=1, max_queued_requests=64)
    msgpack_accept = {"accept": "application/msgpack"}

    # 1. latency: a different last token each time defeats the graph store; the graphs have the same size
    serve.run(app_builder(AppArgs(**common, graph_store=str(root / "s1"))), name="bench", route_prefix="/")
    http = []
    with Client(url) as c:
        for i in range(REPEAT):
            http += seconds(lambda i=i: c.graph(tokens[:-1] + [4 + i], batch_size=64))
    # 2. bytes and decode time of one stored graph
    gid = httpx.post(f"{url}/v1/graphs", json={"tokens": tokens, "batch_size": 64}, headers=msgpack_accept,
                     timeout=600).headers["x-graph-id"]
    full = httpx.get(f"{url}/v1/graphs/{gid}", headers=msgpack_accept, timeout=600).content
    mp = httpx.get(f"{url}/v1/graphs/{gid}", params={"pruned": "true"}, headers=msgpack_accept, timeout=600).content
    js = httpx.get(f"{url}/v1/graphs/{gid}", headers={"accept": "application/json"}, timeout=600).content
    dec_mp = min(seconds(lambda: Graph.from_msgpack(mp), REPEAT))  # a Graph, ready to use
    dec_js = min(seconds(lambda: json.loads(js), REPEAT))

    # 3. throughput, 1 vs 2 replicas
    rates = {}
    prompts = [[0] + [4 + (i * 7 + j * 3) % 60 for j in range(args.tokens - 1)] for i in range(args.requests)]
    for n in (1, 2):
        serve.run(app_builder(AppArgs(**common, num_replicas=n, graph_store=str(root / f"t{n}"))), name="bench",
                  route_prefix="/")

        def one(toks: list[int]) -> None:
            with Client(url, retries=50, backoff=0.1) as c:
                c.graph(toks, batch_size=64)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, prompts))
        rates[n] = args.requests / (time.perf_counter() - t0)
    ray.shutdown()

    med = statistics.median
    graph = graphs[0]
    return (
        f"graph: {args.layers} layers, d_model {args.d_model}, {args.features} features, {args.tokens} tokens, "
        f"{graph.n_nodes} nodes, {graph.rows.shape[0]} rows",
        [Comparison("end-to-end latency, HTTP + msgpack vs in-process", med(http), med(in_process), "s", "<= 1.1"),
         Comparison("pruned graph bytes, msgpack vs JSON", len(mp), len(js), "B", "<= 0.25"),
         Comparison("pruned graph decode, msgpack vs JSON", dec_mp * 1e3, dec_js * 1e3, "ms", "<= 0.1"),
         Comparison("graphs/s, 2 replicas vs 1", rates[2], rates[1], "", ">= 1.7")],
        [f"full unpruned graph as msgpack: {len(full):,} bytes"],
    )


if __name__ == "__main__":
    main()
