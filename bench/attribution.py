"""attribute-ray vs circuit-tracer 0.5.0 on identical weights: wall time and peak RSS, side by side.

    python -m bench.attribution [--layers 8 --d-model 512 --features 8192 --k 32 --tokens 32 --batch-size 256] [--quick]
    python -m bench.attribution --layers 4 --d-model 256 --tokens 1024 --caps 1000   # a long prompt, capped

Writes one random Llama-style model and a per-layer TopK transcoder (circuit-tracer's TopK: the k largest raw
pre-activations) to disk, then runs each implementation in its own process (so the peak RSS is its own: loading
from disk plus attributing), once per ``--caps`` entry (every feature, or that many feature nodes; ``--repeat N``:
N times, the median run shown), and prints times, peak RSS and the ratios, how far apart the two adjacency matrices
are (feature rows and logit rows separately), and the least GEMM work attribute-ray's backward needs beside this
machine's GEMM rate (a floor on its time here). Needs the `parity` extra.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import (
    Comparison,
    add_model_size,
    parse_args,
    peak_rss_mb,
    print_table,
    run_module,
    seconds,
)

if TYPE_CHECKING:
    from torch import Tensor

IMPLS = ("circuit-tracer", "attribute-ray")
QUICK = dict(layers=2, d_model=32, features=512, k=8, tokens=8, batch_size=64, caps="0,50")


def build(args: argparse.Namespace, workdir: Path) -> None:
    """Write one random Llama-style model, a circuit-tracer transcoder dir and the prompt under `workdir`
    (deterministic): each measured process then loads them from disk, as a user does."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attribute_ray import save_circuit_tracer
    from attribute_ray.tiny import random_transcoder
    from attribute_ray.transcoders import Activation

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=max(4096, args.tokens))
    # circuit-tracer 0.5.0 tells W_U's orientation from its shape: with d_model == vocab it demeans rows, not
    # columns, and every logit row is wrong (docs/method.md, "Defects of the reference implementation")
    assert cfg.vocab_size != cfg.hidden_size, "bench.attribution needs d_model != 64 (the vocabulary size)"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(workdir / "model")
    tc = random_transcoder(args.layers, args.d_model, n_features=args.features, kind="plt",
                           activation=Activation("relu"), seed=0)
    save_circuit_tracer(tc, workdir / "tc")  # stored as ReLU; both sides switch to TopK when loading
    tokens = torch.randint(4, 64, (args.tokens,), generator=torch.Generator().manual_seed(1))
    tokens[0] = 0  # a special id: neither side prepends one
    torch.save(tokens, workdir / "tokens.pt")


def run_one(args: argparse.Namespace) -> dict:
    """Inner process: load the model and transcoder written by `build`, attribute once; the measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    from attribute_ray.tiny import tiny_tokenizer

    torch.set_num_threads(args.threads)
    cap = None if args.cap_run == 0 else args.cap_run
    workdir = Path(args.workdir)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", attn_implementation="eager").eval()
    tok, tc_dir, tokens = tiny_tokenizer(), workdir / "tc", torch.load(workdir / "tokens.pt")
    if args.impl == "circuit-tracer":
        from circuit_tracer.attribution.attribute import attribute
        from circuit_tracer.transcoder.activation_functions import TopK

        from bench.ct_reference import replacement_model

        rm = replacement_model(model, tok, tc_dir)
        del model  # circuit-tracer users hold only the TransformerLens copy
        for t in rm.transcoders:
            t.activation_function = TopK(args.k)
    else:
        from attribute_ray import ReplacementModel, attribute, load_transcoder
        from attribute_ray.transcoders import Activation

        tc = replace(load_transcoder(tc_dir), activation=Activation("topk", k=args.k, relu_before_topk=False))
        rm = ReplacementModel(model, tok, tc)
    before = peak_rss_mb()
    graphs = []
    (took,) = seconds(lambda: graphs.append(attribute(tokens, rm, batch_size=args.batch_size, max_feature_nodes=cap)))
    peak = peak_rss_mb()
    graph = graphs[0]
    n_logits = len(graph.logit_tokens) if args.impl == "circuit-tracer" else graph.n_logits
    torch.save({"adjacency": graph.adjacency_matrix, "n_features": len(graph.selected_features),
                "n_logits": n_logits}, args.save)
    out = {"seconds": took, "peak_mb": peak, "attr_mb": peak - before}
    if args.impl == "attribute-ray":
        rows, cfg = graph.active_features[graph.selected_features], rm.model.config
        head = cfg.hidden_size // cfg.num_attention_heads
        out["gflop"] = projection_gflop(rows[:, 0], rows[:, 1], len(tokens), cfg.hidden_size,
                                        head * cfg.num_attention_heads, head * cfg.num_key_value_heads)
    return out


def projection_gflop(layers: Tensor, positions: Tensor, n_tokens: int, d_model: int, q_width: int, kv_width: int) -> float:
    """The least GEMM work (GFLOP) of attribute-ray's backward for feature rows at `layers`, `positions` [R]: each row is
    pulled back through the attention output and value projections of every layer below its own, on the shortest
    prefix that holds its position (`PREFIX_STEPS`), and through its own layer's at one position (the first step,
    patterns kept). Logit rows, attention patterns and the contraction with sources come on top."""
    from attribute_ray.attribution import PREFIX_STEPS

    step = -(-n_tokens // PREFIX_STEPS)
    n = ((positions // step + 1) * step).clamp(max=n_tokens).double()
    per_layer = 2 * n * d_model * (q_width + kv_width)
    return float((per_layer * layers + 4 * d_model * q_width).sum()) / 1e9


def gemm_rate(threads: int, d_model: int) -> float:
    """This machine's fp32 GEMM rate (GFLOP/s) on `threads` threads, at the backward's shape [4096, D] × [D, D]: the
    best of 10 timings of 10 products."""
    import torch

    torch.set_num_threads(threads)
    a, w = torch.randn(4096, d_model), torch.randn(d_model, d_model)
    took = min(seconds(lambda: [a @ w for _ in range(10)], repeat=10))
    return 10 * 2 * 4096 * d_model**2 / took / 1e9


def median_run(args: list[str], repeat: int) -> dict:
    """`run_one` in a fresh process `repeat` times: the run with the median time."""
    runs = sorted((run_module("bench.attribution", args) for _ in range(repeat)), key=lambda r: r["seconds"])
    return runs[len(runs) // 2]


def difference(ours_file: Path, theirs_file: Path) -> str:
    """How far apart two saved graphs are: max|A_ours − A_ct| / max|A_ct| over the feature rows and the logit rows."""
    import torch

    ours, theirs = torch.load(ours_file), torch.load(theirs_file)
    A, B = ours["adjacency"], theirs["adjacency"]
    if A.shape != B.shape or ours["n_logits"] != theirs["n_logits"]:
        return f"different graphs: {list(A.shape)} vs {list(B.shape)} nodes, {ours['n_logits']} vs {theirs['n_logits']} logits"
    scale, n_f, k = float(B.abs().max()), ours["n_features"], ours["n_logits"]
    feat = (A[:n_f] - B[:n_f]).abs().max() if n_f else 0.0
    logit = (A[-k:] - B[-k:]).abs().max()
    return (f"{A.shape[0]} nodes; max|A_ours − A_ct| / max|A_ct|: feature rows {float(feat) / scale:.1e}, "
            f"logit rows {float(logit) / scale:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.attribution", description=__doc__.splitlines()[0])
    add_model_size(p, layers=8, d_model=512, features=8192)
    p.add_argument("--k", type=int, default=32, help="TopK k")
    p.add_argument("--tokens", type=int, default=32, help="prompt length, BOS included")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--caps", default="0,2000", help="max_feature_nodes of each run, comma-separated; 0: every feature")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each implementation")
    p.add_argument("--repeat", type=int, default=1, help="runs of each case (fresh processes); the median is shown")
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--cap-run", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parse_args(p, QUICK)
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    sizes = ["--layers", args.layers, "--d-model", args.d_model, "--features", args.features, "--k", args.k,
             "--tokens", args.tokens, "--batch-size", args.batch_size, "--threads", args.threads]
    rows, notes = [], []
    time_goal = "<= 0.1" if args.tokens >= 1024 else "<= 0.06"  # the targets: long prompts, short ones
    workdir = tempfile.TemporaryDirectory(prefix="bench-attribution-")
    build(args, Path(workdir.name))
    rate = gemm_rate(args.threads, args.d_model)
    for cap in map(int, args.caps.split(",")):
        with tempfile.TemporaryDirectory() as d:
            r = {impl: median_run([*map(str, sizes), "--impl", impl, "--cap-run", str(cap), "--save", f"{d}/{impl}.pt",
                                   "--workdir", workdir.name], args.repeat)
                 for impl in IMPLS}
            run = "all features" if cap == 0 else f"max_feature_nodes={cap}"
            notes.append(f"{run}: {difference(Path(d) / 'attribute-ray.pt', Path(d) / 'circuit-tracer.pt')}")
        ar, ct = r["attribute-ray"], r["circuit-tracer"]
        floor = ar["gflop"] / rate
        notes.append(f"{run}: the backward is at least {ar['gflop']:.3g} GFLOP of projection GEMMs: at this "
                     f"machine's {rate:.0f} GFLOP/s that alone takes {floor:.2f} s, {floor / ct['seconds']:.3f}× "
                     f"circuit-tracer's time")
        rows += [Comparison(f"{run}: time, ours vs circuit-tracer", ar["seconds"], ct["seconds"], "s", time_goal),
                 Comparison(f"{run}: peak RSS", ar["peak_mb"], ct["peak_mb"], "MB", "<= 0.4"),
                 Comparison(f"{run}: RSS growth during attribution", ar["attr_mb"], max(ct["attr_mb"], 1.0), "MB")]
    print_table(f"model: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer, TopK k={args.k}, "
                f"{args.tokens} tokens, batch {args.batch_size}, {args.threads} threads", rows, notes)


if __name__ == "__main__":
    main()
