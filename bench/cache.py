"""The activation-caching job's throughput vs a bare forward pass of the same model.

    python -m bench.cache [--layers 6 --d-model 256 --features 2048 --ctx-len 128 --batch-size 8 --n-tokens 100000] [--quick]

Tokens/s of (a) a bare `model(input_ids)` loop at the same batch size on one CPU thread, (b) the library's
`encode_windows` in-process (that forward plus the transcoder encodings: what each actor does before writing;
wide transcoders make it much slower than (a)), (c) the job's encode phase with 1 actor (one CPU) and (d) with
2 actors. Starts a local Ray (2 logical CPUs) and shuts it down at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import (
    Comparison,
    add_model_size,
    parse_args,
    print_table,
    quiet_ray,
    seconds,
    write_tiny_pair,
)

QUICK = dict(layers=2, d_model=64, features=256, ctx_len=32, batch_size=8, n_tokens=2000)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.splitlines()[0])
    add_model_size(p, layers=6, d_model=256, features=2048)
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--n-tokens", type=int, default=100_000, help="tokens to cache")
    args = parse_args(p, QUICK)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        print_table(*measure(args, Path(tmp)))


def measure(args: argparse.Namespace, root: Path) -> tuple[str, list[Comparison], list[str]]:
    """The four rates with every file under `root`; (title, rows, notes) for `print_table`."""
    quiet_ray()
    from pydoc_data.topics import topics

    import ray
    import torch

    from attribute_ray import ReplacementModel
    from attribute_ray.activation_cache import CacheConfig, encode_windows
    from attribute_ray.loading import load_model
    from jobs.cache_activations import run

    model_dir, tc_dir = write_tiny_pair(root, layers=args.layers, d_model=args.d_model, features=args.features)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text.lower()}) + "\n" for text in topics.values()))

    torch.set_num_threads(1)  # what one CPU actor gets
    windows = torch.randint(4, 64, (args.n_tokens // args.ctx_len, args.ctx_len))
    batches = [windows[i : i + args.batch_size] for i in range(0, len(windows), args.batch_size)]
    model, _ = load_model(str(model_dir))

    def bare() -> None:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b)

    rm = ReplacementModel.from_pretrained(str(model_dir), str(tc_dir))
    (t_bare,) = seconds(bare)
    (t_encode,) = seconds(lambda: encode_windows(rm, windows.numpy(), 0, batch_size=args.batch_size, threshold=0.0,
                                                 bos=True))
    rate_bare, rate_encode = windows.numel() / t_bare, windows.numel() / t_encode

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    for n in (1, 2):
        cfg = CacheConfig(model=str(model_dir), transcoder=str(tc_dir), dataset=str(corpus), n_tokens=args.n_tokens,
                          ctx_len=args.ctx_len, batch_size=args.batch_size, out=str(root / f"cache{n}"),
                          shard_windows=16, num_actors=n, build_features=False)
        last = run(cfg)["last_run"]
        rates[n] = last["encoded_tokens"] / last["encode_seconds"]
    ray.shutdown()

    return (
        f"model: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer, ctx {args.ctx_len}, "
        f"batch {args.batch_size}, {args.n_tokens:,} tokens",
        [Comparison("forward + encode (in-process) vs bare forward", rate_encode, rate_bare, "tok/s"),
         Comparison("job, 1 actor vs bare forward", rates[1], rate_bare, "tok/s", ">= 0.8"),
         Comparison("job, 1 actor vs forward + encode", rates[1], rate_encode, "tok/s"),
         Comparison("job, 2 actors vs 1 actor", rates[2], rates[1], "tok/s")],
        [],
    )


if __name__ == "__main__":
    main()
