"""The caching job's throughput vs a bare forward pass of the same model (not a test; nothing asserts).

    python bench/cache.py [--layers 6 --d-model 256 --features 2048 --ctx-len 128 --batch-size 8 --n-tokens 100000]

Reports tokens/s of (a) a bare `model(input_ids)` loop at the same batch size on one CPU thread, (b) that
forward plus the transcoder encodings (the job's irreducible work; wide transcoders make it much slower than
(a)), (c) the job's encode phase with 1 actor (one CPU), (d) with 2 actors; and the ratios.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-tokens", type=int, default=100_000)
    args = p.parse_args()

    import ray
    import torch

    from bench.serve import make_pair
    from jobs.cache_activations import CacheConfig, run

    root = Path(tempfile.mkdtemp())
    model_dir, tc_dir = make_pair(argparse.Namespace(layers=args.layers, d_model=args.d_model, features=args.features), root)
    corpus = root / "corpus.jsonl"
    from pydoc_data.topics import topics

    with corpus.open("w") as f:
        for text in topics.values():
            f.write(json.dumps({"text": text.lower()}) + "\n")

    # (a) bare forward on the same windows and batch size, one thread (what one CPU actor gets)
    from attribute_ray.replacement import load_model

    torch.set_num_threads(1)
    model, _ = load_model(str(model_dir))
    windows = torch.randint(4, 64, (args.n_tokens // args.ctx_len, args.ctx_len))
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(windows), args.batch_size):
            model(input_ids=windows[i : i + args.batch_size])
    bare = windows.numel() / (time.perf_counter() - t0)
    # (b) the irreducible work of the job: the same forward plus the transcoder encodings, in-process
    from attribute_ray import ReplacementModel

    rm = ReplacementModel.from_pretrained(str(model_dir), str(tc_dir))
    t0 = time.perf_counter()
    for i in range(0, len(windows), args.batch_size):
        for layer, x in enumerate(rm.input_activations(windows[i : i + args.batch_size])):
            rm.transcoder.encode_sparse(layer, x.reshape(-1, x.shape[-1]))
    compute = windows.numel() / (time.perf_counter() - t0)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    for n in (1, 2):
        cfg = CacheConfig(model=str(model_dir), transcoder=str(tc_dir), dataset=str(corpus), n_tokens=args.n_tokens,
                          ctx_len=args.ctx_len, batch_size=args.batch_size, out=str(root / f"cache{n}"),
                          shard_windows=16, num_actors=n, build_features=False)
        m = run(cfg)
        rates[n] = m["last_run"]["encoded_tokens"] / m["last_run"]["encode_seconds"]
    ray.shutdown()
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer, ctx {args.ctx_len}, "
          f"batch {args.batch_size}, {args.n_tokens:,} tokens")
    print(f"{'':<34}{'tokens/s':>10}{'ratio':>8}")
    print(f"{'bare forward, 1 thread':<34}{bare:>10,.0f}")
    print(f"{'forward + transcoder encode':<34}{compute:>10,.0f}{compute / bare:>8.2f}  vs bare forward")
    print(f"{'job, 1 actor (1 CPU)':<34}{rates[1]:>10,.0f}{rates[1] / bare:>8.2f}  vs bare forward (goal >= 0.8)")
    print(f"{'':<34}{'':>10}{rates[1] / compute:>8.2f}  vs forward + encode")
    print(f"{'job, 2 actors (1 CPU each)':<34}{rates[2]:>10,.0f}{rates[2] / rates[1]:>8.2f}  vs 1 actor")


if __name__ == "__main__":
    main()
