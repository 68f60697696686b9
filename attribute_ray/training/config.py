"""The settings of one training run (`TrainConfig`); the command line of `jobs.train_transcoder` is generated
from it (attribute_ray/config_args.py), so every field's description is also its ``--help``."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from attribute_ray.corpus import CorpusSettings
from attribute_ray.devices import resolve_device

Kind = Literal["plt", "skip-plt", "clt"]
Dtype = Literal["float32", "float16", "bfloat16"]


class TrainConfig(CorpusSettings):
    """What to train, on what data, and how. `data_identity` and `train_identity` say which fields must
    match for an activation cache to be reused and for a re-run to resume."""

    model: str = Field(description="HF id, local folder or .gguf file of the model whose MLPs are learnt")
    kind: Kind = Field("skip-plt", description="per-layer transcoder (plt), with a linear skip (skip-plt), "
                                               "or an untied cross-layer transcoder (clt)")
    out: str = Field(description="output directory (local or shared filesystem)")
    activations: str | None = Field(None, description="activation cache directory (default OUT/activations); "
                                                      "share it between runs")
    n_tokens: int = Field(100_000, ge=1, description="training tokens (text tokens, BOS excluded)")
    val_tokens: int = Field(4096, ge=1, description="held-out tokens (whole windows)")
    ctx_len: int = Field(128, ge=2, description="window length in tokens, BOS included")
    features: int | None = Field(None, ge=1, description="latents per layer (default expansion × d_model)")
    expansion: int = Field(8, ge=1, description="latents = expansion × d_model unless --features is given")
    k: int = Field(32, ge=1, description="TopK: active latents per token and layer")
    lr: float | None = Field(None, gt=0, description="Adam learning rate (default 1e-3 / sqrt(latents / 2**14))")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps (default min(100, steps // 10))")
    lr_decay: float = Field(0.2, ge=0, le=1, description="fraction of the steps at the end with linear decay to 0")
    batch_tokens: int = Field(4096, ge=1, description="tokens per step")
    steps: int = Field(1000, ge=1, description="steps per layer (per CLT)")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    skip_init: Literal["lstsq", "zeros"] = Field("lstsq", description="skip-plt: initialise the skip and b_dec by "
                                                                      "least squares, or start the skip at 0")
    normalize_decoder: bool = Field(False, description="rescale decoder rows to unit norm after every step")
    dead_tokens: int = Field(1_000_000, ge=1, description="a latent is dead if it has not fired in this many tokens")
    auxk_alpha: float = Field(1 / 32, ge=0, description="weight of the auxiliary-k loss that trains dead latents on the "
                                                         "residual (0: off); per-layer kinds")
    stream: bool = Field(False, description="train online: the model runs once per step and every layer trains on its "
                                            "activations (no training cache on disk: for runs of millions of tokens)")
    layers: list[int] | None = Field(None, description="per-layer kinds only: layers to train in this invocation, "
                                                       "e.g. 0,1,5-9 (default all)")
    num_workers: int | None = Field(None, ge=1, description="concurrent training tasks (default #GPUs, else #CPUs)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    model_dtype: Dtype = Field("float32", description="dtype the model runs in (activations, evaluation)")
    dtype: Dtype = Field("float32", description="dtype of the saved transcoder")
    batch_size: int = Field(8, ge=1, description="windows per forward pass (activations, evaluation)")
    seed: int = Field(0, description="seed of the initialisation and of the batch order")

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

    def units(self, n_layers: int) -> list[list[int]]:
        """The layer groups trained together: one per layer, or every layer at once for a CLT."""
        return [list(range(n_layers))] if self.kind == "clt" else [[l] for l in range(n_layers)]

    def unit_label(self, layers: list[int]) -> str:
        return "clt" if self.kind == "clt" else f"layer_{layers[0]}"

    def activations_dir(self) -> Path:
        return Path(self.activations) if self.activations else Path(self.out) / "activations"

    def data_identity(self) -> dict:
        """What must match for an activation cache to be reused."""
        return self.model_dump(include={"model", "dataset", "split", "text_column", "n_tokens", "val_tokens",
                                        "ctx_len", "bos", "filter_bos", "model_dtype", "stream"})

    def train_identity(self) -> dict:
        """What must match for a re-run to resume the same training."""
        return self.model_dump(exclude={"out", "activations", "layers", "num_workers", "device", "dtype",
                                        "batch_size", "checkpoint_every"})

    def train_hash(self) -> str:
        """Short digest of `train_identity` (stored in every checkpoint's state)."""
        return hashlib.sha256(json.dumps(self.train_identity(), sort_keys=True).encode()).hexdigest()[:16]

    def torch_device(self, threads: int = 1) -> torch.device:
        """The device of a training task; on the CPU the task also uses `threads` intra-op threads."""
        device = resolve_device(self.device)
        if device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        return device
