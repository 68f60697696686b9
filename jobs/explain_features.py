"""Explain the features of an activation cache with Ray: a short, scored label per feature in its feature store.

    python -m jobs.explain_features CACHE_DIR [--explainer tokens|llm|self] [--endpoint URL --llm-model NAME] ...
    ray job submit --working-dir . -- python -m jobs.explain_features CACHE_DIR ...   (same flags)

tokens and llm: one Ray task per chunk of features; llm keeps at most `--concurrency` chat requests in flight over
all tasks. self: one actor holds the model (the cache manifest's model and transcoder, or --model/--transcoder)
and explains chunk after chunk. Each chunk's explanations are written atomically into the feature store
(docs/formats.md §l) as it comes back, so a rerun skips what is done. A dead endpoint stops the run: what was
explained stays, the job says how many features are left and exits with status 1. The work is
``attribute_ray.explanations.explain_cache``; this file only schedules it on Ray.
"""

from __future__ import annotations

import argparse

from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.explanations import ExplainReport, ExplainSettings, explain_cache, explain_chunk, make_explainer
from jobs.ray_setup import add_address_flag, init_ray, map_tasks


class SelfExplainActor:
    """Ray actor: loads the replacement model once and runs the self explainer over chunks of features."""

    def __init__(self, cache_dir: str, store: str | None, settings: dict, model: str, transcoder: str, device: str):
        from attribute_ray import ReplacementModel
        from attribute_ray.devices import resolve_device, resolve_dtype
        from attribute_ray.explanations.records import decoder

        dev = resolve_device(device)
        rm = ReplacementModel.from_pretrained(model, transcoder, device=dev, dtype=resolve_dtype("auto", dev))
        self.cache_dir, self.store, self.settings = cache_dir, store, ExplainSettings.model_validate(settings)
        self.explainer = make_explainer(self.settings, rm)
        self.decode = decoder(rm.tokenizer)

    def explain(self, keys: list[tuple[int, int]]):
        return explain_chunk(self.cache_dir, keys, self.settings, self.explainer, decode=self.decode,
                             store_dir=self.store)


def run(cache_dir: str, settings: ExplainSettings, *, store: str | None = None, model: str | None = None,
        transcoder: str | None = None, device: str = "auto", keys: list[tuple[int, int]] | None = None) -> ExplainReport:
    """Explain every feature of the cache (or of `keys`) that `settings.explainer` has not explained yet."""
    import ray

    init_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if settings.explainer == "self":
        from attribute_ray.activation_cache import read_manifest

        manifest = read_manifest(cache_dir)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(SelfExplainActor).remote(
            cache_dir, store, settings.model_dump(), model or manifest["model"], transcoder or manifest["transcoder"], device)
        map_chunks, wave = (lambda chunks: ray.get([actor.explain.remote(c) for c in chunks])), 1
    else:
        wave = cpus if settings.explainer == "tokens" else min(cpus, settings.concurrency)
        threads = 1 if settings.explainer == "tokens" else max(1, settings.concurrency // wave)

        def task(keys: list[tuple[int, int]]):
            return explain_chunk(cache_dir, keys, settings, threads=threads, store_dir=store)

        map_chunks = lambda chunks: map_tasks(task, [(c,) for c in chunks])  # noqa: E731
    return explain_cache(cache_dir, settings, map_chunks, wave=wave, store_dir=store, keys=keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.explain_features", description=__doc__.splitlines()[0])
    p.add_argument("cache_dir", help="an activation cache (python -m jobs.cache_activations --out)")
    add_arguments(p, ExplainSettings)
    p.add_argument("--store", default=None, help="the feature store to read logits from and write into (default: the "
                   "one beside the cache)")
    p.add_argument("--model", default=None, help="self: the model (default: the cache manifest's)")
    p.add_argument("--transcoder", default=None, help="self: the transcoder (default: the cache manifest's)")
    p.add_argument("--device", default="auto", help="self: the model's device: auto, cpu, cuda, cuda:N")
    p.add_argument("--graph", default=None, help="only the features of this graph (.msgpack), most influential first")
    p.add_argument("--top", type=int, default=None, help="with --graph: only its N most influential features")
    add_address_flag(p)
    args = p.parse_args(argv)
    try:
        settings = from_arguments(ExplainSettings, args)
    except ValueError as e:
        p.error(str(e))
    keys = None
    if args.graph:
        from pathlib import Path

        from attribute_ray.graph import Graph

        keys = Graph.from_msgpack(Path(args.graph).read_bytes()).top_features(args.top)
    report = run(args.cache_dir, settings, store=args.store, model=args.model, transcoder=args.transcoder,
                 device=args.device, keys=keys)
    where = args.store or args.cache_dir
    print(f"explanations ({settings.explainer}): {report.done:,} written, {report.left:,} left "
          f"in {report.seconds:.1f}s → {where}")
    if report.error:
        print(f"stopped: {report.error}; {report.left:,} features left: rerun the same command to resume")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
