"""The activation-caching job's throughput vs a bare forward pass of the same model.

    python -m bench.cache [--layers 6 --d-model 256 --features 2048 --ctx-len 128 --batch-size 8 --n-tokens 100000] [--quick]

Tokens/s on the same windows (the job's, cut from copies of Python's pydoc topics) of (a) a bare
`model(input_ids)` loop at the same batch size on one CPU thread, (b) the library's `encode_windows` in-process
(that forward plus the transcoder encodings: what each actor does before writing; wide transcoders make it much
slower than (a); measured before and after (c), their mean counts, as the shared machine's load drifts), (c) the
job's encode phase with 1 actor (one CPU): from the windows being ready to the last shard written, the actor's
start-up included, and (d) with 2 actors. The notes break the job's time down (the manifest's
`last_run.breakdown`). Starts a local Ray (2 logical CPUs) and shuts it down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
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
    from attribute_ray.corpus import read_texts, token_windows
    from attribute_ray.loading import load_model, load_tokenizer
    from jobs.cache_activations import run

    model_dir, tc_dir = write_tiny_pair(root, layers=args.layers, d_model=args.d_model, features=args.features)
    texts = [text.lower() for text in topics.values()]
    per_copy = sum(len(ids) + 1 for ids in load_tokenizer(str(model_dir))(texts, add_special_tokens=False)["input_ids"])
    corpus = root / "corpus.jsonl"  # enough copies of Python's pydoc topics for n_tokens
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * -(-args.n_tokens // per_copy)))

    torch.set_num_threads(1)  # what one CPU actor gets
    windows = token_windows(load_tokenizer(str(model_dir)), read_texts(str(corpus)), ctx_len=args.ctx_len,
                            n_tokens=args.n_tokens)  # the job's windows
    batches = [torch.from_numpy(windows[i : i + args.batch_size]).long() for i in range(0, len(windows), args.batch_size)]
    model, _ = load_model(str(model_dir))

    def bare() -> None:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b)

    rm = ReplacementModel.from_pretrained(str(model_dir), str(tc_dir))
    load = [os.getloadavg()[0]]
    (t_bare,) = seconds(bare)
    def encode() -> float:
        return seconds(lambda: encode_windows(rm, windows, 0, batch_size=args.batch_size, threshold=0.0, bos=True))[0]

    t_encode = [encode()]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates, notes = {}, []
    for n in (1, 2):
        cfg = CacheConfig(model=str(model_dir), transcoder=str(tc_dir), dataset=str(corpus), n_tokens=args.n_tokens,
                          ctx_len=args.ctx_len, batch_size=args.batch_size, out=str(root / f"cache{n}"),
                          shard_windows=16, num_actors=n, build_features=False)
        last = run(cfg)["last_run"]
        rates[n] = last["encoded_tokens"] / last["encode_seconds"]
        b = last["breakdown"]
        rates[n, "steady"] = last["encoded_tokens"] / (last["encode_seconds"] - b["startup"])
        rest = last["encode_seconds"] - sum(b[k] for k in ("startup", "encode", "gaps", "tail"))
        notes.append(f"job, {n} actor(s), per actor: {last['encode_seconds']:.1f} s = start-up {b['startup']:.1f} "
                     f"(its constructor: {b['actor_init']:.1f} s; it starts during the driver's tokenization) + encode "
                     f"{b['encode']:.1f} + model idle between shards {b['gaps']:.2f} + last shard's write "
                     f"{b['tail']:.2f} + driver {rest:.2f}; shard writing {b['write']:.1f} s in all, overlapped")
        load.append(os.getloadavg()[0])
        if n == 1:  # (b) again right after the job: their mean is the reference (the shared machine's load drifts)
            t_encode.append(encode())
    ray.shutdown()
    rate_bare, rate_encode = windows.size / t_bare, windows.size / (sum(t_encode) / len(t_encode))
    notes.append(f"forward + encode in-process before / after the 1-actor job: "
                 f"{' / '.join(f'{windows.size / t:,.0f}' for t in t_encode)} tok/s")
    notes.append(f"1-min load average before / after each job: {' / '.join(f'{x:.1f}' for x in load)} "
                 f"({os.cpu_count()} cores)")

    return (
        f"model: {args.layers} layers, d_model {args.d_model}, {args.features} features/layer, ctx {args.ctx_len}, "
        f"batch {args.batch_size}, {windows.size:,} tokens ({len(windows)} windows, 16 per shard)",
        [Comparison("forward + encode (in-process) vs bare forward", rate_encode, rate_bare, "tok/s"),
         Comparison("job, 1 actor vs bare forward", rates[1], rate_bare, "tok/s", ">= 0.8"),
         Comparison("job, 1 actor vs forward + encode", rates[1], rate_encode, "tok/s", ">= 0.9"),
         Comparison("job, 1 actor after start-up vs forward + encode", rates[1, "steady"], rate_encode, "tok/s"),
         Comparison("job, 2 actors vs 1 actor", rates[2], rates[1], "tok/s")],
        notes,
    )


if __name__ == "__main__":
    main()
