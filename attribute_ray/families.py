"""Model-family adapters: where each Hugging Face architecture keeps its embedding, norms, MLP and unembedding.

Adding a family is adding one `Family` entry. Attention needs no per-family code: the replacement model
swaps in its own attention function through transformers' attention registry and reuses the family's
``eager_attention_forward`` to compute patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from attribute_ray.errors import UnsupportedModelError

NormKind = Literal["rms", "rms_gemma", "layernorm"]


@dataclass(frozen=True)
class Family:
    """Attribute paths (relative to the causal-LM module, or to one decoder layer for the per-layer names)."""

    name: str
    model_types: tuple[str, ...]
    norm: NormKind
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    # per decoder layer:
    attn: str = "self_attn"
    mlp: str = "mlp"
    mlp_norm: str = "post_attention_layernorm"
    block_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    post_mlp_norm: str | None = None
    # in `attn`: the output projection (every family here is sequential: the residual after attention is
    # resid_pre + branch(proj(z)), the branch, the projection and any post-attention norm, acting position by
    # position) and the value projection of the attention's input (GPT-2 fuses q, k, v in one Conv1D, v last)
    out_proj: str = "o_proj"
    v_proj: str = "v_proj"
    fused_qkv: bool = False

    def get(self, root: nn.Module, path: str) -> nn.Module:
        for part in path.split("."):
            root = getattr(root, part)
        return root

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.get(model, self.layers))

    def output_projection(self, layer: nn.Module) -> nn.Module:
        """One decoder layer's attention output projection."""
        return self.get(layer, f"{self.attn}.{self.out_proj}")

    def value_weight(self, layer: nn.Module) -> Tensor:
        """W_V [KV·dh, D] of one decoder layer: v = x·W_Vᵀ (+ bias)."""
        proj = self.get(layer, f"{self.attn}.{self.v_proj}")
        if self.fused_qkv:  # Conv1D: weight [D, 3·D], output = x·weight
            return proj.weight[:, 2 * proj.weight.shape[1] // 3 :].T
        return proj.weight

    def unembedding(self, model: nn.Module) -> Tensor:
        """W_U as [d_model, vocab]."""
        return self.get(model, self.unembed).weight.T


LLAMA = Family("llama", ("llama", "mistral"), "rms")
QWEN2 = Family("qwen2", ("qwen2",), "rms")
QWEN3 = Family("qwen3", ("qwen3",), "rms")
GEMMA2 = Family(
    "gemma2",
    ("gemma2",),
    "rms_gemma",
    mlp_norm="pre_feedforward_layernorm",
    block_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    post_mlp_norm="post_feedforward_layernorm",
)
GPT2 = Family(
    "gpt2",
    ("gpt2",),
    "layernorm",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn="attn",
    mlp_norm="ln_2",
    block_norms=("ln_1", "ln_2"),
    out_proj="c_proj",
    v_proj="c_attn",
    fused_qkv=True,
)
FAMILIES = (LLAMA, QWEN2, QWEN3, GEMMA2, GPT2)


def family_for(config) -> Family:
    for fam in FAMILIES:
        if config.model_type in fam.model_types:
            return fam
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(f"model_type {config.model_type!r} is not supported; supported: {supported}")


# ----- norms with a frozen scale ----------------------------------------------------------------


def norm_eps(norm: nn.Module) -> float:
    """The eps the module really uses (HF RMSNorm stores `variance_epsilon`, Gemma `eps`, LayerNorm `eps`)."""
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise UnsupportedModelError(f"cannot find eps on norm module {type(norm).__name__}")


def norm_scale(kind: NormKind, norm: nn.Module, x: Tensor) -> Tensor:
    """The data-dependent factor of the norm: 1/rms(x) or 1/std(x), shape [..., 1], computed in fp32."""
    x = x.float()
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps(norm))


def norm_normalized(kind: NormKind, x: Tensor, scale: Tensor) -> Tensor:
    """x·scale (centred first for LayerNorm): the norm output before the gain, fp32."""
    x = x.float()
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x * scale


def norm_apply_gain(kind: NormKind, norm: nn.Module, normalized: Tensor, dtype: torch.dtype) -> Tensor:
    """Gain (and bias) of the norm, cast like the HF module does."""
    if kind == "rms":
        return norm.weight * normalized.to(dtype)
    if kind == "rms_gemma":
        return (normalized * (1.0 + norm.weight.float())).to(dtype)
    out = normalized.to(dtype) * norm.weight
    return out + norm.bias if norm.bias is not None else out
