"""Command line.

``attribute-ray graph PROMPT --model M --transcoder T -o out.json|out.msgpack``: compute an attribution
graph and write it as Neuronpedia JSON or msgpack (chosen by the suffix), its features labelled by a feature
store's explanations when one is given (``--features DIR``, or the preset's).
``attribute-ray info --model M --transcoder T [PROMPT]``: what was loaded and how well it fits a prompt.
Models and transcoders are hub ids or local paths, or come from ``--preset NAME``. The graph flags are the
fields of `GraphSettings` (generated, with the same defaults as the library and the service). Commands that
need Ray (``serve``) live in deployments/ and are added by its entry point through ``main(commands=...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.devices import DTYPES
from attribute_ray.settings import GraphSettings

CommandAdder = Callable[[argparse._SubParsersAction], None]
"""Registers one subcommand: ``subparsers.add_parser(...)`` with ``set_defaults(func=fn)``, fn(args) -> exit code."""


def _load(args: argparse.Namespace):
    """(ReplacementModel, feature store folder or None) of the model flags."""
    from attribute_ray import ReplacementModel
    from attribute_ray.devices import resolve_device, resolve_dtype
    from attribute_ray.presets import resolve_refs

    refs = resolve_refs(args.preset, args.model, args.transcoder, getattr(args, "features", None))
    device = resolve_device(args.device)
    rm = ReplacementModel.from_pretrained(refs.model, refs.transcoder, device=device,
                                          dtype=resolve_dtype(args.dtype, device), transcoder_subfolder=args.subfolder)
    return rm, refs.feature_store


def _info(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    rm, _ = _load(args)
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


def _graph(args: argparse.Namespace) -> int:
    from attribute_ray.attribution import attribute
    from attribute_ray.explanations.store import feature_labels
    from attribute_ray.files import atomic_write
    from attribute_ray.neuronpedia import write_graph_files

    out = Path(args.output)
    if out.suffix not in (".json", ".msgpack"):
        raise ValueError(f"output must end in .json or .msgpack, got {out.name!r}")
    settings = from_arguments(GraphSettings, args)
    t0 = time.perf_counter()
    rm, feature_store = _load(args)
    graph = attribute(args.prompt, rm, settings=settings, progress=True)
    if feature_store:
        graph.label_features(feature_labels(feature_store))
    if out.suffix == ".msgpack":
        atomic_write(out, graph.to_msgpack())
        node_mask, edge_mask, _ = graph.prune(settings.node_threshold, settings.edge_threshold)
        n_nodes, n_edges = int(node_mask.sum()), int(edge_mask.sum())
    else:
        write_graph_files(graph, out.parent, out.stem, **settings.pruning().model_dump())
        data = json.loads(out.read_text())
        n_nodes, n_edges = len(data["nodes"]), len(data["links"])
    replacement, completeness = graph.scores()
    print(f"{out}: {n_nodes} nodes, {n_edges} edges after pruning ({graph.n_nodes} nodes before); "
          f"replacement {replacement:.3f}, completeness {completeness:.3f}; {time.perf_counter() - t0:.1f}s")
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF hub id, local directory or .gguf file")
    p.add_argument("--transcoder", help="HF hub id (user/repo[/sub][@rev]) or local directory")
    p.add_argument("--preset", help="a named model + transcoder pair (attribute_ray.presets); --model and "
                   "--transcoder win over its halves")
    p.add_argument("--subfolder", default=None, help="transcoder subfolder inside the repo/directory")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")


def add_graph(subparsers: argparse._SubParsersAction) -> None:
    """Register ``graph``."""
    p = subparsers.add_parser("graph", help="compute an attribution graph")
    p.add_argument("prompt")
    _model_flags(p)
    p.add_argument("-o", "--output", required=True, help="out.json (Neuronpedia) or out.msgpack")
    p.add_argument("--features", default=None, help="a feature store (jobs.build_features, jobs.explain_features): "
                   "its explanations label the graph's features (default: the preset's store)")
    add_arguments(p.add_argument_group("graph settings"), GraphSettings)
    p.set_defaults(func=_graph)


def add_info(subparsers: argparse._SubParsersAction) -> None:
    """Register ``info``."""
    p = subparsers.add_parser("info", help="load a model + transcoder and report on a prompt")
    p.add_argument("prompt", nargs="?", default=None)
    _model_flags(p)
    p.set_defaults(func=_info)


def main(argv: Sequence[str] | None = None, *, commands: Sequence[CommandAdder] = ()) -> int:
    """Run ``attribute-ray``: the library's commands (graph, info) plus `commands` (e.g. deployments' ``serve``).
    Returns the exit code; errors print one line (a traceback with ATTRIBUTE_RAY_DEBUG=1)."""
    parser = argparse.ArgumentParser(prog="attribute-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_graph, add_info, *commands):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if os.environ.get("ATTRIBUTE_RAY_DEBUG"):
            raise
        print(f"attribute-ray: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
