"""Training data: token windows and the model's own MLP activations on them, cached as fp16 ``.npy`` files
(docs/formats.md §j).

OUT/activations/ (or ``--activations``) holds ``windows.npy`` [n_windows, T] int32 (the last ``n_val_windows``
held out), ``{train|val}_{in|out}_{l}.npy`` [n_windows·(T − 1), D] fp16 — each layer's MLP input ("mlp_in":
the MLP module input, after the norm's gain) and MLP output ("mlp_out"), position 0 dropped — and
``meta.json`` (written last: it marks the cache complete and holds the per-layer mean norms). With
``stream`` the training files hold only the first `stream_cached_windows` windows (the scales and the
initialisation come from them; training runs the model online, attribute_ray/training/stream.py).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from attribute_ray.corpus import CorpusError, read_texts, token_windows
from attribute_ray.devices import resolve_dtype
from attribute_ray.files import atomic_path, atomic_write
from attribute_ray.loading import load_model, load_tokenizer
from attribute_ray.replacement import ReplacementModel
from attribute_ray.training.config import TrainConfig
from attribute_ray.transcoders import Hookpoints


def read_meta(act_dir: str | Path) -> dict | None:
    """The cache's meta.json, or None while it is incomplete."""
    p = Path(act_dir) / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else None


def cached_activations(cfg: TrainConfig) -> dict | None:
    """meta.json of a complete cache made with `cfg`'s data settings; None if there is none yet; raises
    CorpusError if the folder holds activations made with other settings."""
    act_dir = cfg.activations_dir()
    meta = read_meta(act_dir)
    if meta is not None and meta["identity"] != cfg.data_identity():
        raise CorpusError(f"{act_dir} holds activations made with different settings: {meta['identity']}; "
                          "use another --out/--activations or delete it")
    return meta


def prepare_windows(cfg: TrainConfig) -> tuple[int, int]:
    """Tokenise the corpus into BOS windows → windows.npy; returns (n_train_windows, n_val_windows). The last
    ⌈val_tokens / (ctx_len − 1)⌉ windows are held out."""
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
    with atomic_path(cfg.activations_dir() / "windows.npy", suffix=".npy") as tmp:
        np.save(tmp, windows.astype(np.int32))
    return n_train, n_val


STREAM_INIT_TOKENS = 32_768  # training tokens cached in stream mode: per-layer scales, b_dec / skip initialisation


def stream_cached_windows(cfg: TrainConfig, n_train: int) -> int:
    """Training windows whose activations are cached: all of them, or in stream mode the first ones that hold
    `STREAM_INIT_TOKENS` tokens."""
    body = cfg.ctx_len - 1
    return min(n_train, -(-STREAM_INIT_TOKENS // body)) if cfg.stream else n_train


def collect_activations(cfg_dict: dict, n_train: int, n_val: int, threads: int = 1) -> dict:
    """Run the model over the cached windows of windows.npy (the first `stream_cached_windows` training windows and
    the `n_val` held-out ones); write every layer's fp16 activations, then meta.json (returned).
    Called in a Ray task (a GPU when the cluster has one)."""
    cfg = TrainConfig.model_validate(cfg_dict)
    act_dir = cfg.activations_dir()
    device = cfg.torch_device(threads)
    model, tokenizer = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.model_dtype, device))
    rm = ReplacementModel(model, tokenizer, None, hookpoints=Hookpoints("mlp_in", "mlp_out"))
    L, D = rm.n_layers, rm.d_model
    windows = np.load(act_dir / "windows.npy")
    T = windows.shape[1]
    n_cached = stream_cached_windows(cfg, n_train)
    cached = np.r_[0:n_cached, n_train : n_train + n_val]  # indices into windows
    norm_sum = {(site, l): 0.0 for site in ("in", "out") for l in range(L)}
    t0 = time.perf_counter()
    with ExitStack() as stack:
        files: dict[tuple[str, str, int], np.memmap] = {}
        for split, n in (("train", n_cached), ("val", n_val)):
            for site in ("in", "out"):
                for l in range(L):
                    tmp = stack.enter_context(atomic_path(act_dir / f"{split}_{site}_{l}.npy"))
                    files[(split, site, l)] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                                        shape=(n * (T - 1), D))
        for start in range(0, len(cached), cfg.batch_size):
            ids = cached[start : start + cfg.batch_size]
            batch = torch.from_numpy(windows[ids].astype(np.int64)).to(device)
            cap = rm.capture(batch, outputs=True)
            for site, store in (("in", cap.inputs), ("out", cap.outputs)):
                for l in range(L):
                    x = store[l][:, 1:].reshape(-1, D).float()
                    x16 = x.cpu().numpy().astype(np.float16)
                    if not np.isfinite(x16).all():
                        raise OverflowError(f"layer {l} mlp_{site} has values outside the fp16 range "
                                            f"(max |x| {x.abs().max().item():.3g})")
                    for i, w in enumerate(ids):
                        split, row = ("train", w) if w < n_train else ("val", w - n_train)
                        files[(split, site, l)][row * (T - 1) : (row + 1) * (T - 1)] = x16[i * (T - 1) : (i + 1) * (T - 1)]
                        if split == "train":
                            norm_sum[(site, l)] += float(x[i * (T - 1) : (i + 1) * (T - 1)].norm(dim=-1).double().sum())
        for mm in files.values():
            mm.flush()
        files.clear()  # close the memory maps before the files are renamed into place
    n_rows = n_cached * (T - 1)
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
    atomic_write(act_dir / "meta.json", json.dumps(meta, indent=2))
    return meta
