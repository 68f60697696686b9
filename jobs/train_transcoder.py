"""Train transcoders on a model's own MLP activations with Ray: per-layer (PLT, skip PLT) or an untied CLT.

    python -m jobs.train_transcoder --model M --dataset D --kind skip-plt --out DIR [--steps 1000 ...]
    ray job submit --working-dir . -- python -m jobs.train_transcoder ...   (same flags; DIR on a shared filesystem)

Stages, each resumable by re-running the same command:

1. windows (driver): `read_texts` + `token_windows` (BOS windows); the last ⌈val_tokens / (ctx_len − 1)⌉
   windows are held out.
2. activations (one Ray task, a GPU when the cluster has one): the real model runs once over every window;
   each layer's MLP input ("mlp_in": the MLP module input, after the norm's gain) and MLP output ("mlp_out")
   are written, position 0 dropped, as fp16 ``.npy`` files under DIR/activations/ (`--activations` shares
   one cache between runs). ``meta.json`` (written last) marks it complete and holds the per-layer mean norms.
3. training: one Ray task per layer (plt, skip-plt) or one task for the CLT. Inputs and targets are scaled
   per layer to mean norm √D; TopK(ReLU) encoder, decoder, b_dec, and for skip-plt a linear skip (least-squares
   initialised). Adam, MSE on the scaled target. Checkpoints (weights, Adam state, dead-latent counters, step)
   as safetensors + ``state.json`` under DIR/checkpoints/layer_{l}/ (``clt/`` for a CLT); finished layers are
   skipped and unfinished ones continue from their last checkpoint (bit-identical to an uninterrupted run
   on the same hardware).
4. assembly (driver): scales folded into the weights, written with `save_sparsify` to DIR/transcoder
   (``load_transcoder(DIR/transcoder)`` loads it).
5. evaluation (one Ray task): held-out FVU and L0 per layer, and KL(model ‖ replacement) and next-token
   agreement of the replacement model whose every MLP output is the transcoder's → DIR/report.json.

Test hook: ATTRIBUTE_RAY_TRAIN_FAIL_AFTER=N makes every training task raise after step N (after that
step's checkpoint, if any): an interrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from jobs.cache_activations import _init_ray
from jobs.corpus import CorpusError, read_texts, token_windows

FAIL_AFTER_ENV = "ATTRIBUTE_RAY_TRAIN_FAIL_AFTER"
DTYPES = ("float32", "float16", "bfloat16")


class TrainingInterrupted(RuntimeError):
    """Raised by the test hook inside a training task."""


class TrainingFailed(RuntimeError):
    """Some training tasks failed; the others finished or checkpointed (re-run to resume)."""


class TrainConfig(BaseModel):
    model: str
    dataset: str
    split: str = "train"
    text_column: str = "text"
    kind: Literal["plt", "skip-plt", "clt"] = "skip-plt"
    out: str
    activations: str | None = Field(None, description="activation cache directory (default OUT/activations)")
    n_tokens: int = Field(100_000, ge=1, description="training tokens (text tokens, BOS excluded)")
    val_tokens: int = Field(4096, ge=1, description="held-out tokens (whole windows)")
    ctx_len: int = Field(128, ge=2)
    bos: bool = True
    filter_bos: bool = False
    features: int | None = Field(None, ge=1, description="latents per layer (default expansion × d_model)")
    expansion: int = Field(8, ge=1)
    k: int = Field(32, ge=1)
    lr: float | None = Field(None, gt=0, description="default 1e-3 / sqrt(features / 2**14)")
    warmup_steps: int | None = Field(None, ge=0, description="default min(100, steps // 10)")
    lr_decay: float = Field(0.2, ge=0, le=1, description="fraction of the steps at the end with linear decay to 0")
    batch_tokens: int = Field(4096, ge=1)
    steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    skip_init: Literal["lstsq", "zeros"] = "lstsq"
    normalize_decoder: bool = False
    dead_tokens: int = Field(1_000_000, ge=1, description="a latent is dead if it has not fired in this many tokens")
    layers: list[int] | None = None
    num_workers: int | None = Field(None, ge=1)
    device: str = "auto"
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(8, ge=1, description="windows per forward pass (activations, evaluation)")
    seed: int = 0

    @field_validator("layers", mode="before")
    @classmethod
    def _parse_layers(cls, v):
        if isinstance(v, str):
            out: list[int] = []
            for part in v.replace(" ", "").split(","):
                if "-" in part:
                    a, b = part.split("-", 1)
                    out.extend(range(int(a), int(b) + 1))
                elif part:
                    out.append(int(part))
            return sorted(set(out))
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.kind == "clt" and self.layers is not None:
            raise ValueError("--layers does not apply to --kind clt (a CLT trains all layers together)")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"bad --layers {self.layers}")
        return self

    # ----- derived values -------------------------------------------------------------------------
    def n_features(self, d_model: int) -> int:
        return self.features or self.expansion * d_model

    def learning_rate(self, d_model: int) -> float:
        # 5× sparsify's auto lr: short CPU-scale runs (≤ a few M tokens) gained from higher rates on tiny models
        return self.lr or 1e-3 / math.sqrt(self.n_features(d_model) / 2**14)

    def lr_at(self, step: int, d_model: int) -> float:
        """Linear warmup, constant, linear decay to 0 over the last `lr_decay` of the steps (stateless)."""
        lr = self.learning_rate(d_model)
        warm = self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)
        if step < warm:
            lr *= (step + 1) / warm
        decay = int(self.steps * self.lr_decay)
        if decay and step >= self.steps - decay:
            lr *= (self.steps - step) / decay
        return lr

    def activations_dir(self) -> Path:
        return Path(self.activations) if self.activations else Path(self.out) / "activations"

    def data_identity(self) -> dict:
        """What must match for an activation cache to be reused."""
        return self.model_dump(include={"model", "dataset", "split", "text_column", "n_tokens", "val_tokens",
                                        "ctx_len", "bos", "filter_bos", "model_dtype"})

    def train_identity(self) -> dict:
        """What must match for a re-run to resume the same training."""
        return self.model_dump(exclude={"out", "activations", "layers", "num_workers", "device", "dtype",
                                        "batch_size", "checkpoint_every"})


# ===== small helpers ===============================================================================


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _threads(device: str, n: int) -> None:
    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, n))


def _load_model(cfg: TrainConfig, device: str):
    """The HF model in eval mode; eager attention where SDPA would drop attention-logit soft-capping (Gemma-2),
    so activations and logits are the true model's (the replacement model's attention is eager too)."""
    from attribute_ray.replacement import load_model

    model, _ = load_model(cfg.model, device=device, dtype=_torch_dtype(cfg.model_dtype))
    if getattr(model.config, "attn_logit_softcapping", None):
        model.config._attn_implementation = "eager"
    return model.eval().requires_grad_(False)


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _layer_label(layers: list[int], kind: str) -> str:
    return "clt" if kind == "clt" else f"layer_{layers[0]}"


# ===== stage 1–2: windows and activations =========================================================


def read_meta(act_dir: Path) -> dict | None:
    p = Path(act_dir) / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else None


def prepare_windows(cfg: TrainConfig, act_dir: Path) -> tuple[int, int]:
    """Tokenise the corpus into windows (driver); returns (n_train_windows, n_val_windows)."""
    from attribute_ray.replacement import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    body = cfg.ctx_len - 1 if cfg.bos else cfg.ctx_len
    n_val = -(-cfg.val_tokens // body)
    n_train = -(-cfg.n_tokens // body)
    windows = token_windows(tokenizer, read_texts(cfg.dataset, split=cfg.split, text_column=cfg.text_column),
                            ctx_len=cfg.ctx_len, n_tokens=(n_train + n_val) * body, bos=cfg.bos,
                            filter_bos=cfg.filter_bos)
    if len(windows) < n_val + 1:
        raise CorpusError(f"the corpus gives {len(windows)} windows of {cfg.ctx_len}: need at least {n_val} held-out "
                          "+ 1 training window; lower --val-tokens or use a larger corpus")
    n_train = len(windows) - n_val
    act_dir.mkdir(parents=True, exist_ok=True)
    tmp = act_dir / f"windows.{uuid.uuid4().hex}.tmp.npy"
    np.save(tmp, windows.astype(np.int32))
    os.replace(tmp, act_dir / "windows.npy")
    return n_train, n_val


class _Capture:
    """Forward hooks on each layer's MLP module: its input ("mlp_in") and output ("mlp_out")."""

    def __init__(self, model):
        from attribute_ray.families import family_for

        fam = family_for(model.config)
        self.inputs: dict[int, object] = {}
        self.outputs: dict[int, object] = {}
        self.handles = []
        for l, layer in enumerate(fam.decoder_layers(model)):
            mlp = fam.get(layer, fam.mlp)
            self.handles.append(mlp.register_forward_pre_hook(lambda m, args, l=l: self.inputs.__setitem__(l, args[0])))
            self.handles.append(mlp.register_forward_hook(lambda m, a, out, l=l: self.outputs.__setitem__(l, out)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collect_activations(cfg_dict: dict, n_train: int, n_val: int, threads: int = 1) -> dict:
    """Ray task: run the model over DIR/activations/windows.npy; write per-layer fp16 activations + meta.json."""
    import torch

    from attribute_ray.families import family_for

    cfg = TrainConfig.model_validate(cfg_dict)
    act_dir = cfg.activations_dir()
    device = _device(cfg)
    _threads(device, threads)
    model = _load_model(cfg, device)
    L = len(family_for(model.config).decoder_layers(model))
    D = model.config.hidden_size
    windows = np.load(act_dir / "windows.npy")
    T = windows.shape[1]
    tag = uuid.uuid4().hex[:8]
    files: dict[tuple[str, str, int], np.memmap] = {}
    final: dict[Path, Path] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for site in ("in", "out"):
            for l in range(L):
                path = act_dir / f"{split}_{site}_{l}.npy"
                tmp = act_dir / f"{split}_{site}_{l}.{tag}.partial"
                files[(split, site, l)] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n * (T - 1), D))
                final[tmp] = path
    norm_sum = {("in", l): 0.0 for l in range(L)} | {("out", l): 0.0 for l in range(L)}
    cap = _Capture(model)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), cfg.batch_size):
                batch = torch.from_numpy(windows[start : start + cfg.batch_size].astype(np.int64)).to(device)
                model.base_model(input_ids=batch)
                for site, store in (("in", cap.inputs), ("out", cap.outputs)):
                    for l in range(L):
                        x = store[l][:, 1:].reshape(-1, D).float()
                        x16 = x.cpu().numpy().astype(np.float16)
                        if not np.isfinite(x16).all():
                            raise OverflowError(f"layer {l} mlp_{site} has values outside the fp16 range "
                                                f"(max |x| {x.abs().max().item():.3g})")
                        for i in range(len(batch)):
                            w = start + i
                            split, row = ("train", w) if w < n_train else ("val", w - n_train)
                            files[(split, site, l)][row * (T - 1) : (row + 1) * (T - 1)] = x16[i * (T - 1) : (i + 1) * (T - 1)]
                            if split == "train":
                                norm_sum[(site, l)] += float(x[i * (T - 1) : (i + 1) * (T - 1)].norm(dim=-1).double().sum())
    except BaseException:
        files.clear()
        for tmp in final:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        cap.remove()
    for mm in files.values():
        mm.flush()
    files.clear()
    for tmp, path in final.items():
        os.replace(tmp, path)
    n_rows = n_train * (T - 1)
    meta = {
        "identity": cfg.data_identity(),
        "model_type": model.config.model_type,
        "n_layers": L,
        "d_model": D,
        "ctx_len": T,
        "n_train_windows": n_train,
        "n_val_windows": n_val,
        "n_train": n_rows,
        "n_val": n_val * (T - 1),
        "dtype": "float16",
        "in_norm": [norm_sum[("in", l)] / n_rows for l in range(L)],
        "out_norm": [norm_sum[("out", l)] / n_rows for l in range(L)],
        "seconds": time.perf_counter() - t0,
    }
    _atomic_write(act_dir / "meta.json", json.dumps(meta, indent=2))
    return meta


def ensure_activations(cfg: TrainConfig) -> dict:
    import ray

    act_dir = cfg.activations_dir()
    meta = read_meta(act_dir)
    if meta is not None:
        if meta["identity"] != cfg.data_identity():
            raise CorpusError(f"{act_dir} holds activations made with different settings: {meta['identity']}; "
                              "use another --out/--activations or delete it")
        print(f"activations: reusing {act_dir} ({meta['n_train']:,} training + {meta['n_val']:,} held-out tokens, "
              f"{meta['n_layers']} layers)")
        return meta
    t0 = time.perf_counter()
    n_train, n_val = prepare_windows(cfg, act_dir)
    _init_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = 1 if gpus else max(1, min(8, int(ray.available_resources().get("CPU", 1))))
    task = ray.remote(collect_activations).options(num_cpus=cpus, num_gpus=1 if gpus else 0, max_retries=2)
    meta = ray.get(task.remote(cfg.model_dump(), n_train, n_val, cpus))
    size = sum(p.stat().st_size for p in act_dir.glob("*.npy"))
    print(f"activations: {meta['n_train']:,} training + {meta['n_val']:,} held-out tokens × {meta['n_layers']} layers "
          f"in {time.perf_counter() - t0:.1f}s ({size / 2**20:.1f} MiB) → {act_dir}")
    return meta


# ===== the trainable model ========================================================================


def _coder_class():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Coder(nn.Module):
        """Transcoders of `n` layers in the scaled space (inputs × s_in, targets × s_out).

        Per source layer i: a_i = TopK(ReLU(x_i W_enc[i]ᵀ + b_enc[i])). Per target j:
        ŷ_j = Σ_{i ≤ j (cross) or i = j} a_i W_dec[i→j] + b_dec[j] (+ x_j W_skip[j]ᵀ)."""

        def __init__(self, n: int, d: int, f: int, k: int, *, cross: bool, skip: bool, generator=None):
            super().__init__()
            self.n, self.d, self.f, self.k, self.cross = n, d, f, min(k, f), cross
            self.W_enc = nn.Parameter(torch.randn(n, f, d, generator=generator) / math.sqrt(d))
            self.b_enc = nn.Parameter(torch.zeros(n, f))
            self.pairs = [(i, j) for i in range(n) for j in range(i, n)] if cross else [(i, i) for i in range(n)]
            # small random decoder rows (norm 0.1): the first steps start near the b_dec (+ skip) solution
            self.W_dec = nn.ParameterDict({
                f"{i}_{j}": nn.Parameter(0.1 * torch.randn(f, d, generator=generator) / math.sqrt(d)) for i, j in self.pairs
            })
            self.b_dec = nn.Parameter(torch.zeros(n, d))
            self.W_skip = nn.Parameter(torch.zeros(n, d, d)) if skip else None

        def encode(self, i: int, x):
            """(values [B, k], indices [B, k]) of TopK(ReLU(pre))."""
            pre = F.linear(x, self.W_enc[i], self.b_enc[i]).relu()
            return pre.topk(self.k, dim=-1, sorted=False)

        def forward(self, xs: list):
            """xs: n tensors [B, d] (scaled) → (predictions [n × [B, d]], codes [n × (values, indices)])."""
            codes = [self.encode(i, x) for i, x in enumerate(xs)]
            preds = []
            for j in range(self.n):
                y = self.b_dec[j].expand(xs[j].shape[0], -1)
                for i in range(j + 1) if self.cross else (j,):
                    v, idx = codes[i]
                    y = y + F.embedding_bag(idx, self.W_dec[f"{i}_{j}"], per_sample_weights=v, mode="sum")
                if self.W_skip is not None:
                    y = y + xs[j] @ self.W_skip[j].T
                preds.append(y)
            return preds, codes

        @torch.no_grad()
        def forward_raw(self, xs: list, s_in: list[float], s_out: list[float]) -> list:
            """Raw-space reconstructions (what the saved transcoder must reproduce)."""
            preds, _ = self([x * s for x, s in zip(xs, s_in)])
            return [p / s for p, s in zip(preds, s_out)]

        @torch.no_grad()
        def normalize_decoder_(self) -> None:
            for W in self.W_dec.values():
                W.div_(W.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    return Coder


def build_coder(cfg: TrainConfig, meta: dict, layers: list[int]):
    import torch

    D = meta["d_model"]
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + (layers[0] if cfg.kind != "clt" else 99_991))
    return _coder_class()(len(layers), D, cfg.n_features(D), cfg.k, cross=cfg.kind == "clt", skip=cfg.kind == "skip-plt",
                          generator=g)


def _scales(meta: dict, layers: list[int]) -> tuple[list[float], list[float]]:
    D = meta["d_model"]
    return ([math.sqrt(D) / max(meta["in_norm"][l], 1e-12) for l in layers],
            [math.sqrt(D) / max(meta["out_norm"][l], 1e-12) for l in layers])


# ===== checkpoints ================================================================================


class Checkpoints:
    """DIR/checkpoints/{layer_l|clt}/: ``step_{N}.safetensors`` (weights ``param.*``, Adam ``adam.*``, dead-latent
    counters ``since``) and ``state.json`` (written after it: step, file, done, summary). No pickle."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def state(self) -> dict | None:
        p = self.folder / "state.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def load(self) -> tuple[dict, dict] | None:
        from safetensors.torch import load_file

        st = self.state()
        if st is None:
            return None
        return st, load_file(str(self.folder / st["file"]))

    def save(self, step: int, tensors: dict, state: dict) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}.safetensors"
        tmp = self.folder / f"{name}.{uuid.uuid4().hex}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)})
        os.replace(tmp, self.folder / name)
        _atomic_write(self.folder / "state.json", json.dumps({**state, "step": step, "file": name}, indent=2))
        for old in self.folder.glob("step_*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)


def _pack(coder, opt, since) -> dict:
    tensors = {f"param.{n}": p for n, p in coder.named_parameters()}
    names = dict(zip((id(p) for p in coder.parameters()), (n for n, _ in coder.named_parameters())))
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"adam.{n}.exp_avg"] = st["exp_avg"]
                tensors[f"adam.{n}.exp_avg_sq"] = st["exp_avg_sq"]
                tensors[f"adam.{n}.step"] = st["step"].reshape(1).float()
    tensors["since"] = since
    return tensors


def _unpack(coder, opt, tensors: dict):
    import torch

    with torch.no_grad():
        for n, p in coder.named_parameters():
            p.copy_(tensors[f"param.{n}"])
    sd = opt.state_dict()
    names = [n for n, _ in coder.named_parameters()]
    state = {}
    for i, n in enumerate(names):
        if f"adam.{n}.exp_avg" in tensors:
            state[i] = {"step": tensors[f"adam.{n}.step"].reshape(()).clone(), "exp_avg": tensors[f"adam.{n}.exp_avg"],
                        "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"]}
    sd["state"] = state
    opt.load_state_dict(sd)
    return tensors["since"].clone()


def checkpoint_folder(out: str | Path, kind: str, layer: int | None = None) -> Path:
    return Path(out) / "checkpoints" / ("clt" if kind == "clt" else f"layer_{layer}")


def load_trained(cfg: TrainConfig, meta: dict, layers: list[int]):
    """(Coder at its latest checkpoint, s_in, s_out, state) — the trainer's in-memory model, for tests and assembly."""
    coder = build_coder(cfg, meta, layers)
    got = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, layers[0])).load()
    if got is None:
        raise FileNotFoundError(f"no checkpoint for layers {layers} under {cfg.out}/checkpoints")
    st, tensors = got
    import torch

    with torch.no_grad():
        for n, p in coder.named_parameters():
            p.copy_(tensors[f"param.{n}"])
    s_in, s_out = _scales(meta, layers)
    return coder.eval(), s_in, s_out, st


# ===== stage 3: training ==========================================================================


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


def _init_biases(coder, xs: list, ys: list, *, lstsq_skip: bool) -> None:
    """b_dec: the target mean; with a skip and `lstsq_skip`, the least-squares affine map (ridge 1e-4·mean
    diagonal) gives W_skip and b_dec."""
    import torch

    with torch.no_grad():
        for j in range(coder.n):
            y = ys[j].double()
            if coder.W_skip is None or not lstsq_skip:
                coder.b_dec[j] = y.mean(0).float()
                continue
            x = torch.cat([xs[j].double(), torch.ones(len(y), 1, dtype=torch.float64)], 1)
            A = x.T @ x
            A += torch.eye(len(A), dtype=A.dtype) * 1e-4 * A.diagonal().mean()
            beta = torch.linalg.solve(A, x.T @ y)  # [D+1, D]
            coder.W_skip[j] = beta[:-1].T.float()
            coder.b_dec[j] = beta[-1].float()


def _read_rows(mms: list, rows: np.ndarray, scales: list[float], device: str) -> list:
    import torch

    return [torch.from_numpy(np.asarray(mm[rows], dtype=np.float32)).to(device) * s for mm, s in zip(mms, scales)]


def train_layers(cfg_dict: dict, layers: list[int], fail_after: int | None = None) -> list[dict]:
    """Ray task: train (or resume) the transcoder of `layers` (one layer, or every layer of a CLT)."""
    import torch

    cfg = TrainConfig.model_validate(cfg_dict)
    meta = read_meta(cfg.activations_dir())
    device = _device(cfg)
    _threads(device, 1)
    act = cfg.activations_dir()
    xin = [np.load(act / f"train_in_{l}.npy", mmap_mode="r") for l in layers]
    yout = [np.load(act / f"train_out_{l}.npy", mmap_mode="r") for l in layers]
    s_in, s_out = _scales(meta, layers)
    D, N = meta["d_model"], meta["n_train"]
    coder = build_coder(cfg, meta, layers).to(device)
    opt = torch.optim.Adam(coder.parameters(), lr=cfg.learning_rate(D))
    since = torch.zeros(len(layers), coder.f, dtype=torch.int64)
    ck = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, layers[0]))
    label = _layer_label(layers, cfg.kind)
    got = ck.load()
    start, info = 0, {"train_fvu": None}
    if got is not None:
        st, tensors = got
        if st.get("done"):
            return st["summary"]
        since = _unpack(coder, opt, {k: v.to(device) if k != "since" else v for k, v in tensors.items()})
        start, info = st["step"], st.get("info", info)
        print(f"[{label}] resuming from step {start}", flush=True)
    else:
        init_rows = np.sort(np.random.default_rng([cfg.seed, 0x1A17]).permutation(N)[: min(N, 65_536)])
        xs, ys = _read_rows(xin, init_rows, s_in, "cpu"), _read_rows(yout, init_rows, s_out, "cpu")
        _init_biases(coder.cpu(), xs, ys, lstsq_skip=cfg.skip_init == "lstsq")
        coder.to(device)
    batches = _Batches(N, cfg.batch_tokens, cfg.seed)
    progress = _Progress(f"{cfg.kind} {label}", cfg.steps, start)
    t0, ema = time.perf_counter(), info.get("train_fvu")
    for step in range(start, cfg.steps):
        rows = batches(step)
        xs, ys = _read_rows(xin, rows, s_in, device), _read_rows(yout, rows, s_out, device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step, D)
        preds, codes = coder(xs)
        sq = sum(((p - y) ** 2).sum() for p, y in zip(preds, ys))
        loss = sq / (len(ys) * ys[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.normalize_decoder:
            coder.normalize_decoder_()
        with torch.no_grad():
            var = sum(((y - y.mean(0)) ** 2).sum() for y in ys)
            fvu = float(sq / var)
            ema = fvu if ema is None else 0.98 * ema + 0.02 * fvu
            since += len(rows)
            for i, (v, idx) in enumerate(codes):
                fired = torch.zeros(coder.f, dtype=torch.bool, device=v.device)
                fired[idx[v > 0]] = True
                since[i][fired.cpu()] = 0
        done = step + 1
        progress(done, ema, len(rows))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            info = {"train_fvu": ema, "seconds": info.get("seconds", 0.0) + time.perf_counter() - t0,
                    "resumed_from": start or info.get("resumed_from")}
            t0 = time.perf_counter()
            ck.save(done, _pack(coder, opt, since), {"done": False, "identity": _hash(cfg.train_identity()), "info": info})
        if fail_after is not None and done == fail_after and done < cfg.steps:
            raise TrainingInterrupted(f"[{label}] interrupted after step {done} ({FAIL_AFTER_ENV})")
    tokens_seen = cfg.steps * cfg.batch_tokens
    window = min(cfg.dead_tokens, tokens_seen)
    dead = (since >= window).float().mean(1).tolist()
    evals = _eval_layers(coder, layers, cfg, meta, s_in, s_out, device)
    seconds = info.get("seconds", 0.0)
    summary = [{
        "layer": l, "steps": cfg.steps, "resumed_from": info.get("resumed_from"), "train_seconds": seconds,
        "tokens_per_s": cfg.steps * cfg.batch_tokens / max(seconds, 1e-9),
        "train_fvu_ema": ema, "dead_frac": dead[i], **evals[i],
    } for i, l in enumerate(layers)]
    st = ck.state()
    _atomic_write(ck.folder / "state.json", json.dumps({**st, "done": True, "summary": summary}, indent=2))
    return summary


def _eval_layers(coder, layers, cfg, meta, s_in, s_out, device) -> list[dict]:
    """Held-out FVU / L0 of the trainer's model (scaled space; FVU is scale-free)."""
    import torch

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
            preds, codes = coder(xs)
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


# ===== stage 4: assembly ==========================================================================


def assemble(cfg: TrainConfig, meta: dict):
    """The in-memory `Transcoder` (raw space, scales folded into the weights) from the final checkpoints."""
    import torch

    from attribute_ray.transcoders import Activation, Decoder, Encoder, Hookpoints, Skip, Transcoder

    L = meta["n_layers"]
    units = [list(range(L))] if cfg.kind == "clt" else [[l] for l in range(L)]
    encoders: dict[int, Encoder] = {}
    decoders: dict[tuple[int, int], Decoder] = {}
    biases: dict[int, torch.Tensor] = {}
    skips: dict[tuple[int, int], Skip] = {}
    k = None
    for layers in units:
        coder, s_in, s_out, _ = load_trained(cfg, meta, layers)
        k = coder.k
        with torch.no_grad():
            for i, l in enumerate(layers):
                encoders[l] = Encoder(coder.W_enc[i] * s_in[i], coder.b_enc[i].clone())
                biases[l] = coder.b_dec[i] / s_out[i]
                if coder.W_skip is not None:
                    skips[(l, l)] = Skip(coder.W_skip[i] * (s_in[i] / s_out[i]))
            for i, j in coder.pairs:
                decoders[(layers[i], layers[j])] = Decoder(coder.W_dec[f"{i}_{j}"] / s_out[j])
    tc = Transcoder(
        encoders=[encoders[l] for l in range(L)], decoders=decoders, biases=[biases[l] for l in range(L)],
        activation=Activation("topk", k=k, relu_before_topk=True), skips=skips, hookpoints=Hookpoints("mlp_in", "mlp_out"),
        name=str(Path(cfg.out) / "transcoder"), format="sparsify",
    )
    return tc.to(dtype=_torch_dtype(cfg.dtype))


def write_transcoder(tc, out: Path, model_type: str) -> Path:
    from attribute_ray.transcoders import save_sparsify

    prefix = "h" if model_type == "gpt2" else "layers"
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_sparsify(tc, tmp, layer_prefix=prefix)
    old = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# ===== stage 5: evaluation ========================================================================


class _Replace:
    """Hooks making the replacement model: every MLP output ← transcoder(live MLP inputs); position 0 keeps the
    real MLP output (no features there), like `ReplacementModel.run_replaced(trace, with_errors=False)`."""

    def __init__(self, model, tc):
        from attribute_ray.families import family_for

        fam = family_for(model.config)
        self.tc, self.inputs, self.acts, self.handles = tc, {}, {}, []
        for l, layer in enumerate(fam.decoder_layers(model)):
            mlp = fam.get(layer, fam.mlp)
            self.handles.append(mlp.register_forward_pre_hook(lambda m, args, l=l: self._pre(l, args[0])))
            self.handles.append(mlp.register_forward_hook(lambda m, a, out, l=l: self._post(l, out)))

    def _pre(self, l: int, x) -> None:
        flat = x.reshape(-1, x.shape[-1]).to(self.tc.dtype)
        self.inputs[l] = flat
        self.acts[l] = self.tc.encode_sparse(l, flat)

    def _post(self, l: int, out):
        rec = self.tc.decode(l, self.acts, self.inputs).view(out.shape).to(out.dtype)
        rec[:, :1] = out[:, :1]
        return rec

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def replacement_logits(model, tc, tokens):
    """Logits [B, T, V] of the replacement model on token windows [B, T]."""
    import torch

    rep = _Replace(model, tc)
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits
    finally:
        rep.remove()


def evaluate(cfg_dict: dict, threads: int = 1) -> dict:
    """Ray task: per-layer held-out FVU / L0 / never-active fraction of the saved transcoder, and KL /
    next-token agreement of its replacement model on the held-out windows."""
    import torch

    from attribute_ray.transcoders import load_transcoder

    cfg = TrainConfig.model_validate(cfg_dict)
    act = cfg.activations_dir()
    meta = read_meta(act)
    device = _device(cfg)
    _threads(device, threads)
    tc = load_transcoder(str(Path(cfg.out) / "transcoder"), device=device, dtype=torch.float32)
    L, n = meta["n_layers"], meta["n_val"]
    xs = [torch.from_numpy(np.load(act / f"val_in_{l}.npy").astype(np.float32)) for l in range(L)]
    layers = []
    for t in range(L):
        y = torch.from_numpy(np.load(act / f"val_out_{t}.npy").astype(np.float32)).double()
        err, l0, used = 0.0, 0.0, torch.zeros(tc.n_features(t), dtype=torch.bool)
        for a in range(0, n, 4096):
            chunk = [x[a : a + 4096].to(device) for x in xs]
            acts = {s: tc.encode_sparse(s, chunk[s]) for s in tc.sources(t)}
            pred = tc.decode(t, acts, chunk).double().cpu()
            err += float(((pred - y[a : a + 4096]) ** 2).sum())
            l0 += acts[t].values.gt(0).sum().item()
            used[acts[t].features[acts[t].values > 0].cpu()] = True
        var = float(((y - y.mean(0)) ** 2).sum())
        layers.append({"layer": t, "fvu": err / max(var, 1e-30), "l0": l0 / n, "unused_val_frac": 1 - used.float().mean().item()})
    model = _load_model(cfg, device)
    tc = tc.to(dtype=_torch_dtype(cfg.model_dtype))
    windows = np.load(act / "windows.npy")[meta["n_train_windows"]:]
    kl_sum, agree, count = 0.0, 0, 0
    for a in range(0, len(windows), cfg.batch_size):
        tokens = torch.from_numpy(windows[a : a + cfg.batch_size].astype(np.int64)).to(device)
        with torch.no_grad():
            ref = model(input_ids=tokens).logits[:, 1:].float()
        rep = replacement_logits(model, tc, tokens)[:, 1:].float()
        lp, lq = ref.log_softmax(-1), rep.log_softmax(-1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        agree += int((ref.argmax(-1) == rep.argmax(-1)).sum())
        count += ref.shape[0] * ref.shape[1]
    return {"layers": layers, "kl": kl_sum / count, "agreement": agree / count, "n_eval_tokens": count}


# ===== driver =====================================================================================


def _check_identity(cfg: TrainConfig, out: Path, *, write: bool) -> None:
    """Refuse to resume a run made with other settings; `write` records them (once the data is ready, so a
    typo in --dataset does not pin the folder)."""
    path = out / "config.json"
    ident = cfg.train_identity()
    if path.is_file():
        old = json.loads(path.read_text()).get("identity", {})
        if old != ident:
            diff = sorted(k for k in set(ident) | set(old) if ident.get(k) != old.get(k))
            raise ValueError(f"{out} holds a training run with different settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} → {ident.get(k)!r}' for k in diff)}); "
                             "use another --out or delete it")
    elif write:
        _atomic_write(path, json.dumps({"identity": ident}, indent=2))


def _print_line(s: dict) -> None:
    resumed = f", resumed from step {s['resumed_from']}" if s.get("resumed_from") else ""
    print(f"layer {s['layer']:>2}: {s['steps']} steps in {s['train_seconds']:.1f}s ({s['tokens_per_s']:,.0f} tok/s{resumed}); "
          f"held-out FVU {s['val_fvu']:.4f}, L0 {s['l0']:.1f}, dead {100 * s['dead_frac']:.1f}%", flush=True)


def _train_all(cfg: TrainConfig, meta: dict, fail_after: int | None) -> dict[int, dict]:
    import ray

    L = meta["n_layers"]
    wanted = cfg.layers if cfg.layers is not None else list(range(L))
    bad = [l for l in wanted if l >= L]
    if bad:
        raise ValueError(f"--layers {bad} out of range: the model has {L} layers")
    units = [list(range(L))] if cfg.kind == "clt" else [[l] for l in range(L)]
    summaries: dict[int, dict] = {}  # every finished layer, also those other invocations (--layers) trained
    pending = []
    for layers in units:
        st = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, layers[0])).state()
        if st and st.get("done"):
            for s in st["summary"]:
                summaries[s["layer"]] = s
        elif layers[0] in wanted:
            pending.append(layers)
    if summaries:
        print(f"finished already: layers {sorted(summaries)}")
    if not pending:
        return summaries
    _init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = cfg.num_workers or max(1, gpus or cpus)
    task = ray.remote(train_layers).options(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=2)
    print(f"training {len(pending)} {'CLT' if cfg.kind == 'clt' else cfg.kind + ' layer'}"
          f"{'s' if len(pending) > 1 else ''} on {min(workers, len(pending))} worker(s) "
          f"({'GPU' if gpus else 'CPU'}), {cfg.steps} steps × {cfg.batch_tokens} tokens, "
          f"{cfg.n_features(meta['d_model'])} latents, k={cfg.k}, lr {cfg.learning_rate(meta['d_model']):.2e}", flush=True)
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
            errors.append(f"{_layer_label(layers, cfg.kind)}: {type(cause).__name__}: {cause}")
    if errors:
        raise TrainingFailed("training failed for " + "; ".join(errors) + " — re-run the same command to resume")
    return summaries


def _print_report(report: dict) -> None:
    print(f"\n{'layer':>5}  {'FVU':>8}  {'L0':>6}  {'dead':>6}  {'unused':>6}")
    for r in report["layers"]:
        print(f"{r['layer']:>5}  {r['fvu']:>8.4f}  {r['l0']:>6.1f}  {100 * r['dead_frac']:>5.1f}%  {100 * r['unused_val_frac']:>5.1f}%")
    print(f"replacement model ({report['n_eval_tokens']:,} held-out tokens): KL(model ‖ replacement) "
          f"{report['kl']:.4f} nats/token, next-token agreement {100 * report['agreement']:.1f}%")


def run(cfg: TrainConfig, *, fail_after: int | None = None) -> dict:
    """Run or resume every stage; returns the report (a partial one, without KL, while layers are missing)."""
    import ray

    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CorpusError(f"output location {cfg.out!r} is not writable: {type(e).__name__}: {e}") from e
    _check_identity(cfg, out, write=False)
    if fail_after is None and os.environ.get(FAIL_AFTER_ENV):
        fail_after = int(os.environ[FAIL_AFTER_ENV])
    t0 = time.perf_counter()
    meta = ensure_activations(cfg)
    _check_identity(cfg, out, write=True)
    summaries = _train_all(cfg, meta, fail_after)
    L = meta["n_layers"]
    missing = [l for l in range(L) if l not in summaries]
    base = {"kind": cfg.kind, "model": cfg.model, "dataset": cfg.dataset, "n_layers": L, "d_model": meta["d_model"],
            "n_features": cfg.n_features(meta["d_model"]), "k": cfg.k, "steps": cfg.steps, "batch_tokens": cfg.batch_tokens,
            "lr": cfg.learning_rate(meta["d_model"]), "n_train_tokens": meta["n_train"], "n_val_tokens": meta["n_val"],
            "transcoder": None, "training": [summaries[l] for l in sorted(summaries)]}
    if missing:
        print(f"layers {missing} are not trained yet: the transcoder is assembled once every layer is done")
        return {**base, "missing_layers": missing}
    tc = assemble(cfg, meta)
    path = write_transcoder(tc, out / "transcoder", meta["model_type"])
    _init_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = 1 if gpus else max(1, min(8, int(ray.available_resources().get("CPU", 1))))
    task = ray.remote(evaluate).options(num_cpus=cpus, num_gpus=1 if gpus else 0, max_retries=2)
    ev = ray.get(task.remote(cfg.model_dump(), cpus))
    for r in ev["layers"]:
        r["dead_frac"] = summaries[r["layer"]]["dead_frac"]
    report = {**base, "transcoder": str(path), "dtype": cfg.dtype, **ev, "seconds": time.perf_counter() - t0}
    _atomic_write(out / "report.json", json.dumps(report, indent=2))
    _print_report(report)
    print(f"transcoder → {path}; report → {out / 'report.json'}")
    return report


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    num = lambda s: int(s.replace("_", ""))  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m jobs.train_transcoder", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF id, local folder or .gguf file")
    p.add_argument("--dataset", required=True, help="HF dataset id, or a .txt/.jsonl/.parquet file or directory")
    p.add_argument("--split")
    p.add_argument("--text-column")
    p.add_argument("--kind", choices=["plt", "skip-plt", "clt"], help="default skip-plt")
    p.add_argument("--out", required=True, help="output directory (local or shared filesystem)")
    p.add_argument("--activations", help="activation cache directory (default OUT/activations); share it between runs")
    p.add_argument("--n-tokens", type=num, help="training tokens (default 100_000)")
    p.add_argument("--val-tokens", type=num, help="held-out tokens (default 4096)")
    p.add_argument("--ctx-len", type=int, help="window length incl. BOS (default 128)")
    p.add_argument("--no-bos", dest="bos", action="store_false", default=None)
    p.add_argument("--filter-bos", action="store_true", default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--features", type=num, help="latents per layer")
    g.add_argument("--expansion", type=int, help="latents = expansion × d_model (default 8)")
    p.add_argument("--k", type=int, help="TopK (default 32)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3 / sqrt(latents / 2**14))")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--lr-decay", type=float, help="fraction of steps with linear decay to 0 at the end (default 0.2)")
    p.add_argument("--batch-tokens", type=num, help="tokens per step (default 4096)")
    p.add_argument("--steps", type=num, help="steps per layer (default 1000)")
    p.add_argument("--checkpoint-every", type=num, help="steps between checkpoints (default 200)")
    p.add_argument("--skip-init", choices=["lstsq", "zeros"])
    p.add_argument("--normalize-decoder", action="store_true", default=None)
    p.add_argument("--dead-tokens", type=num)
    p.add_argument("--layers", help="per-layer kinds only: e.g. 0,1,5-9 (default all)")
    p.add_argument("--num-workers", type=int, help="concurrent training tasks (default #GPUs, else #CPUs)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--model-dtype", choices=DTYPES)
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the saved transcoder (default float32)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default 8)")
    p.add_argument("--seed", type=int)
    a = vars(p.parse_args(argv))
    return TrainConfig(**{k: v for k, v in a.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (CorpusError, ValueError, TrainingFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
