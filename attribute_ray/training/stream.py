"""Online training: the model runs once per step on a batch of training windows, and every pending unit takes
one step on that batch's MLP inputs and outputs. Nothing but the held-out windows and a small initialisation
sample is cached (`activations.stream_cached_windows`), so the run's length is bounded by time, not disk:
2M tokens of every layer of SmolLM2-135M would be 138 GB of fp16 activations.

Step t reads the windows `Batches(n_windows, batch_tokens // (ctx_len − 1), seed)(t)`: seeded per-epoch
permutations, stateless, so a run resumed from its checkpoints is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

from attribute_ray.devices import resolve_dtype
from attribute_ray.loading import load_model
from attribute_ray.replacement import ReplacementModel
from attribute_ray.training.activations import read_meta
from attribute_ray.training.config import TrainConfig
from attribute_ray.training.loop import Batches, Progress, UnitTrainer, interrupt_if
from attribute_ray.transcoders import Hookpoints


def windows_per_step(cfg: TrainConfig) -> int:
    """Whole windows per step: ⌊batch_tokens / (ctx_len − 1)⌋, at least 1 (each window gives ctx_len − 1 rows)."""
    return max(1, cfg.batch_tokens // (cfg.ctx_len - 1))


def train_stream(cfg_dict: dict, units: list[list[int]], threads: int = 1, fail_after: int | None = None) -> list[dict]:
    """Train (or resume) `units` together, online; returns one summary per layer. Called in a Ray task (a GPU
    when the cluster has one)."""
    cfg = TrainConfig.model_validate(cfg_dict)
    act = cfg.activations_dir()
    meta = read_meta(act)
    device = cfg.torch_device(threads)
    trainers = [UnitTrainer(cfg, meta, layers, device) for layers in units]
    active = [t for t in trainers if t.summary is None]
    T, D = meta["ctx_len"], meta["d_model"]
    tokens_per_step = windows_per_step(cfg) * (T - 1)
    if active:
        model, _ = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.model_dtype, device))
        rm = ReplacementModel(model, None, None, hookpoints=Hookpoints("mlp_in", "mlp_out"))
        windows = np.load(act / "windows.npy")[: meta["n_train_windows"]]
        batches = Batches(len(windows), windows_per_step(cfg), cfg.seed)
        start = min(t.start for t in active)  # units are saved together; one that is ahead skips what it has seen
        depth = 1 + max(l for t in active for l in t.layers)  # the forward stops after the highest layer trained
        progress = Progress(f"{cfg.kind} stream, {len(active)} unit{'s' * (len(active) > 1)}", cfg.steps, start)
        for step in range(start, cfg.steps):
            tokens = torch.from_numpy(windows[batches(step)].astype(np.int64)).to(device)
            with torch.no_grad():
                cap = rm.capture(tokens, outputs=True, n_layers=depth)
            emas = []
            for t in active:
                if step >= t.start:
                    xs = [cap.inputs[l][:, 1:].reshape(-1, D).float() for l in t.layers]
                    ys = [cap.outputs[l][:, 1:].reshape(-1, D).float() for l in t.layers]
                    emas.append(t.step(step, xs, ys))
            del cap
            progress(step + 1, float(np.mean(emas)) if emas else float("nan"), tokens_per_step)
            for t in active:
                if step >= t.start:
                    t.checkpoint(step + 1)
            interrupt_if(fail_after, step + 1, cfg, "stream")
    return [s for t in trainers for s in t.finish(tokens_per_step)]
