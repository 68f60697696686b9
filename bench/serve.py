"""The service's overheads, side by side in one run (not a test; nothing asserts on seconds).

    python bench/serve.py [--layers 6 --d-model 256 --features 2048 --tokens 32 --requests 16]

1. HTTP + msgpack end-to-end latency vs the in-process `attribute()` call for the same graph (goal ≤ 1.1×).
2. msgpack vs Neuronpedia JSON: bytes on the wire and client decode time (goals ≤ 0.25×, ≤ 0.1×).
3. graphs/s with 1 vs 2 engine replicas on a tiny model (goal ≥ 1.7×; each replica gets one CPU thread).
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_pair(args, root: Path) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attribute_ray import save_sparsify
    from attribute_ray.transcoders import Activation
    from tests.tiny import random_transcoder, tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, bos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(args.layers, args.d_model, n_features=args.features, kind="plt", skip=True,
                           activation=Activation("topk", k=16))
    save_sparsify(tc, root / "tc")
    return root / "model", root / "tc"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    args = p.parse_args()

    import httpx
    import ray
    import torch
    from ray import serve

    from attribute_ray import Graph, ReplacementModel, attribute
    from attribute_ray.client import Client
    from deployments.app import app_builder
    from deployments.config import AppArgs

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    model_dir, tc_dir = make_pair(args, root)
    tokens = [0] + [4 + (i * 11) % 60 for i in range(args.tokens - 1)]
    rm = ReplacementModel.from_pretrained(str(model_dir), str(tc_dir))
    in_process = []
    for _ in range(5):
        t0 = time.perf_counter()
        graph = attribute(tokens, rm, batch_size=64)
        in_process.append(time.perf_counter() - t0)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    common = dict(model=str(model_dir), transcoder=str(tc_dir), num_gpus=0, num_cpus=1, max_queued_requests=64)

    # 1. latency: distinct token lists defeat the cache; same size graphs
    serve.run(app_builder(AppArgs(**common, graph_store=str(root / "s1"))), name="bench", route_prefix="/")
    http = []
    with Client(url) as c:
        for i in range(5):
            t0 = time.perf_counter()
            c.graph(tokens[:-1] + [4 + i], batch_size=64)
            http.append(time.perf_counter() - t0)
        # 2. bytes and decode time of the same stored graph
        gid = httpx.post(f"{url}/v1/graphs", json={"tokens": tokens, "batch_size": 64},
                         headers={"accept": "application/msgpack"}, timeout=600).headers["x-graph-id"]
        full = httpx.get(f"{url}/v1/graphs/{gid}", headers={"accept": "application/msgpack"}, timeout=600).content
        mp = httpx.get(f"{url}/v1/graphs/{gid}", params={"pruned": "true"}, headers={"accept": "application/msgpack"},
                       timeout=600).content
        js = httpx.get(f"{url}/v1/graphs/{gid}", headers={"accept": "application/json"}, timeout=600).content
    dec_mp = min(_timed(lambda: Graph.from_msgpack(mp)) for _ in range(5))  # a Graph, ready to use
    dec_js = min(_timed(lambda: json.loads(js)) for _ in range(5))

    # 3. throughput, 1 vs 2 replicas
    rates = {}
    for n in (1, 2):
        serve.run(app_builder(AppArgs(**common, num_replicas=n, graph_store=str(root / f"t{n}"))), name="bench",
                  route_prefix="/")
        prompts = [[0] + [4 + (i * 7 + j * 3) % 60 for j in range(args.tokens - 1)] for i in range(args.requests)]

        def one(toks):
            with Client(url, retries=50, backoff=0.1) as c:
                c.graph(toks, batch_size=64)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, prompts))
        rates[n] = args.requests / (time.perf_counter() - t0)
    ray.shutdown()

    med = statistics.median
    print(f"graph: {args.layers} layers, d_model {args.d_model}, {args.features} features, {args.tokens} tokens, "
          f"{graph.n_nodes} nodes, {graph.rows.shape[0]} rows")
    print(f"{'measure':<44}{'value':>14}{'reference':>14}{'ratio':>8}  goal")
    print(f"{'end-to-end latency, HTTP+msgpack vs in-process':<44}{med(http):>13.3f}s{med(in_process):>13.3f}s"
          f"{med(http) / med(in_process):>8.2f}  <= 1.1")
    print(f"{'pruned graph bytes, msgpack vs JSON':<44}{len(mp):>14,}{len(js):>14,}{len(mp) / len(js):>8.2f}  <= 0.25")
    print(f"{'pruned graph decode, msgpack vs JSON':<44}{dec_mp * 1e3:>12.2f}ms{dec_js * 1e3:>12.2f}ms{dec_mp / dec_js:>8.2f}  <= 0.1")
    print(f"{'(full unpruned graph as msgpack: bytes)':<44}{len(full):>14,}")
    print(f"{'graphs/s, 2 replicas vs 1':<44}{rates[2]:>14.2f}{rates[1]:>14.2f}{rates[2] / rates[1]:>8.2f}  >= 1.7")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
