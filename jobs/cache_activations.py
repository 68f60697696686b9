"""Cache transcoder activations over a corpus with Ray Data, then build feature dashboards.

    python -m jobs.cache_activations --model M --transcoder T --dataset D --n-tokens 10_000_000 --ctx-len 256 --out DIR
    ray job submit --working-dir . -- python -m jobs.cache_activations ...   (same flags)

Pipeline: read + tokenize + window (driver, deterministic) → shards of windows → a pool of `ShardEncoder` Ray
actors spread over the nodes (model + transcoder loaded once per actor; one GPU per actor when the cluster has
GPUs) → each shard written in the activation-cache format (`attribute_ray.activation_cache`, docs/formats.md §g),
complete or absent. A shard whose actor or node dies is re-queued to a live actor. Re-running resumes: completed
shards are skipped. Then `attribute_ray.features.build_feature_store` builds the
dashboards with one Ray task per shard (``--no-features`` skips it; ``python -m jobs.build_features`` reruns it).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from attribute_ray import activation_cache as cache
from attribute_ray.activation_cache import CacheConfig
from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.corpus import CorpusError, read_texts, token_windows, writable
from jobs.ray_setup import add_address_flag, init_ray, map_tasks

CRASH_ENV = "ATTRIBUTE_RAY_CRASH_SHARD"
SHARD_ATTEMPTS = 4  # runs of one shard whose actors keep dying, before the round fails
ENCODER_WAIT_S = 1800.0  # no shard finishing for this long (actors that cannot be placed): an error, not a hang
PIPELINE = 2  # shards in flight per actor: one on the model while the one before is written


class ShardEncoder:
    """Ray actor: loads the replacement model once, encodes whole shards, writes each one atomically.

    Runs `PIPELINE` calls at once (a threaded actor): one holds the model while the one before writes its shard
    (parquet compression releases the GIL), and the next shard's windows are already there when the model is
    free. A call returns once its shard is written. Its one constructor argument is the small config dict, passed
    inline: Ray can restart the actor (after a crash, or on another node after its node is lost) from it alone,
    with nothing in the object store to lose."""

    def __init__(self, cfg: dict):
        t0 = time.perf_counter()
        import torch

        from attribute_ray import ReplacementModel
        from attribute_ray.devices import resolve_device, resolve_dtype

        self.cfg = CacheConfig.model_validate(cfg)
        device = resolve_device(self.cfg.device)
        self.model = ReplacementModel.from_pretrained(self.cfg.model, self.cfg.transcoder, device=device,
                                                      dtype=resolve_dtype("auto", device))
        self.lock = threading.Lock()  # one shard on the model at a time
        self.info = {"init_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "device": str(device)}

    def ready(self) -> dict:
        return self.info

    def encode(self, shard: int, first: int, windows: np.ndarray) -> dict:
        """Encode and write shard `shard` (token windows [n, ctx_len] starting at sequence `first`); its summary,
        with when (epoch seconds) it took the model (`start`), released it (`encoded`) and was written (`end`)."""
        _fault_hook(shard)
        cfg = self.cfg
        with self.lock:
            start = time.time()
            acts = cache.encode_windows(self.model, windows, first, batch_size=cfg.batch_size,
                                        threshold=cfg.threshold, bos=cfg.bos)
            encoded = time.time()
        n_bytes = cache.write_shard(cfg.out, shard, first, windows, acts)
        return {"shard": shard, "n_activations": acts.num_rows, "n_tokens": int(windows.size), "bytes": n_bytes,
                "start": start, "encoded": encoded, "end": time.time(), **self.info}


def _fault_hook(shard: int) -> None:
    """Test hook: ATTRIBUTE_RAY_CRASH_SHARD="<shard>:<marker file>" kills the actor process once on that shard."""
    spec = os.environ.get(CRASH_ENV)
    if spec:
        target, marker = spec.split(":", 1)
        if int(target) == shard and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)


def run(cfg: CacheConfig) -> dict:
    """Run (or resume) the caching job; returns the manifest. On a fresh run the actors start (and load the model)
    while the driver tokenizes the corpus, once its first document has been read."""
    from attribute_ray.loading import load_tokenizer

    writable(cfg.out)
    cache.check_resumable(cfg)
    t0 = time.perf_counter()
    texts = read_texts(cfg.dataset, split=cfg.split, text_column=cfg.text_column)
    first = next(texts, None)  # a missing dataset or column fails here, before Ray starts
    early = None
    if first is not None and not cache.completed_shards(cfg.out):
        most = -(-cfg.n_tokens // (cfg.ctx_len - 1))  # windows, at most
        early = _start_pool(cfg, -(-most // cfg.shard_windows))
    try:
        windows = token_windows(load_tokenizer(cfg.model), itertools.chain([first] if first else [], texts),
                                ctx_len=cfg.ctx_len, n_tokens=cfg.n_tokens, bos=cfg.bos, filter_bos=cfg.filter_bos)
    except BaseException:
        _kill(early)
        raise
    shards = cache.plan_shards(len(windows), cfg.shard_windows)
    summaries: dict[int, dict] = {}
    if not [s for s in shards if s[0] not in cache.completed_shards(cfg.out)]:
        print(f"all shards present ({len(shards)}) in {cfg.out}: nothing to do")
    t_encode, breakdown = time.perf_counter(), Counter()
    for _ in range(3):  # a dead actor's shard is re-queued within a round; a failed round, re-run here
        done = cache.completed_shards(cfg.out)
        pending = [s for s in shards if s[0] not in done]
        if not pending:
            break
        results, seconds = _encode(cfg, windows, pending, early or _start_pool(cfg, len(pending)))
        early = None
        summaries.update(results)
        breakdown.update(seconds)
    _kill(early)
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
    last_run = {"encoded_tokens": encoded, "encode_seconds": t_encode, "breakdown": dict(breakdown),
                "devices": sorted({s["device"] for s in summaries.values()})}
    manifest = cache.make_manifest(cfg, len(windows), shards, n_act, layer_features=layer_features, last_run=last_run)
    cache.write_manifest(cfg.out, manifest)
    print(f"cached {manifest['n_sequences']} windows × {cfg.ctx_len} tokens in {len(shards)} shards "
          f"({len(summaries)} encoded now at {encoded / max(t_encode, 1e-9):,.0f} tok/s; "
          f"{time.perf_counter() - t0:.1f}s in all), {sum(n_act.values()):,} activations, "
          f"{cache.cache_bytes(cfg.out) / 2**20:.1f} MiB → {cfg.out}")
    return manifest


def _start_pool(cfg: CacheConfig, n_shards: int) -> tuple[list, float]:
    """(`ShardEncoder` actors spread over the cluster's nodes, their creation time): one per GPU, else CPUs/2 up
    to 4, or `cfg.num_actors`; never more than `n_shards`. They load the model in the background."""
    import ray

    init_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    n_actors = min(n_shards, cfg.num_actors or max(1, int(gpus) if gpus else min(4, int(cpus) // 2 or 1)))
    encoder = ray.remote(ShardEncoder).options(
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,  # docs/ray-notes.md #3, #4
        scheduling_strategy="SPREAD",  # one model copy per node before two on one
        max_restarts=3, max_task_retries=0,  # a lost call comes back here and is re-queued to any live actor
        max_concurrency=PIPELINE)
    cfg_dict = cfg.model_dump(exclude={"preset"})
    return [encoder.remote(cfg_dict) for _ in range(n_actors)], time.time()


def _kill(pool: tuple[list, float] | None) -> None:
    if pool:
        import ray

        for actor in pool[0]:
            ray.kill(actor)


def _encode(cfg: CacheConfig, windows: np.ndarray, pending: list[tuple[int, int, int]],
            pool: tuple[list, float]) -> tuple[dict[int, dict], dict[str, float]]:
    """One round over the pending shards on a `_start_pool` pool, killed at the end: ({shard: summary} of those
    written, `time_breakdown`). A shard whose actor died (its process, or its whole node) goes back to the queue
    and is written by a live actor; the dead actor is restarted by Ray where resources allow and rejoins."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError

    began = time.time()
    actors, created = pool
    queue, idle = deque(pending), list(actors) * PIPELINE  # an actor's free call slots
    calls: dict = {}  # ObjectRef → (actor, shard tuple, or None for a readiness probe)
    attempts: Counter[int] = Counter()
    probes: Counter[int] = Counter()
    results: dict[int, dict] = {}
    try:
        while queue or any(work is not None for _, work in calls.values()):
            while queue and idle:
                actor, (sid, first, n) = idle.pop(), queue.popleft()
                attempts[sid] += 1
                calls[actor.encode.remote(sid, first, windows[first : first + n])] = (actor, (sid, first, n))
            if not calls:
                raise RuntimeError(f"every encoder actor is gone with {len(queue)} shards left")
            done, _ = ray.wait(list(calls), num_returns=1, timeout=ENCODER_WAIT_S)
            if not done:
                raise GetTimeoutError(f"no shard finished in {ENCODER_WAIT_S:.0f} s (actors that cannot be placed?)")
            actor, work = calls.pop(done[0])
            try:
                summary = ray.get(done[0])
                if work is not None:
                    results[summary["shard"]] = {**summary, "actor": actors.index(actor)}
                idle.append(actor)
            except RayError as e:
                if work is not None:
                    if attempts[work[0]] >= SHARD_ATTEMPTS or not isinstance(e, RayActorError):
                        raise RuntimeError(f"shard {work[0]} failed {attempts[work[0]]} time(s): {e}") from e
                    print(f"shard {work[0]}: its actor died ({type(e).__name__}); re-queued")
                    queue.appendleft(work)
                key = actors.index(actor)
                probes[key] += 1
                if probes[key] <= 4 * PIPELINE:  # each slot comes back once Ray has restarted it; dropped when gone
                    calls[actor.ready.remote()] = (actor, None)
    except Exception as e:  # noqa: BLE001 - the caller re-runs the shards still missing
        print(f"encoding round failed ({type(e).__name__}: {str(e)[:300]}); retrying missing shards")
    finally:
        _kill(pool)
    return results, time_breakdown(max(created, began), time.time(), list(results.values()))


def time_breakdown(since: float, finished: float, summaries: list[dict]) -> dict[str, float]:
    """Where one round's wall time (`since` → `finished`, epoch seconds) went, per actor on average, in seconds:
    `startup` (until the actor's model took its first shard), `encode` (the model busy), `gaps` (the model idle
    between shards: the driver's round trip, the windows' transfer), `tail` (the last shard's write, its result
    back); these four sum to the wall time. Also `write` (every shard's writing, overlapped with the next shard's
    encoding) and `actor_init` (the actor's constructor: imports, model loading)."""
    parts = dict.fromkeys(("startup", "encode", "gaps", "tail", "write", "actor_init"), 0.0)
    by_actor: dict[int, list[dict]] = {}
    for s in summaries:
        by_actor.setdefault(s["actor"], []).append(s)
    for calls in by_actor.values():
        calls.sort(key=lambda s: s["start"])
        parts["startup"] += calls[0]["start"] - since
        parts["encode"] += sum(s["encoded"] - s["start"] for s in calls)
        parts["gaps"] += sum(b["start"] - a["encoded"] for a, b in zip(calls, calls[1:]))
        parts["tail"] += finished - calls[-1]["encoded"]
        parts["write"] += sum(s["end"] - s["encoded"] for s in calls)
        parts["actor_init"] += calls[0]["init_s"]
    return {k: round(v / max(len(by_actor), 1), 3) for k, v in parts.items()}


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
