"""Long prompts: ``python -m bench.long_prompt --tokens 4096`` (``--quick``: 256 tokens).

One attribution of a random-token prompt on a SmolLM2-135M-sized random model (Llama, 30 layers, d_model 576,
d_mlp 1536, 9 heads / 3 key-value heads, vocabulary 49,152) with a random per-layer TopK (k = 16) skip transcoder,
``max_feature_nodes`` 500. It prints the memory model's breakdown for the request (what grows with T, with
n_active, with the rows), then measures the trace alone and the whole attribution (peak RSS above the resident
model, `PeakRss`) beside the estimate, and the time. Progress (rows done, rows/s, RSS) goes to stderr every
``--every`` seconds, so a long run shows how far it got.

Attribution keeps the attention patterns only while they are small (`memory.keeps_patterns`, 256 MiB); past that,
as here, its linearised graphs keep q and k and each backward pass recomputes the patterns.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

from attribute_ray import ReplacementModel
from attribute_ray.attribution import attribute
from attribute_ray.memory import (
    CHUNK_BUDGET,
    GiB,
    MemoryBudget,
    ModelShape,
    PeakRss,
    RequestShape,
    chunk_budget,
    chunk_rows,
    estimate,
    keeps_patterns,
    release_memory,
    row_buffer_bytes,
    trace_bytes,
)
from attribute_ray.settings import AttributionSettings
from bench.common import Comparison, parse_args, print_table
from bench.memory import sweep

GROWS = {  # part of `MemoryEstimate` -> what it grows with
    "trace": "T (logits T·V, activations L·T·D, q/k/v; mask T²)",
    "trace_forward": "T (+ one attention block, encoder pre-activations T·F)",
    "sources": "n_active (T·Σ M_l·D)",
    "row_buffer": "rows × n_active",
    "influence": "rows × n_active (feature cap)",
    "chunk": "T × rows per backward pass (+ one attention block)",
    "graph": "rows × (n_sel + L·T)",
    "packing": "rows × (n_sel + L·T)",
}


def smollm_sized(features: int, k: int, seed: int = 0) -> ReplacementModel:
    """A random model with SmolLM2-135M's layout and a random TopK skip transcoder (the tiny tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attribute_ray.tiny import random_transcoder, tiny_tokenizer
    from attribute_ray.transcoders import Activation

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    tc = random_transcoder(30, 576, n_features=features, kind="plt", skip=True, activation=Activation("topk", k=k), seed=seed)
    return ReplacementModel(model, tiny_tokenizer(), tc, name="smollm2-sized-random")


def breakdown(m: ModelShape, req: RequestShape) -> None:
    e = estimate(m, req)
    print(f"\nmemory model, {req.n_pos} tokens, {req.n_active:,} active features, {req.feature_rows} feature rows + "
          f"{req.n_logits} logits, {req.chunk_rows} rows per backward pass (GiB):")
    for part, grows in GROWS.items():
        print(f"  {part:<14} {getattr(e, part) / GiB:7.2f}   grows with {grows}")
    print(f"  {'rows phase':<14} {e.rows_phase / GiB:7.2f}   trace + sources + row buffer + max(influence + chunk, 2·graph)")
    print(f"  {'engine peak':<14} {e.engine_peak / GiB:7.2f}   + 64 MiB slack; the largest phase")


def watchdog(min_available: float) -> None:
    """Exit this process (status 3) when the machine's available memory falls under `min_available` bytes, rather
    than let the kernel's OOM killer pick a victim among other processes."""
    from attribute_ray.memory import available_bytes

    def watch() -> None:
        while True:
            if available_bytes() < min_available:
                print(f"watchdog: under {min_available / GiB:.1f} GiB available, RSS {PeakRss().rss() / GiB:.2f} GiB: "
                      "stopping", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="prompt positions (BOS + random tokens)")
    parser.add_argument("--features", type=int, default=1024, help="transcoder features per layer")
    parser.add_argument("--k", type=int, default=16, help="TopK features per layer and position")
    parser.add_argument("--max-feature-nodes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-budget-mb", type=int, default=CHUNK_BUDGET // 2**20,
                        help="cap on one backward pass's gradient buffers (attribute's memory_budget_mb)")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between progress lines (stderr)")
    parser.add_argument("--trace-only", action="store_true", help="measure the trace, skip the rows")
    parser.add_argument("--min-available-gib", type=float, default=1.5, help="stop when the machine has less free")
    args = parse_args(parser, {"tokens": 256})
    torch.set_num_threads(args.threads)
    watchdog(args.min_available_gib * GiB)
    model = smollm_sized(args.features, args.k)
    shape = ModelShape.of(model)
    T = args.tokens
    words = torch.randint(3, 64, (T - 1,), generator=torch.Generator().manual_seed(T))
    tokens = torch.cat([torch.zeros(1, dtype=torch.long), words])  # BOS + random words of the tiny tokenizer
    n_active = shape.n_layers * args.k * (T - 1)  # TopK: exactly k per layer at every position but BOS
    step = AttributionSettings().update_interval * args.batch_size  # feature rows between influence updates
    rows = min(args.max_feature_nodes, n_active)
    result = row_buffer_bytes(rows, 10, n_active, shape.n_layers, T)
    chunk = chunk_rows(shape, T, args.batch_size, chunk_budget(None, args.memory_budget_mb * 2**20, result))
    req = RequestShape(T, n_active, min(args.max_feature_nodes, n_active), 10, chunk,
                       shape.n_layers * (args.k + 1), step)
    breakdown(shape, req)
    print("\nthis layout:", end="")
    sweep(shape, args.k, args.max_feature_nodes, MemoryBudget(max_bytes=24 * GiB), (512, 1024, 2048, 4096, 8192))
    sys.stdout.flush()

    model.trace(tokens[:4], linearise=True, keep_patterns=False)  # one-off allocations belong to the resident model
    release_memory()
    rows = []
    t0 = time.perf_counter()
    with PeakRss() as peak:
        trace = model.trace(tokens, linearise=True, keep_patterns=keeps_patterns(shape, T))
        n_active = len(trace.features)
        del trace
    rows.append(Comparison(f"{T} tokens: trace alone, estimate vs measured peak", trace_bytes(shape, T)[1] / 2**20,
                           peak.peak / 2**20, "MiB", ">= 0.8"))
    print(f"\ntrace: {time.perf_counter() - t0:.1f} s, {n_active:,} active features, peak {peak.peak / GiB:.2f} GiB "
          f"(estimate {trace_bytes(shape, T)[1] / GiB:.2f})", flush=True)
    release_memory()
    if not args.trace_only:
        start = time.perf_counter()
        last = [start]

        def progress(phase: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= args.every or done == total:
                last[0] = now
                rate = done / max(now - start, 1e-9)
                print(f"[{now - start:7.0f} s] {phase} {done}/{total} rows, {rate:.3f} rows/s, "
                      f"RSS {peak.rss() / GiB:.2f} GiB", file=sys.stderr, flush=True)

        with PeakRss() as peak:
            graph = attribute(tokens, model, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
                              memory_budget_mb=args.memory_budget_mb, on_progress=progress)
            data = graph.to_msgpack()
        seconds = time.perf_counter() - start
        req = RequestShape(T, len(graph.active_features), graph.n_selected, graph.n_logits, req.chunk_rows, req.max_sources, step)
        est = estimate(shape, req)
        rows.append(Comparison(f"{T} tokens, {graph.n_selected} feature rows + {graph.n_logits} logits: estimate vs "
                               "measured peak", est.engine_peak / 2**20, peak.peak / 2**20, "MiB", ">= 0.8"))
        rows.append(Comparison(f"{T} tokens: measured peak vs a 24 GiB machine", peak.peak / 2**20, 24 * 1024, "MiB", "<= 1"))
        print(f"attribution: {seconds:.0f} s, {(graph.n_selected + graph.n_logits) / seconds:.3f} rows/s, graph "
              f"{len(data) / 2**20:.1f} MiB msgpack", flush=True)
    print_table(f"\nlong prompt ({'patterns kept' if keeps_patterns(shape, T) else 'no patterns kept'}), peak RSS above the "
                "resident model", rows, ["tests/test_memory.py accepts 0.8 ≤ estimate/measured ≤ 2.5"])


if __name__ == "__main__":
    main()
