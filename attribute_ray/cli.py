"""Command line.

``attribute-ray graph PROMPT --model M --transcoder T -o out.json|out.msgpack``: compute an attribution
graph and write it as Neuronpedia JSON or msgpack (chosen by the suffix).
``attribute-ray info --model M --transcoder T [PROMPT]``: what was loaded and how well it fits a prompt.
Models and transcoders are hub ids or local paths.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _info(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    rm = _load(args)
    tc = rm.transcoder
    kind = "CLT" if tc.is_cross_layer else "PLT"
    print(f"model       {rm.name} ({rm.family.name}, {rm.n_layers} layers, d_model {rm.d_model})")
    print(f"transcoder  {tc.name} [{tc.format}] {kind}{' +skip' if tc.has_skip else ''}, "
          f"{tc.n_features(0)} features/layer, activation {tc.activation.kind}"
          f"{f' k={tc.activation.k}' if tc.activation.k else ''}, reads {tc.hookpoints.input}, writes {tc.hookpoints.output}")
    print(f"loaded in {time.perf_counter() - t0:.1f}s")
    if args.prompt:
        trace = rm.trace(rm.tokenize(args.prompt))
        per_layer = torch.bincount(trace.features.layers, minlength=rm.n_layers).tolist()
        rel = [float(e.norm() / y.norm().clamp_min(1e-12)) for e, y in zip(trace.errors, trace.mlp_outputs)]
        probs = trace.logits[-1].softmax(-1)
        top = probs.topk(5)
        print(f"tokens      {len(trace.tokens)}; active features per layer {per_layer}")
        print("rel. error  " + " ".join(f"{r:.2f}" for r in rel))
        print("next token  " + ", ".join(f"{rm.tokenizer.decode([int(i)])!r} {float(p):.3f}" for p, i in zip(*top)))
    return 0


def _load(args: argparse.Namespace):
    from attribute_ray import ReplacementModel
    from attribute_ray.presets import resolve_preset

    if args.preset:
        preset = resolve_preset(args.preset)
        args.model, args.transcoder = args.model or preset.model, args.transcoder or preset.transcoder
    if not (args.model and args.transcoder):
        raise ValueError("give --model and --transcoder, or --preset NAME")
    return ReplacementModel.from_pretrained(
        args.model, args.transcoder, device=args.device, dtype=DTYPES[args.dtype], transcoder_subfolder=args.subfolder
    )


def _graph(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attribute_ray.attribution import attribute
    from attribute_ray.neuronpedia import write_graph_files

    out = Path(args.output)
    if out.suffix not in (".json", ".msgpack"):
        raise ValueError(f"output must end in .json or .msgpack, got {out.name!r}")
    t0 = time.perf_counter()
    rm = _load(args)
    graph = attribute(
        args.prompt, rm, max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
        max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size, progress=True,
    )
    if out.suffix == ".msgpack":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(graph.to_msgpack())
        tmp.replace(out)
        node_mask, edge_mask, _ = graph.prune(args.node_threshold, args.edge_threshold)
        n_nodes, n_edges = int(node_mask.sum()), int(edge_mask.sum())
    else:
        import json

        write_graph_files(graph, out.parent, out.stem, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
        data = json.loads(out.read_text())
        n_nodes, n_edges = len(data["nodes"]), len(data["links"])
    replacement, completeness = graph.scores()
    print(f"{out}: {n_nodes} nodes, {n_edges} edges after pruning ({graph.n_nodes} nodes before); "
          f"replacement {replacement:.3f}, completeness {completeness:.3f}; {time.perf_counter() - t0:.1f}s")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Start the Serve application on a local Ray (or the cluster at RAY_ADDRESS) until Ctrl-C / SIGINT."""
    import os
    import signal

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    app_args = AppArgs(model=args.model, transcoder=args.transcoder, preset=args.preset, device=args.device,
                       num_replicas=args.num_replicas, api_token=args.api_token,
                       **({"graph_store": args.graph_store} if args.graph_store else {}),
                       **({"feature_store": args.feature_store} if args.feature_store else {}))
    try:
        if not ray.is_initialized():
            # RAY_ADDRESS: deploy onto that cluster; otherwise always our own local instance — never silently
            # join (and, on exit, shut down) whatever Ray happens to run on this machine.
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app_builder(app_args), name="attribute-ray", route_prefix="/")
        print(f"attribute-ray serving {app_args.model} + {app_args.transcoder} on http://{args.host}:{args.port} "
              f"(API docs at /docs). Ctrl-C to stop.", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    except KeyboardInterrupt:  # Ctrl-C while starting
        pass
    print("stopping ...", flush=True)
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF hub id, local directory or .gguf file")
    p.add_argument("--transcoder", help="HF hub id (user/repo[/sub][@rev]) or local directory")
    p.add_argument("--preset", help="a named model + transcoder pair (attribute_ray.presets)")
    p.add_argument("--subfolder", default=None, help="transcoder subfolder inside the repo/directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attribute-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    graph = sub.add_parser("graph", help="compute an attribution graph")
    graph.add_argument("prompt")
    _common(graph)
    graph.add_argument("-o", "--output", required=True, help="out.json (Neuronpedia) or out.msgpack")
    graph.add_argument("--max-feature-nodes", type=int, default=7500)
    graph.add_argument("--max-n-logits", type=int, default=10)
    graph.add_argument("--desired-logit-prob", type=float, default=0.95)
    graph.add_argument("--batch-size", type=int, default=256)
    graph.add_argument("--node-threshold", type=float, default=0.8)
    graph.add_argument("--edge-threshold", type=float, default=0.98)
    graph.set_defaults(func=_graph)
    srv = sub.add_parser("serve", help="serve attribution graphs over HTTP (Ray Serve)")
    srv.add_argument("--model", help="HF hub id, local directory or .gguf file")
    srv.add_argument("--transcoder", help="HF hub id or local directory")
    srv.add_argument("--preset", help="a named model + transcoder pair")
    srv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--num-replicas", type=int, default=1)
    srv.add_argument("--graph-store", default=None, help="directory or fsspec URI for computed graphs")
    srv.add_argument("--api-token", default=None, help="require this bearer token (or env ATTRIBUTE_RAY_API_TOKEN)")
    srv.add_argument("--feature-store", default=None, help="an activation cache dir with dashboards (jobs.build_features)")
    srv.set_defaults(func=_serve)
    info = sub.add_parser("info", help="load a model + transcoder and report on a prompt")
    info.add_argument("prompt", nargs="?", default=None)
    _common(info)
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # a clear one-line error for users; tracebacks with ATTRIBUTE_RAY_DEBUG=1
        import os

        if os.environ.get("ATTRIBUTE_RAY_DEBUG"):
            raise
        print(f"attribute-ray: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
