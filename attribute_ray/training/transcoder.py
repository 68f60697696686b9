"""The trainable transcoder: the training-time form of a PLT, skip PLT or untied CLT.

It works in a scaled space: each layer's inputs are multiplied by ``s_in`` and its targets by ``s_out`` so that
both have mean norm √D (`layer_scales`); assembly folds the scales back into the weights
(attribute_ray/training/assemble.py). Per source layer i: a_i = TopK(ReLU(x_i W_enc[i]ᵀ + b_enc[i])).
Per target j: ŷ_j = Σ_{i ≤ j (CLT) or i = j} a_i W_dec[i→j] + b_dec[j] (+ x_j W_skip[j]ᵀ with a skip).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attribute_ray.training.config import TrainConfig


class TrainableTranscoder(nn.Module):
    """Transcoders of `n` layers of width `d`, `f` latents each, TopK `k`; `cross`: a CLT (every pair i ≤ j has a
    decoder), else one decoder per layer; `skip`: a linear skip per layer (initialised to 0)."""

    def __init__(self, n: int, d: int, f: int, k: int, *, cross: bool, skip: bool,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.n, self.d, self.f, self.k, self.cross = n, d, f, min(k, f), cross
        self.W_enc = nn.Parameter(torch.randn(n, f, d, generator=generator) / math.sqrt(d))  # [n, f, d]
        self.b_enc = nn.Parameter(torch.zeros(n, f))  # [n, f]
        self.pairs = [(i, j) for i in range(n) for j in range(i, n)] if cross else [(i, i) for i in range(n)]
        # small random decoder rows (norm 0.1): the first steps start near the b_dec (+ skip) solution
        self.W_dec = nn.ParameterDict({  # "i_j": [f, d]
            f"{i}_{j}": nn.Parameter(0.1 * torch.randn(f, d, generator=generator) / math.sqrt(d)) for i, j in self.pairs
        })
        self.b_dec = nn.Parameter(torch.zeros(n, d))  # [n, d]
        self.W_skip = nn.Parameter(torch.zeros(n, d, d)) if skip else None  # [n, d_out, d_in]

    def encode(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [B, k], indices [B, k]) of TopK(ReLU(pre)) for source layer `i`, x [B, d] scaled."""
        pre = F.linear(x, self.W_enc[i], self.b_enc[i]).relu()
        return pre.topk(self.k, dim=-1, sorted=False)

    def forward(self, xs: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
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

    def auxk_loss(self, xs: list[Tensor], residuals: list[Tensor], dead: Tensor) -> Tensor:
        """Σ‖ê_i − e_i‖², the auxiliary-k loss of Gao et al. (2024), "Scaling and evaluating sparse autoencoders":
        per source layer i, the top k_aux = d/2 ReLU pre-activations among its dead latents (`dead` [n, f] bool),
        decoded through their own-layer decoder rows without bias (ê_i), fit the main residual e_i = y_i − ŷ_i
        [B, d] (detached). Scaled by min(#dead / k_aux, 1) per layer; 0 when no latent is dead. It gives dead
        latents a gradient toward what the live ones miss."""
        k_aux = max(1, self.d // 2)
        total = xs[0].new_zeros(())
        for i, (x, e) in enumerate(zip(xs, residuals)):
            ids = dead[i].nonzero().squeeze(1).to(x.device)  # [n_dead]
            if len(ids) == 0:
                continue
            pre = F.linear(x, self.W_enc[i][ids], self.b_enc[i][ids]).relu()  # [B, n_dead]
            v, j = pre.topk(min(k_aux, len(ids)), dim=-1, sorted=False)
            e_hat = F.embedding_bag(ids[j], self.W_dec[f"{i}_{i}"], per_sample_weights=v, mode="sum")
            total = total + min(len(ids) / k_aux, 1.0) * ((e_hat - e.detach()) ** 2).sum()
        return total

    @torch.no_grad()
    def forward_raw(self, xs: list[Tensor], s_in: list[float], s_out: list[float]) -> list[Tensor]:
        """Raw-space reconstructions [n × [B, d]] (what the saved transcoder must reproduce)."""
        preds, _ = self([x * s for x, s in zip(xs, s_in)])
        return [p / s for p, s in zip(preds, s_out)]

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        for W in self.W_dec.values():
            W.div_(W.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def build_trainable(cfg: TrainConfig, meta: dict, layers: list[int]) -> TrainableTranscoder:
    """A freshly initialised transcoder for `layers` (seeded by `cfg.seed` and the first layer: reproducible)."""
    D = meta["d_model"]
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + (layers[0] if cfg.kind != "clt" else 99_991))
    return TrainableTranscoder(len(layers), D, cfg.n_features(D), cfg.k, cross=cfg.kind == "clt",
                               skip=cfg.kind == "skip-plt", generator=g)


def layer_scales(meta: dict, layers: list[int]) -> tuple[list[float], list[float]]:
    """(s_in, s_out) per layer: √D / mean norm of the training inputs and targets (activation meta.json)."""
    D = meta["d_model"]
    return ([math.sqrt(D) / max(meta["in_norm"][l], 1e-12) for l in layers],
            [math.sqrt(D) / max(meta["out_norm"][l], 1e-12) for l in layers])
