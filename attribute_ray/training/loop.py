"""The training loop of one unit (a layer, or every layer of a CLT) on the cached activations.

Inputs and targets are scaled per layer to mean norm √D. b_dec starts at the target mean, or for a skip PLT
with ``skip_init="lstsq"`` the least-squares affine map gives W_skip and b_dec. Adam on the MSE of the scaled
targets, lr schedule `TrainConfig.lr_at`; batches are a stateless function of the step, so a run resumed from a
checkpoint is bit-identical to an uninterrupted one on the same hardware.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from attribute_ray.training.activations import read_meta
from attribute_ray.training.checkpoints import Checkpoints, checkpoint_folder, pack_state, unpack_state
from attribute_ray.training.config import TrainConfig
from attribute_ray.training.transcoder import TrainableTranscoder, build_trainable, layer_scales

FAIL_AFTER_ENV = "ATTRIBUTE_RAY_TRAIN_FAIL_AFTER"


class TrainingInterrupted(RuntimeError):
    """Raised by the test hook (`fail_after`, or the FAIL_AFTER_ENV variable in the job) inside a training task."""


class _Batches:
    """Token indices of step t: positions t·B … (t+1)·B of a stream of seeded per-epoch permutations
    (stateless, so a resumed run sees the same batches)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._epoch, self._perm = -1, None

    def perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, 0x7C0DE, epoch]).permutation(self.n)
        return self._perm

    def __call__(self, step: int) -> np.ndarray:
        pos, need, parts = step * self.batch, self.batch, []
        while need:
            epoch, off = divmod(pos, self.n)
            take = min(need, self.n - off)
            parts.append(self.perm(epoch)[off : off + take])
            pos, need = pos + take, need - take
        return np.sort(np.concatenate(parts))


class _Progress:
    """Throttled progress lines (tqdm bars from parallel Ray workers interleave into noise in job logs)."""

    def __init__(self, label: str, total: int, start: int, every_s: float = 30.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.t0 = self.last = time.perf_counter()
        self.start = start

    def __call__(self, step: int, fvu: float, tokens_per_step: int) -> None:
        now = time.perf_counter()
        tenth = max(1, self.total // 10)
        if step == self.total or now - self.last >= self.every_s or (step % tenth == 0 and now - self.last >= 5):
            rate = (step - self.start) * tokens_per_step / max(now - self.t0, 1e-9)
            print(f"[{self.label}] step {step}/{self.total} train FVU {fvu:.4f} ({rate:,.0f} tok/s)", flush=True)
            self.last = now


def _init_biases(model: TrainableTranscoder, xs: list[Tensor], ys: list[Tensor], *, lstsq_skip: bool) -> None:
    """b_dec: the target mean; with a skip and `lstsq_skip`, the least-squares affine map (ridge 1e-4·mean
    diagonal) gives W_skip and b_dec."""
    with torch.no_grad():
        for j in range(model.n):
            y = ys[j].double()
            if model.W_skip is None or not lstsq_skip:
                model.b_dec[j] = y.mean(0).float()
                continue
            x = torch.cat([xs[j].double(), torch.ones(len(y), 1, dtype=torch.float64)], 1)
            A = x.T @ x
            A += torch.eye(len(A), dtype=A.dtype) * 1e-4 * A.diagonal().mean()
            beta = torch.linalg.solve(A, x.T @ y)  # [D+1, D]
            model.W_skip[j] = beta[:-1].T.float()
            model.b_dec[j] = beta[-1].float()


def _read_rows(mms: list[np.ndarray], rows: np.ndarray, scales: list[float], device: torch.device) -> list[Tensor]:
    """Rows [len(rows), D] of each layer's activation file, as fp32 on `device`, times the layer's scale."""
    return [torch.from_numpy(np.asarray(mm[rows], dtype=np.float32)).to(device) * s for mm, s in zip(mms, scales)]


def train_layers(cfg_dict: dict, layers: list[int], fail_after: int | None = None) -> list[dict]:
    """Train (or resume) the transcoder of `layers`; returns one summary per layer. Called in a Ray task."""
    cfg = TrainConfig.model_validate(cfg_dict)
    act = cfg.activations_dir()
    meta = read_meta(act)
    device = cfg.torch_device(1)
    xin = [np.load(act / f"train_in_{l}.npy", mmap_mode="r") for l in layers]
    yout = [np.load(act / f"train_out_{l}.npy", mmap_mode="r") for l in layers]
    s_in, s_out = layer_scales(meta, layers)
    D, N = meta["d_model"], meta["n_train"]
    model = build_trainable(cfg, meta, layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate(D))
    since = torch.zeros(len(layers), model.f, dtype=torch.int64)  # tokens since each latent last fired
    ck = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, layers[0]))
    label = cfg.unit_label(layers)
    got = ck.load()
    start, info = 0, {"train_fvu": None}
    if got is not None:
        st, tensors = got
        if st.get("done"):
            return st["summary"]
        since = unpack_state(model, opt, {k: v.to(device) if k != "since" else v for k, v in tensors.items()})
        start, info = st["step"], st.get("info", info)
        print(f"[{label}] resuming from step {start}", flush=True)
    else:
        init_rows = np.sort(np.random.default_rng([cfg.seed, 0x1A17]).permutation(N)[: min(N, 65_536)])
        cpu = torch.device("cpu")
        xs, ys = _read_rows(xin, init_rows, s_in, cpu), _read_rows(yout, init_rows, s_out, cpu)
        _init_biases(model.cpu(), xs, ys, lstsq_skip=cfg.skip_init == "lstsq")
        model.to(device)
    batches = _Batches(N, cfg.batch_tokens, cfg.seed)
    progress = _Progress(f"{cfg.kind} {label}", cfg.steps, start)
    t0, ema = time.perf_counter(), info.get("train_fvu")
    for step in range(start, cfg.steps):
        rows = batches(step)
        xs, ys = _read_rows(xin, rows, s_in, device), _read_rows(yout, rows, s_out, device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step, D)
        preds, codes = model(xs)
        sq = sum(((p - y) ** 2).sum() for p, y in zip(preds, ys))
        loss = sq / (len(ys) * ys[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.normalize_decoder:
            model.normalize_decoder_()
        with torch.no_grad():
            var = sum(((y - y.mean(0)) ** 2).sum() for y in ys)
            fvu = float(sq / var)
            ema = fvu if ema is None else 0.98 * ema + 0.02 * fvu
            since += len(rows)
            for i, (v, idx) in enumerate(codes):
                fired = torch.zeros(model.f, dtype=torch.bool, device=v.device)
                fired[idx[v > 0]] = True
                since[i][fired.cpu()] = 0
        done = step + 1
        progress(done, ema, len(rows))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            info = {"train_fvu": ema, "seconds": info.get("seconds", 0.0) + time.perf_counter() - t0,
                    "resumed_from": start or info.get("resumed_from")}
            t0 = time.perf_counter()
            ck.save(done, pack_state(model, opt, since), {"done": False, "identity": cfg.train_hash(), "info": info})
        if fail_after is not None and done == fail_after and done < cfg.steps:
            raise TrainingInterrupted(f"[{label}] interrupted after step {done} ({FAIL_AFTER_ENV})")
    window = min(cfg.dead_tokens, cfg.steps * cfg.batch_tokens)
    dead = (since >= window).float().mean(1).tolist()
    evals = _held_out(model, layers, cfg, meta, s_in, s_out, device)
    seconds = info.get("seconds", 0.0)
    summary = [{
        "layer": l, "steps": cfg.steps, "resumed_from": info.get("resumed_from"), "train_seconds": seconds,
        "tokens_per_s": cfg.steps * cfg.batch_tokens / max(seconds, 1e-9),
        "train_fvu_ema": ema, "dead_frac": dead[i], **evals[i],
    } for i, l in enumerate(layers)]
    ck.finish(summary)
    return summary


def _held_out(model: TrainableTranscoder, layers: list[int], cfg: TrainConfig, meta: dict, s_in: list[float],
              s_out: list[float], device: torch.device) -> list[dict]:
    """Held-out FVU / L0 of the trainer's model per layer (scaled space; FVU is scale-free)."""
    act = cfg.activations_dir()
    xin = [np.load(act / f"val_in_{l}.npy", mmap_mode="r") for l in layers]
    yout = [np.load(act / f"val_out_{l}.npy", mmap_mode="r") for l in layers]
    n = meta["n_val"]
    err = [0.0] * len(layers)
    l0 = [0.0] * len(layers)
    s1 = [torch.zeros(meta["d_model"], dtype=torch.float64) for _ in layers]
    s2 = [0.0] * len(layers)
    with torch.no_grad():
        for a in range(0, n, 4096):
            rows = np.arange(a, min(n, a + 4096))
            xs, ys = _read_rows(xin, rows, s_in, device), _read_rows(yout, rows, s_out, device)
            preds, codes = model(xs)
            for i in range(len(layers)):
                err[i] += float(((preds[i] - ys[i]).double() ** 2).sum())
                l0[i] += float((codes[i][0] > 0).sum())
                s1[i] += ys[i].double().sum(0).cpu()
                s2[i] += float((ys[i].double() ** 2).sum())
    out = []
    for i in range(len(layers)):
        var = s2[i] - float((s1[i] ** 2).sum()) / n
        out.append({"val_fvu": err[i] / max(var, 1e-30), "l0": l0[i] / n})
    return out
