"""The GPU path end to end: `attribute()` in bf16 and fp32, the Serve app with one GPU per engine, the caching
job with one GPU actor. One table; exit status 1 when any step fails (the failures are listed under it).

    python -m bench.gpu [--n-tokens 200000]  # on a CUDA machine: the offline demo preset
    python -m bench.gpu --device cpu --quick # the same steps on the CPU with a tiny random pair

Steps: (1) `attribute()` of one prompt in fp32 and in bf16, each timed on its second run with the peak GPU
memory of that run (`torch.cuda.max_memory_allocated`, reset before it; model weights included); (2) the bf16
graph against the fp32 one on their shared nodes: max |A_bf16 − A_fp32| / max |A_fp32| over the adjacency, and
how many of the fp32 graph's 10 most influential features the bf16 graph ranks top 10 too; (3) the Serve app
(`num_gpus=1` per engine) answering one graph through the Python client, against the in-process time in the
engine's dtype; (4) the caching job with one GPU actor against the in-process `encode_windows` on the same
windows. Without CUDA (and without ``--device cpu``) it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import Comparison, free_port, parse_args, peak_rss_mb, print_table, quiet_ray, write_tiny_pair

PROMPT = "The capital of France is"
STEPS = ("attribute fp32", "attribute bf16", "bf16 vs fp32 graph", "serve, 1 GPU per engine", "cache job, 1 GPU actor")
QUICK = dict(n_tokens=2000)
NO_CUDA = 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: check the script without a GPU")
    p.add_argument("--n-tokens", type=int, default=200_000, help="tokens the caching job encodes")
    args = parse_args(p, QUICK, argv)  # --quick also swaps the demo preset for a tiny random pair
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device is visible (torch.cuda.is_available() is False), so the GPU path cannot "
              "run here; `--device cpu` runs the same steps on the CPU", file=sys.stderr)
        return NO_CUDA
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        title, rows, notes, failures = measure(args, Path(tmp))
    print_table(title, rows, notes + [f"FAILED {step}: {err}" for step, err in failures])
    return 1 if failures else 0


def measure(args: argparse.Namespace, root: Path) -> tuple[str, list[Comparison], list[str], list[tuple[str, str]]]:
    """Every step, each on its own (a failed step is a row of NaNs and a failure); (title, rows, notes, failures)."""
    quiet_ray()
    import torch

    if args.quick:
        model, transcoder = map(str, write_tiny_pair(root, layers=2, d_model=64, features=256))
    else:
        from attribute_ray.presets import resolve_refs

        os.environ["HF_HUB_OFFLINE"] = "1"  # the demo preset is fully offline
        refs = resolve_refs("demo")
        model, transcoder = refs.model, refs.transcoder
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # as in the engine (num_cpus=1) and the caching actor
    rows: list[Comparison] = []
    notes: list[str] = []
    failures: list[tuple[str, str]] = []
    done: dict[str, object] = {}

    def step(name: str, fn: Callable[[], object]) -> None:
        try:
            done[name] = fn()
        except Exception as e:  # noqa: BLE001 - every step runs and is reported
            traceback.print_exc()
            failures.append((name, f"{type(e).__name__}: {str(e)[:300]}"))
            rows.append(Comparison(f"{name}: failed", float("nan"), float("nan")))

    for dtype in (torch.float32, torch.bfloat16):
        step(f"attribute {'fp32' if dtype == torch.float32 else 'bf16'}",
             lambda dtype=dtype: attribute_once(model, transcoder, args.device, dtype))
    if "attribute fp32" in done and "attribute bf16" in done:
        (f32, t32, m32), (b16, t16, m16) = done["attribute fp32"], done["attribute bf16"]
        rows.append(Comparison("attribute bf16 vs attribute fp32: time", t16, t32, "s"))
        if cuda:
            rows.append(Comparison("attribute bf16 vs attribute fp32: peak GPU memory", m16, m32, "MiB"))
        else:
            notes.append(f"peak GPU memory: CUDA only (this process's peak RSS: {peak_rss_mb():,.0f} MiB)")
        step("bf16 vs fp32 graph", lambda: compare_graphs(b16, f32, rows, notes))
    else:
        step("bf16 vs fp32 graph", lambda: _raise("needs both attribute runs"))

    import ray

    ray.init(num_cpus=4, **({} if cuda else {"num_gpus": 0}), include_dashboard=False, log_to_driver=False)
    try:
        local, t_local, _ = done.get("attribute bf16" if cuda else "attribute fp32", (None, float("nan"), 0))
        step("serve, 1 GPU per engine",
             lambda: serve_one_graph(model, transcoder, args.device, root, local, t_local, rows, notes))
        step("cache job, 1 GPU actor", lambda: cache_job(model, transcoder, args, root, rows, notes))
    finally:
        ray.shutdown()
    name = "demo preset (SmolLM2-135M-Instruct + demo transcoder)" if not args.quick else "tiny random pair"
    gpu = torch.cuda.get_device_name(0) if cuda else "no GPU: --device cpu"
    return f"bench.gpu on {args.device} ({gpu}), {name}, prompt {PROMPT!r}", rows, notes, failures


def _raise(message: str) -> None:
    raise RuntimeError(message)


def attribute_once(model: str, transcoder: str, device: str, dtype) -> tuple:
    """(graph, seconds, peak MiB) of the second `attribute()` run (the first warms the device up)."""
    import torch

    from attribute_ray import ReplacementModel, attribute

    rm = ReplacementModel.from_pretrained(model, transcoder, device=device, dtype=dtype)
    attribute(PROMPT, rm)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    graph = attribute(PROMPT, rm)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    del rm
    if device == "cuda":
        torch.cuda.empty_cache()
    if not torch.isfinite(graph.rows).all():
        raise ValueError(f"{dtype} graph has non-finite edges")
    return graph, seconds, peak


def node_keys(g) -> list[tuple]:
    """Every node of graph `g` in node order (docs/method.md §5) as a key that names it in any graph."""
    return ([("feature", *n) for n in g.selected_nodes.tolist()]
            + [("error", layer, p) for layer in range(g.n_layers) for p in range(g.n_pos)]
            + [("token", p) for p in range(g.n_pos)] + [("logit", t.index) for t in g.logit_targets])


def compare_graphs(b16, f32, rows: list[Comparison], notes: list[str]) -> None:
    """The bf16 graph against the fp32 one on the nodes both have (bf16 may activate or select other features)."""
    import torch

    where = {k: i for i, k in enumerate(node_keys(b16))}
    pairs = [(i, where[k]) for i, k in enumerate(node_keys(f32)) if k in where]
    i32, i16 = (torch.tensor(ix) for ix in zip(*pairs))
    a32 = f32.adjacency.float()[i32][:, i32]
    a16 = b16.adjacency.float()[i16][:, i16]
    rows.append(Comparison("bf16 vs fp32 graph: max |A_bf16 - A_fp32| vs max |A_fp32|",
                           (a16 - a32).abs().max().item(), a32.abs().max().item()))
    top32, top16 = f32.top_features(10), b16.top_features(10)
    rows.append(Comparison("bf16 vs fp32 graph: top-10 features by influence shared", len(set(top32) & set(top16)),
                           len(top32)))
    notes.append(f"bf16 vs fp32 graph: {len(pairs)} of {f32.n_nodes} fp32 nodes shared ({b16.n_nodes} bf16 nodes); "
                 f"top logit {'the same' if b16.logit_targets[0].index == f32.logit_targets[0].index else 'DIFFERS'}")


def serve_one_graph(model: str, transcoder: str, device: str, root: Path, local, t_local: float,
                    rows: list[Comparison], notes: list[str]) -> None:
    """Deploy the app (`num_gpus=1` per engine on CUDA), ask for one graph through the client, tear it down;
    `local`, `t_local`: the in-process graph and seconds in the engine's dtype (None, NaN when that run failed)."""
    from ray import serve

    from attribute_ray.client import Client
    from deployments.app import app_builder
    from deployments.config import AppArgs

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder(AppArgs(model=model, transcoder=transcoder, device=device, num_cpus=1,
                                      num_gpus=1 if device == "cuda" else 0, graph_store=str(root / "graphs"))),
                  name="bench-gpu", route_prefix="/")
        with Client(f"http://127.0.0.1:{port}") as c:
            served = c.models().get("device", "")
            if not served.startswith(device):
                raise RuntimeError(f"the engine runs on {served!r}, not {device}")
            t0 = time.perf_counter()
            graph = c.graph(PROMPT)
            seconds = time.perf_counter() - t0
        if graph.n_selected == 0 or not graph.logit_targets:
            raise RuntimeError("the served graph is empty")
        rows.append(Comparison("serve, 1 GPU per engine: one graph over HTTP vs in-process", seconds, t_local, "s"))
        if local is not None:
            notes.append(f"served graph: {graph.n_nodes} nodes, {graph.n_selected} features (in-process: "
                         f"{local.n_nodes}, {local.n_selected}); engine on {served}")
    finally:
        serve.shutdown()


def cache_job(model: str, transcoder: str, args: argparse.Namespace, root: Path, rows: list[Comparison],
              notes: list[str]) -> None:
    """The caching job with one actor (one GPU on CUDA) on copies of Python's pydoc topics, against the in-process
    `encode_windows` of the same windows."""
    from pydoc_data.topics import topics

    from attribute_ray import ReplacementModel
    from attribute_ray.activation_cache import CacheConfig, encode_windows
    from attribute_ray.corpus import read_texts, token_windows
    from attribute_ray.devices import resolve_dtype
    from jobs.cache_activations import run

    rm = ReplacementModel.from_pretrained(model, transcoder, device=args.device, dtype=resolve_dtype("auto", args.device))
    texts = [t.lower() for t in topics.values()]
    per_copy = sum(len(ids) + 1 for ids in rm.tokenizer(texts, add_special_tokens=False)["input_ids"])
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * -(-args.n_tokens // per_copy)))
    cfg = CacheConfig(model=model, transcoder=transcoder, dataset=str(corpus), n_tokens=args.n_tokens, ctx_len=128,
                      batch_size=16, shard_windows=32, out=str(root / "cache"), num_actors=1, device=args.device,
                      build_features=False)
    windows = token_windows(rm.tokenizer, read_texts(str(corpus)), ctx_len=cfg.ctx_len, n_tokens=cfg.n_tokens)
    encode_windows(rm, windows[:16], 0, batch_size=16, threshold=0.0, bos=True)  # warm-up
    t0 = time.perf_counter()
    encode_windows(rm, windows, 0, batch_size=cfg.batch_size, threshold=0.0, bos=True)
    rate = windows.size / (time.perf_counter() - t0)
    del rm
    last = run(cfg)["last_run"]
    if last["encoded_tokens"] != windows.size or not all(d.startswith(args.device) for d in last["devices"]):
        raise RuntimeError(f"the job encoded {last['encoded_tokens']} of {windows.size} tokens on {last['devices']}")
    rows.append(Comparison("cache job, 1 GPU actor vs in-process encode", last["encoded_tokens"] / last["encode_seconds"],
                           rate, "tok/s"))
    notes.append(f"cache job: {last['encode_seconds']:.1f} s in all, seconds per part {last['breakdown']}")


if __name__ == "__main__":
    sys.exit(main())
