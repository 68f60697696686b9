"""Cache transcoder activations over a corpus with Ray Data, then build feature dashboards.

    python -m jobs.cache_activations --model M --transcoder T --dataset D --n-tokens 10_000_000 --ctx-len 256 --out DIR
    ray job submit --working-dir . -- python -m jobs.cache_activations ...   (same flags)

Pipeline: read + tokenize + window (driver, deterministic) → shards of windows → `ShardEncoder` actor pool
(model + transcoder loaded once per actor; one GPU per actor when the cluster has GPUs) → each shard written
in the activation-cache format (`attribute_ray.activation_cache`, docs/formats.md §g), complete or absent.
Re-running resumes: completed shards are skipped. Then `attribute_ray.features.build_feature_store` builds the
dashboards with one Ray task per shard (``--no-features`` skips it; ``python -m jobs.build_features`` reruns it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from attribute_ray import activation_cache as cache
from attribute_ray.activation_cache import CacheConfig
from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.corpus import CorpusError, read_texts, token_windows, writable
from jobs.ray_setup import add_address_flag, init_ray, map_tasks

CRASH_ENV = "ATTRIBUTE_RAY_CRASH_SHARD"


class ShardEncoder:
    """Ray Data actor: loads the replacement model once, encodes whole shards, writes them atomically."""

    def __init__(self, cfg: dict):
        from attribute_ray import ReplacementModel
        from attribute_ray.devices import resolve_device, resolve_dtype

        self.cfg = CacheConfig.model_validate(cfg)
        device = resolve_device(self.cfg.device)
        self.model = ReplacementModel.from_pretrained(self.cfg.model, self.cfg.transcoder, device=device,
                                                      dtype=resolve_dtype("auto", device))

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "n_activations": [], "n_tokens": [], "bytes": []}
        for shard, first, tokens in zip(batch["shard"], batch["first"], batch["tokens"]):
            shard, first, windows = int(shard), int(first), np.stack(tokens).astype(np.int64)
            _fault_hook(shard)
            cfg = self.cfg
            acts = cache.encode_windows(self.model, windows, first, batch_size=cfg.batch_size, threshold=cfg.threshold,
                                        bos=cfg.bos)
            out["shard"].append(shard)
            out["n_activations"].append(acts.num_rows)
            out["n_tokens"].append(int(windows.size))
            out["bytes"].append(cache.write_shard(cfg.out, shard, first, windows, acts))
        return {k: np.asarray(v) for k, v in out.items()}


def _fault_hook(shard: int) -> None:
    """Test hook: ATTRIBUTE_RAY_CRASH_SHARD="<shard>:<marker file>" kills the actor process once on that shard."""
    spec = os.environ.get(CRASH_ENV)
    if spec:
        target, marker = spec.split(":", 1)
        if int(target) == shard and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)


def run(cfg: CacheConfig) -> dict:
    """Run (or resume) the caching job; returns the manifest."""
    from attribute_ray.loading import load_tokenizer

    writable(cfg.out)
    cache.check_resumable(cfg)
    t0 = time.perf_counter()
    windows = token_windows(load_tokenizer(cfg.model),
                            read_texts(cfg.dataset, split=cfg.split, text_column=cfg.text_column),
                            ctx_len=cfg.ctx_len, n_tokens=cfg.n_tokens, bos=cfg.bos, filter_bos=cfg.filter_bos)
    shards = cache.plan_shards(len(windows), cfg.shard_windows)
    summaries: dict[int, dict] = {}
    if not [s for s in shards if s[0] not in cache.completed_shards(cfg.out)]:
        print(f"all shards present ({len(shards)}) in {cfg.out}: nothing to do")
    t_encode = time.perf_counter()
    for _ in range(3):  # a crashed actor's shard is retried by Ray; anything still missing, by us
        done = cache.completed_shards(cfg.out)
        pending = [s for s in shards if s[0] not in done]
        if not pending:
            break
        summaries.update(_encode(cfg, windows, pending))
    t_encode = time.perf_counter() - t_encode
    done = cache.completed_shards(cfg.out)
    missing = [s[0] for s in shards if s[0] not in done]
    if missing:
        raise RuntimeError(f"shards {missing[:20]} failed after 3 attempts")
    cache.remove_temporaries(cfg.out)
    n_act = {sid: summaries[sid]["n_activations"] if sid in summaries else cache.shard_rows(cfg.out, sid)
             for sid, _, _ in shards}
    layer_features = None
    if cfg.build_features:
        from attribute_ray.transcoders import load_transcoder

        tc = load_transcoder(cfg.transcoder)
        layer_features = [tc.n_features(l) for l in range(tc.n_layers)]
    encoded = sum(s["n_tokens"] for s in summaries.values())
    manifest = cache.make_manifest(cfg, len(windows), shards, n_act, layer_features=layer_features,
                                   last_run={"encoded_tokens": encoded, "encode_seconds": t_encode})
    cache.write_manifest(cfg.out, manifest)
    print(f"cached {manifest['n_sequences']} windows × {cfg.ctx_len} tokens in {len(shards)} shards "
          f"({len(summaries)} encoded now at {encoded / max(t_encode, 1e-9):,.0f} tok/s; "
          f"{time.perf_counter() - t0:.1f}s in all), {sum(n_act.values()):,} activations, "
          f"{cache.cache_bytes(cfg.out) / 2**20:.1f} MiB → {cfg.out}")
    return manifest


def _encode(cfg: CacheConfig, windows: np.ndarray, pending: list[tuple[int, int, int]]) -> dict[int, dict]:
    """One Ray Data round over the pending shards; {shard: summary} of those that came back."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    init_ray()
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = 600  # a clear error instead of waiting forever for unschedulable actors
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    n_actors = cfg.num_actors or max(1, int(gpus) if gpus else min(4, int(cpus) // 2 or 1))
    items = [{"shard": sid, "first": first, "tokens": list(windows[first : first + n])} for sid, first, n in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    out = ds.map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"cfg": cfg.model_dump(exclude={"preset"})},
        batch_size=1,
        compute=ActorPoolStrategy(min_size=1, max_size=min(n_actors, len(items))),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
        max_restarts=3,
        max_task_retries=3,
    )
    results: dict[int, dict] = {}
    try:
        for row in out.iter_rows():
            results[int(row["shard"])] = {k: int(row[k]) for k in ("n_activations", "n_tokens", "bytes")}
    except Exception as e:  # noqa: BLE001 - missing shards are retried by the caller
        print(f"encoding round failed ({type(e).__name__}: {str(e)[:300]}); retrying missing shards")
    return results


def _build_features(cfg: CacheConfig) -> None:
    """The dashboard step after caching (default feature settings), one Ray task per shard."""
    from attribute_ray.features import build_feature_store

    if "://" in cfg.out:
        print("feature dashboards read local caches: copy the cache locally, then run "
              "python -m jobs.build_features DIR")
        return
    init_ray()
    index, dashboards = build_feature_store(cfg.out, map_shards=map_tasks)
    print(f"feature dashboards: {len(dashboards):,} features with activations → {index.parent}")


def parse_args(argv: list[str] | None = None) -> CacheConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.cache_activations", description=__doc__.splitlines()[0])
    add_arguments(p, CacheConfig, exclude={"build_features"})
    # the README's spelling for build_features=False
    p.add_argument("--no-features", dest="build_features", action="store_false", default=None,
                   help="skip the dashboard step")
    add_address_flag(p)
    return from_arguments(CacheConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
        if cfg.build_features:
            _build_features(cfg)
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
