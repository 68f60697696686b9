"""Evaluation of a saved transcoder on the held-out windows: per-layer FVU / L0 / never-active and dense
fractions, and KL(model ‖ replacement) and next-token agreement of the replacement model whose every MLP output is the
transcoder's (no error terms; docs/method.md §1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from attribute_ray.devices import resolve_dtype
from attribute_ray.loading import load_model
from attribute_ray.replacement import Replaced, ReplacementModel
from attribute_ray.training.activations import read_meta
from attribute_ray.training.config import TrainConfig
from attribute_ray.transcoders import Transcoder, load_transcoder

DENSE_FREQUENCY = 0.1  # a latent active on more than this fraction of held-out tokens is "dense"


def replacement_logits(model: nn.Module, transcoder: Transcoder, tokens: Tensor) -> Tensor:
    """Logits [B, T, V] of the replacement model on token windows [B, T]: every MLP output ← transcoder(live
    MLP inputs); position 0 keeps the real MLP output (no features there)."""
    return ReplacementModel(model, None, transcoder).run(Replaced(None), tokens).logits


def _layer_metrics(tc: Transcoder, act: Path, meta: dict, device: torch.device) -> list[dict]:
    """Held-out FVU, L0, never-active fraction and dense fraction (active on > `DENSE_FREQUENCY` of the tokens) of
    each layer of `tc` on the cached activations."""
    L, n = meta["n_layers"], meta["n_val"]
    xs = [torch.from_numpy(np.load(act / f"val_in_{l}.npy").astype(np.float32)) for l in range(L)]
    layers = []
    for t in range(L):
        y = torch.from_numpy(np.load(act / f"val_out_{t}.npy").astype(np.float32)).double()
        err, fires = 0.0, torch.zeros(tc.n_features(t), dtype=torch.float64)  # tokens each latent is active on
        for a in range(0, n, 4096):
            chunk = [x[a : a + 4096].to(device) for x in xs]
            acts = {s: tc.encode_sparse(s, chunk[s]) for s in tc.sources(t)}
            pred = tc.decode(t, acts, chunk).double().cpu()
            err += float(((pred - y[a : a + 4096]) ** 2).sum())
            on = acts[t].features[acts[t].values > 0].cpu()
            fires.index_add_(0, on, torch.ones(len(on), dtype=torch.float64))
        var = float(((y - y.mean(0)) ** 2).sum())
        layers.append({"layer": t, "fvu": err / max(var, 1e-30), "l0": float(fires.sum()) / n,
                       "unused_val_frac": float((fires == 0).double().mean()),
                       "dense_frac": float((fires > DENSE_FREQUENCY * n).double().mean())})
    return layers


def evaluate(cfg_dict: dict, threads: int = 1, transcoder: str | None = None) -> dict:
    """The evaluation of OUT/transcoder (or of `transcoder`, e.g. an earlier one, on the same held-out windows) →
    {"layers": [...], "kl", "agreement", "n_eval_tokens"}. Called in a Ray task (a GPU when the cluster has one)."""
    cfg = TrainConfig.model_validate(cfg_dict)
    act = cfg.activations_dir()
    meta = read_meta(act)
    device = cfg.torch_device(threads)
    tc = load_transcoder(transcoder or str(Path(cfg.out) / "transcoder"), device=device, dtype=torch.float32)
    layers = _layer_metrics(tc, act, meta, device)
    model, _ = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.model_dtype, device))
    rm = ReplacementModel(model, None, tc)  # from here on the model's attention is the replacement model's (eager)
    windows = np.load(act / "windows.npy")[meta["n_train_windows"]:]
    kl_sum, agree, count = 0.0, 0, 0
    for a in range(0, len(windows), cfg.batch_size):
        tokens = torch.from_numpy(windows[a : a + cfg.batch_size].astype(np.int64)).to(device)
        with torch.no_grad():
            ref = model(input_ids=tokens).logits[:, 1:].float()
        rep = rm.run(Replaced(None), tokens).logits[:, 1:].float()
        lp, lq = ref.log_softmax(-1), rep.log_softmax(-1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        agree += int((ref.argmax(-1) == rep.argmax(-1)).sum())
        count += ref.shape[0] * ref.shape[1]
    return {"layers": layers, "kl": kl_sum / count, "agreement": agree / count, "n_eval_tokens": count}
