"""The training of one unit (a layer, or every layer of a CLT): `UnitTrainer`, and its loop on the cached
activations (`train_layers`; the online loop is attribute_ray/training/stream.py).

Inputs and targets are scaled per layer to mean norm √D. b_dec starts at the target mean, or for a skip PLT
with ``skip_init="lstsq"`` the least-squares affine map gives W_skip and b_dec. Adam on the MSE of the scaled
targets plus `auxk_alpha` × the auxiliary-k loss of the dead latents, lr schedule `TrainConfig.lr_at`; batches
are a stateless function of the step, so a run resumed from a checkpoint is bit-identical to an uninterrupted one
on the same hardware.
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


class Batches:
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


class Progress:
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


def _read_rows(mms: list[np.ndarray], rows: np.ndarray, device: torch.device) -> list[Tensor]:
    """Rows [len(rows), D] of each layer's activation file, as fp32 on `device` (raw, unscaled)."""
    return [torch.from_numpy(np.asarray(mm[rows], dtype=np.float32)).to(device) for mm in mms]


class UnitTrainer:
    """One training unit (a layer, or every layer of a CLT): its model, Adam state, dead-latent counters and
    checkpoints. A new unit is initialised from the cached training rows; an unfinished one resumes from its
    last checkpoint (`start`); a finished one only holds its `summary`."""

    def __init__(self, cfg: TrainConfig, meta: dict, layers: list[int], device: torch.device):
        self.cfg, self.meta, self.layers, self.device = cfg, meta, layers, device
        self.s_in, self.s_out = layer_scales(meta, layers)
        self.model = build_trainable(cfg, meta, layers).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate(meta["d_model"]))
        self.since = torch.zeros(len(layers), self.model.f, dtype=torch.int64)  # tokens since each latent last fired
        self.ck = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, layers[0]))
        self.label = cfg.unit_label(layers)
        self.start, self.info, self.summary = 0, {"train_fvu": None}, None
        got = self.ck.load()
        if got is not None:
            st, tensors = got
            if st.get("done"):
                self.summary = st["summary"]
                return
            self.since = unpack_state(self.model, self.opt, {k: v.to(device) if k != "since" else v for k, v in tensors.items()})
            self.start, self.info = st["step"], st.get("info", self.info)
            print(f"[{self.label}] resuming from step {self.start}", flush=True)
        else:
            act = cfg.activations_dir()
            n = meta["n_train"]
            rows = np.sort(np.random.default_rng([cfg.seed, 0x1A17]).permutation(n)[: min(n, 65_536)])
            cpu = torch.device("cpu")
            xs = _read_rows([np.load(act / f"train_in_{l}.npy", mmap_mode="r") for l in layers], rows, cpu)
            ys = _read_rows([np.load(act / f"train_out_{l}.npy", mmap_mode="r") for l in layers], rows, cpu)
            _init_biases(self.model.cpu(), self.scale(xs, self.s_in), self.scale(ys, self.s_out),
                         lstsq_skip=cfg.skip_init == "lstsq")
            self.model.to(device)
        self.ema = self.info.get("train_fvu")
        self.t0 = time.perf_counter()

    @staticmethod
    def scale(ts: list[Tensor], scales: list[float]) -> list[Tensor]:
        return [t * s for t, s in zip(ts, scales)]

    def step(self, step: int, xs: list[Tensor], ys: list[Tensor]) -> float:
        """One Adam step on raw rows xs, ys [n × [B, D]] at schedule position `step`; returns the train FVU EMA."""
        cfg, model = self.cfg, self.model
        xs, ys = self.scale(xs, self.s_in), self.scale(ys, self.s_out)
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr_at(step, self.meta["d_model"])
        preds, codes = model(xs)
        sq = sum(((p - y) ** 2).sum() for p, y in zip(preds, ys))
        dead = self.since >= cfg.dead_tokens
        aux = model.auxk_loss(xs, [y - p for p, y in zip(preds, ys)], dead) if cfg.auxk_alpha and dead.any() else 0.0
        loss = (sq + cfg.auxk_alpha * aux) / (len(ys) * ys[0].numel())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if cfg.normalize_decoder:
            model.normalize_decoder_()
        with torch.no_grad():
            var = sum(((y - y.mean(0)) ** 2).sum() for y in ys)
            fvu = float(sq / var)
            self.ema = fvu if self.ema is None else 0.98 * self.ema + 0.02 * fvu
            self.since += len(ys[0])
            for i, (v, idx) in enumerate(codes):
                fired = torch.zeros(model.f, dtype=torch.bool, device=v.device)
                fired[idx[v > 0]] = True
                self.since[i][fired.cpu()] = 0
        return self.ema

    def checkpoint(self, done: int) -> None:
        """Save after `done` steps when the schedule says so (every `checkpoint_every` steps and at the end)."""
        if done % self.cfg.checkpoint_every and done != self.cfg.steps:
            return
        self.info = {"train_fvu": self.ema, "seconds": self.info.get("seconds", 0.0) + time.perf_counter() - self.t0,
                     "resumed_from": self.start or self.info.get("resumed_from")}
        self.t0 = time.perf_counter()
        self.ck.save(done, pack_state(self.model, self.opt, self.since),
                     {"done": False, "identity": self.cfg.train_hash(), "info": self.info})

    def finish(self, tokens_per_step: int) -> list[dict]:
        """Held-out FVU / L0 and the dead fraction per layer; marks the unit done. Returns the per-layer summaries."""
        if self.summary is not None:
            return self.summary
        cfg = self.cfg
        dead = (self.since >= min(cfg.dead_tokens, cfg.steps * tokens_per_step)).float().mean(1).tolist()
        evals = _held_out(self.model, self.layers, cfg, self.meta, self.s_in, self.s_out, self.device)
        seconds = self.info.get("seconds", 0.0)
        self.summary = [{
            "layer": l, "steps": cfg.steps, "resumed_from": self.info.get("resumed_from"), "train_seconds": seconds,
            "tokens_per_s": cfg.steps * tokens_per_step / max(seconds, 1e-9),
            "train_fvu_ema": self.ema, "dead_frac": dead[i], **evals[i],
        } for i, l in enumerate(self.layers)]
        self.ck.finish(self.summary)
        return self.summary


def interrupt_if(fail_after: int | None, done: int, cfg: TrainConfig, label: str) -> None:
    """The test hook: raise after step `fail_after` (its checkpoints are written) unless training is over."""
    if fail_after is not None and done == fail_after and done < cfg.steps:
        raise TrainingInterrupted(f"[{label}] interrupted after step {done} ({FAIL_AFTER_ENV})")


def train_layers(cfg_dict: dict, layers: list[int], fail_after: int | None = None) -> list[dict]:
    """Train (or resume) the transcoder of `layers` on the cached activations; returns one summary per layer.
    Called in a Ray task."""
    cfg = TrainConfig.model_validate(cfg_dict)
    act = cfg.activations_dir()
    meta = read_meta(act)
    device = cfg.torch_device(1)
    unit = UnitTrainer(cfg, meta, layers, device)
    if unit.summary is not None:
        return unit.summary
    xin = [np.load(act / f"train_in_{l}.npy", mmap_mode="r") for l in layers]
    yout = [np.load(act / f"train_out_{l}.npy", mmap_mode="r") for l in layers]
    batches = Batches(meta["n_train"], cfg.batch_tokens, cfg.seed)
    progress = Progress(f"{cfg.kind} {unit.label}", cfg.steps, unit.start)
    for step in range(unit.start, cfg.steps):
        rows = batches(step)
        ema = unit.step(step, _read_rows(xin, rows, device), _read_rows(yout, rows, device))
        progress(step + 1, ema, len(rows))
        unit.checkpoint(step + 1)
        interrupt_if(fail_after, step + 1, cfg, unit.label)
    return unit.finish(cfg.batch_tokens)


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
            xs = UnitTrainer.scale(_read_rows(xin, rows, device), s_in)
            ys = UnitTrainer.scale(_read_rows(yout, rows, device), s_out)
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
