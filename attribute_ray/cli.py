"""Command line: ``attribute-ray info --model M --transcoder T [PROMPT]``.

Loads a model + transcoder (hub ids or local paths), prints what was loaded and, given a prompt, the
replacement model's fit on it: active features per layer, relative error norm, top next tokens.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _info(args: argparse.Namespace) -> int:
    from attribute_ray import ReplacementModel

    t0 = time.perf_counter()
    rm = ReplacementModel.from_pretrained(
        args.model, args.transcoder, device=args.device, dtype=DTYPES[args.dtype], transcoder_subfolder=args.subfolder
    )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attribute-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="load a model + transcoder and report on a prompt")
    info.add_argument("prompt", nargs="?", default=None)
    info.add_argument("--model", required=True, help="HF hub id, local directory or .gguf file")
    info.add_argument("--transcoder", required=True, help="HF hub id (user/repo[/sub][@rev]) or local directory")
    info.add_argument("--subfolder", default=None, help="transcoder subfolder inside the repo/directory")
    info.add_argument("--device", default="cpu")
    info.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
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
