"""Assembly: the trained units' final checkpoints → one library `Transcoder` (raw space: the per-layer scales
folded into the weights), saved in the sparsify format that `load_transcoder` reads."""

from __future__ import annotations

from pathlib import Path

import torch

from attribute_ray.devices import DTYPES
from attribute_ray.files import atomic_path
from attribute_ray.training.checkpoints import load_trained
from attribute_ray.training.config import TrainConfig
from attribute_ray.transcoders import Activation, Decoder, Encoder, Hookpoints, Skip, Transcoder, save_sparsify


def assemble(cfg: TrainConfig, meta: dict) -> Transcoder:
    """The in-memory `Transcoder` (dtype `cfg.dtype`) from the final checkpoints of every layer.

    With x = x_raw·s_in and y = y_raw·s_out: W_enc·s_in, W_dec / s_out, b_dec / s_out, W_skip·s_in / s_out."""
    L = meta["n_layers"]
    encoders: dict[int, Encoder] = {}
    decoders: dict[tuple[int, int], Decoder] = {}
    biases: dict[int, torch.Tensor] = {}
    skips: dict[tuple[int, int], Skip] = {}
    k = None
    for layers in cfg.units(L):
        model, s_in, s_out, _ = load_trained(cfg, meta, layers)
        k = model.k
        with torch.no_grad():
            for i, l in enumerate(layers):
                encoders[l] = Encoder(model.W_enc[i] * s_in[i], model.b_enc[i].clone())
                biases[l] = model.b_dec[i] / s_out[i]
                if model.W_skip is not None:
                    skips[(l, l)] = Skip(model.W_skip[i] * (s_in[i] / s_out[i]))
            for i, j in model.pairs:
                decoders[(layers[i], layers[j])] = Decoder(model.W_dec[f"{i}_{j}"] / s_out[j])
    tc = Transcoder(
        encoders=[encoders[l] for l in range(L)], decoders=decoders, biases=[biases[l] for l in range(L)],
        activation=Activation("topk", k=k, relu_before_topk=True), skips=skips, hookpoints=Hookpoints("mlp_in", "mlp_out"),
        name=str(Path(cfg.out) / "transcoder"), format="sparsify",
    )
    return tc.to(dtype=DTYPES[cfg.dtype])


def write_transcoder(tc: Transcoder, out: str | Path, model_type: str) -> Path:
    """Save `tc` as a sparsify folder at `out` (``h.N.mlp`` for GPT-2, else ``layers.N.mlp``), replacing any
    previous one atomically."""
    with atomic_path(out) as tmp:
        save_sparsify(tc, tmp, layer_prefix="h" if model_type == "gpt2" else "layers")
    return Path(out)
