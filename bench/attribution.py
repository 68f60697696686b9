"""attribute-ray vs circuit-tracer 0.5.0 on identical weights: wall time and peak RSS, side by side.

    python bench/attribution.py [--layers 8 --d-model 512 --features 8192 --k 32 --tokens 32 --batch-size 256]

Builds one random Llama-style model + TopK per-layer transcoder (circuit-tracer's TopK: top-k of the raw
pre-activations), runs each implementation in its own subprocess (so peak RSS is its own), once with all
features and once with --cap feature nodes, and prints times, peak RSS and the ratios. Needs the `parity`
extra. Not a test: nothing asserts on seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(args, workdir: Path):
    """(hf_model, tokenizer, circuit-tracer transcoder dir, tokens), deterministic from the seed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attribute_ray import save_circuit_tracer
    from attribute_ray.transcoders import Activation
    from tests.tiny import random_transcoder, tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tc = random_transcoder(args.layers, args.d_model, n_features=args.features, kind="plt",
                           activation=Activation("relu"), seed=0)
    tc_dir = save_circuit_tracer(tc, workdir / "tc")  # stored as ReLU; both sides switch to TopK below
    tokens = torch.randint(4, 64, (args.tokens,), generator=torch.Generator().manual_seed(1))
    tokens[0] = 0
    return model, tiny_tokenizer(), tc_dir, tokens


def run_one(args) -> dict:
    """Inner process: one implementation, one setting; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        model, tok, tc_dir, tokens = build(args, Path(d))
        cap = None if args.cap_run == 0 else args.cap_run
        if args.impl == "circuit-tracer":
            from circuit_tracer.attribution.attribute import attribute
            from circuit_tracer.transcoder.activation_functions import TopK

            from tests.ct_reference import replacement_model

            rm = replacement_model(model, tok, tc_dir)
            del model  # circuit-tracer users hold only the TransformerLens copy
            for t in rm.transcoders:
                t.activation_function = TopK(args.k)
            run = lambda: attribute(tokens, rm, batch_size=args.batch_size, max_feature_nodes=cap)  # noqa: E731
        else:
            from attribute_ray import ReplacementModel, load_transcoder
            from attribute_ray.attribution import attribute
            from attribute_ray.transcoders import Activation

            tc = load_transcoder(tc_dir)
            tc = replace(tc, activation=Activation("topk", k=args.k, relu_before_topk=False))
            rm = ReplacementModel(model, tok, tc)
            run = lambda: attribute(tokens, rm, batch_size=args.batch_size, max_feature_nodes=cap)  # noqa: E731
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        graph = run()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        adj = graph.adjacency_matrix
        return {"seconds": seconds, "peak_mb": peak / 1024, "attr_mb": (peak - rss_before) / 1024,
                "n_active": int(graph.active_features.shape[0]), "n_nodes": int(adj.shape[0]),
                "adj_sum": float(adj.abs().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--features", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cap", type=int, default=2000, help="max_feature_nodes of the capped run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impl", choices=["attribute-ray", "circuit-tracer"], help=argparse.SUPPRESS)
    p.add_argument("--cap-run", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    base = [a for a in sys.argv[1:]]
    results = {}
    for cap in (0, args.cap):
        for impl in ("circuit-tracer", "attribute-ray"):
            cmd = [sys.executable, "-W", "ignore", __file__, *base, "--impl", impl, "--cap-run", str(cap)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode != 0:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            results[(cap, impl)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer, TopK k={args.k}, "
          f"{args.tokens} tokens, batch {args.batch_size}, {args.threads} threads")
    print(f"{'run':<22}{'impl':<16}{'seconds':>9}{'peak RSS MB':>13}{'attr. MB':>10}{'nodes':>8}")
    for cap in (0, args.cap):
        name = "all features" if cap == 0 else f"max_feature_nodes={cap}"
        for impl in ("circuit-tracer", "attribute-ray"):
            r = results[(cap, impl)]
            print(f"{name:<22}{impl:<16}{r['seconds']:>9.2f}{r['peak_mb']:>13.0f}{r['attr_mb']:>10.0f}{r['n_nodes']:>8}")
        ct, ar = results[(cap, "circuit-tracer")], results[(cap, "attribute-ray")]
        print(f"{'':<22}{'ratio ar/ct':<16}{ar['seconds'] / ct['seconds']:>9.2f}{ar['peak_mb'] / ct['peak_mb']:>13.2f}"
              f"{ar['attr_mb'] / max(ct['attr_mb'], 1):>10.2f}   (same graph: Σ|A| {ar['adj_sum']:.4g} vs {ct['adj_sum']:.4g})")


if __name__ == "__main__":
    main()
