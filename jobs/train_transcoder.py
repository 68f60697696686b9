"""Train transcoders on a model's own MLP activations with Ray: per-layer (PLT, skip PLT) or an untied CLT.

    python -m jobs.train_transcoder --model M --dataset D --kind skip-plt --out DIR [--steps 1000 ...]
    ray job submit --working-dir . -- python -m jobs.train_transcoder ...   (same flags; DIR on a shared filesystem)

Stages (attribute_ray/training), each resumable by re-running the same command:

1. windows (driver): the corpus as BOS token windows; the last ⌈val_tokens / (ctx_len − 1)⌉ are held out.
2. activations (one Ray task, a GPU when the cluster has one): every layer's MLP input and output, fp16, under
   DIR/activations/ (`--activations` shares one cache between runs).
3. training: one Ray task per layer (plt, skip-plt) or one task for the CLT; checkpoints under
   DIR/checkpoints/; finished layers are skipped, unfinished ones continue from their last checkpoint
   (bit-identical to an uninterrupted run on the same hardware). With --stream, one task (a GPU when the
   cluster has one) runs the model once per step and trains every pending layer online on its activations:
   stage 2 then caches only the held-out windows and a 32k-token initialisation sample.
4. assembly (driver): one transcoder in the sparsify format at DIR/transcoder (`load_transcoder` loads it).
5. evaluation (one Ray task): held-out FVU and L0 per layer, and KL(model ‖ replacement) and next-token
   agreement of the replacement model whose every MLP output is the transcoder's → DIR/report.json.

Test hook: ATTRIBUTE_RAY_TRAIN_FAIL_AFTER=N makes every training task raise after step N (after that
step's checkpoint, if any): an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.corpus import CorpusError, writable
from attribute_ray.files import atomic_write
from attribute_ray.training import (
    FAIL_AFTER_ENV,
    TrainConfig,
    assemble,
    cached_activations,
    check_identity,
    collect_activations,
    evaluate,
    finished_units,
    prepare_windows,
    train_layers,
    train_stream,
    windows_per_step,
    write_transcoder,
)
from jobs.ray_setup import add_address_flag, init_ray


class TrainingFailed(RuntimeError):
    """Some training tasks failed; the others finished or checkpointed (re-run to resume)."""


def _one_task_options() -> tuple[int, dict]:
    """(threads, Ray options) of a single model-running task: a GPU when the cluster has one, else the CPUs of the
    largest node, up to 8. (Not `available_resources`: just after a task ends it can still count that task's CPUs
    as taken, and the next task would run on one thread.)"""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    cpus = 1 if gpus else max(1, min(8, int(node_cpus)))
    return cpus, dict(num_cpus=cpus, num_gpus=1 if gpus else 0, max_retries=2)


def ensure_activations(cfg: TrainConfig) -> dict:
    """Reuse the activation cache, or make it: windows on the driver, the model's activations in one Ray task."""
    import ray

    act_dir = cfg.activations_dir()
    meta = cached_activations(cfg)
    if meta is not None:
        print(f"activations: reusing {act_dir} ({meta['n_train']:,} training + {meta['n_val']:,} held-out tokens, "
              f"{meta['n_layers']} layers)")
        return meta
    t0 = time.perf_counter()
    n_train, n_val = prepare_windows(cfg)
    init_ray(task_output=True)
    threads, options = _one_task_options()
    meta = ray.get(ray.remote(collect_activations).options(**options).remote(cfg.model_dump(), n_train, n_val, threads))
    size = sum(p.stat().st_size for p in act_dir.glob("*.npy"))
    print(f"activations: {meta['n_train']:,} training + {meta['n_val']:,} held-out tokens × {meta['n_layers']} layers "
          f"in {time.perf_counter() - t0:.1f}s ({size / 2**20:.1f} MiB) → {act_dir}")
    return meta


def _print_line(s: dict) -> None:
    resumed = f", resumed from step {s['resumed_from']}" if s.get("resumed_from") else ""
    print(f"layer {s['layer']:>2}: {s['steps']} steps in {s['train_seconds']:.1f}s ({s['tokens_per_s']:,.0f} tok/s{resumed}); "
          f"held-out FVU {s['val_fvu']:.4f}, L0 {s['l0']:.1f}, dead {100 * s['dead_frac']:.1f}%", flush=True)


def train_all(cfg: TrainConfig, meta: dict, fail_after: int | None) -> dict[int, dict]:
    """Train every pending unit, `num_workers` Ray tasks at a time; returns the summary of every finished layer."""
    import ray

    summaries, pending = finished_units(cfg, meta["n_layers"])
    if summaries:
        print(f"finished already: layers {sorted(summaries)}")
    if not pending:
        return summaries
    init_ray(task_output=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = 1 if cfg.stream else cfg.num_workers or max(1, gpus or cpus)
    tokens = windows_per_step(cfg) * (cfg.ctx_len - 1) if cfg.stream else cfg.batch_tokens
    print(f"training {len(pending)} {'CLT' if cfg.kind == 'clt' else cfg.kind + ' layer'}"
          f"{'s' if len(pending) > 1 else ''} on {min(workers, len(pending))} worker(s) "
          f"({'GPU' if gpus else 'CPU'}{', online' if cfg.stream else ''}), {cfg.steps} steps × {tokens} tokens, "
          f"{cfg.n_features(meta['d_model'])} latents, k={cfg.k}, lr {cfg.learning_rate(meta['d_model']):.2e}", flush=True)
    if cfg.stream:  # every unit in one task that runs the model
        threads, options = _one_task_options()
        try:
            done = ray.get(ray.remote(train_stream).options(**options).remote(cfg.model_dump(), pending, threads, fail_after))
        except Exception as e:  # noqa: BLE001 - the units' checkpoints are kept: a re-run resumes
            cause = getattr(e, "cause", None) or e
            raise TrainingFailed(f"online training failed: {type(cause).__name__}: {cause} — re-run the same command "
                                 "to resume") from e
        for s in done:
            summaries[s["layer"]] = s
            _print_line(s)
        return summaries
    task = ray.remote(train_layers).options(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=2)
    running: dict = {}
    errors: list[str] = []
    todo = list(pending)
    while todo or running:
        while todo and len(running) < workers:
            layers = todo.pop(0)
            running[task.remote(cfg.model_dump(), layers, fail_after)] = layers
        ready, _ = ray.wait(list(running), num_returns=1)
        layers = running.pop(ready[0])
        try:
            for s in ray.get(ready[0]):
                summaries[s["layer"]] = s
                _print_line(s)
        except Exception as e:  # noqa: BLE001 - report every failed layer, keep training the others
            cause = getattr(e, "cause", None) or e
            errors.append(f"{cfg.unit_label(layers)}: {type(cause).__name__}: {cause}")
    if errors:
        raise TrainingFailed("training failed for " + "; ".join(errors) + " — re-run the same command to resume")
    return summaries


def _print_report(report: dict) -> None:
    print(f"\n{'layer':>5}  {'FVU':>8}  {'L0':>6}  {'dead':>6}  {'unused':>6}  {'dense':>6}")
    for r in report["layers"]:
        print(f"{r['layer']:>5}  {r['fvu']:>8.4f}  {r['l0']:>6.1f}  {100 * r['dead_frac']:>5.1f}%  "
              f"{100 * r['unused_val_frac']:>5.1f}%  {100 * r['dense_frac']:>5.1f}%")
    print(f"replacement model ({report['n_eval_tokens']:,} held-out tokens): KL(model ‖ replacement) "
          f"{report['kl']:.4f} nats/token, next-token agreement {100 * report['agreement']:.1f}%")


def run(cfg: TrainConfig, *, fail_after: int | None = None) -> dict:
    """Run or resume every stage; returns the report (a partial one, without KL, while layers are missing)."""
    import ray

    out = Path(cfg.out)
    writable(cfg.out)
    check_identity(cfg, write=False)
    if fail_after is None and os.environ.get(FAIL_AFTER_ENV):
        fail_after = int(os.environ[FAIL_AFTER_ENV])
    t0 = time.perf_counter()
    meta = ensure_activations(cfg)
    check_identity(cfg, write=True)
    summaries = train_all(cfg, meta, fail_after)
    L = meta["n_layers"]
    missing = [l for l in range(L) if l not in summaries]
    base = {"kind": cfg.kind, "model": cfg.model, "dataset": cfg.dataset, "n_layers": L, "d_model": meta["d_model"],
            "n_features": cfg.n_features(meta["d_model"]), "k": cfg.k, "steps": cfg.steps, "batch_tokens": cfg.batch_tokens,
            "ctx_len": cfg.ctx_len, "stream": cfg.stream, "auxk_alpha": cfg.auxk_alpha, "dead_tokens": cfg.dead_tokens,
            "normalize_decoder": cfg.normalize_decoder,
            "lr": cfg.learning_rate(meta["d_model"]), "n_train_tokens": meta["n_train"], "n_val_tokens": meta["n_val"],
            "transcoder": None, "training": [summaries[l] for l in sorted(summaries)]}
    if missing:
        print(f"layers {missing} are not trained yet: the transcoder is assembled once every layer is done")
        return {**base, "missing_layers": missing}
    path = write_transcoder(assemble(cfg, meta), out / "transcoder", meta["model_type"])
    init_ray(task_output=True)
    threads, options = _one_task_options()
    ev = ray.get(ray.remote(evaluate).options(**options).remote(cfg.model_dump(), threads))
    for r in ev["layers"]:
        r["dead_frac"] = summaries[r["layer"]]["dead_frac"]
    report = {**base, "transcoder": str(path), "dtype": cfg.dtype, **ev, "seconds": time.perf_counter() - t0}
    atomic_write(out / "report.json", json.dumps(report, indent=2))
    _print_report(report)
    print(f"transcoder → {path}; report → {out / 'report.json'}")
    return report


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The flags are `TrainConfig`'s fields; --layers takes ranges (0,2-4); --features and --expansion exclude
    each other."""
    p = argparse.ArgumentParser(prog="python -m jobs.train_transcoder", description=__doc__.splitlines()[0])
    size = {"features", "expansion"}
    add_arguments(p, TrainConfig, exclude=size | {"layers"})
    add_arguments(p.add_mutually_exclusive_group(), TrainConfig, exclude=set(TrainConfig.model_fields) - size)
    p.add_argument("--layers", help=TrainConfig.model_fields["layers"].description)
    add_address_flag(p)
    return from_arguments(TrainConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (CorpusError, ValueError, TrainingFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
