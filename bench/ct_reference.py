"""Run the reference, circuit-tracer 0.5.0 (TransformerLens backend), on our tiny in-memory HF models.

TransformerLens cannot load a local HF folder by itself (it knows Gemma-2 only by hub name, ignores
Llama's rope_theta, and hard-codes GPT-2's d_mlp = 4·d_model), so the `HookedTransformerConfig` is
built by hand from the HF config, the weights go through TransformerLens' own per-family converter
(fold_ln / center_writing_weights / center_unembed off, as circuit-tracer loads), and the model is
wrapped the way `TransformerLensReplacementModel.from_pretrained_and_transcoders` does. Every build
asserts that the TransformerLens logits equal the HF logits.

Needs the `parity` extra (``pip install -e '.[dev,parity]'``); see docs/method.md §9.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.graph import Graph
from circuit_tracer.replacement_model.replacement_model_transformerlens import (
    TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.utils.hf_utils import load_transcoders
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_gemma_weights,
    convert_gpt2_weights,
    convert_llama_weights,
    convert_qwen2_weights,
    convert_qwen3_weights,
)

LOGIT_ATOL = 1e-4
CONVERTERS: dict[str, Callable[[Any, HookedTransformerConfig], dict[str, torch.Tensor]]] = {
    "LlamaForCausalLM": convert_llama_weights,
    "Qwen2ForCausalLM": convert_qwen2_weights,
    "Qwen3ForCausalLM": convert_qwen3_weights,
    "Gemma2ForCausalLM": convert_gemma_weights,
    "GPT2LMHeadModel": convert_gpt2_weights,
}


def tl_config(hf_model: torch.nn.Module, n_ctx: int = 1024) -> HookedTransformerConfig:
    """HookedTransformerConfig for `hf_model`, from its HF config only (no hub look-ups, no defaults by name)."""
    c, arch = hf_model.config, type(hf_model).__name__
    if arch not in CONVERTERS:
        raise NotImplementedError(f"no TransformerLens conversion for {arch}")
    common: dict[str, Any] = dict(
        model_name=f"tiny-{c.model_type}", original_architecture=arch, n_layers=c.num_hidden_layers,
        d_model=c.hidden_size, n_heads=c.num_attention_heads, d_vocab=c.vocab_size, dtype=torch.float32,
        device="cpu", init_weights=False, default_prepend_bos=False,
    )
    if arch == "GPT2LMHeadModel":
        if not c.scale_attn_weights or c.reorder_and_upcast_attn:
            raise NotImplementedError("GPT-2 variant without standard attention scaling")
        return HookedTransformerConfig(
            **common, d_head=c.n_embd // c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=min(c.n_positions, n_ctx),
            eps=c.layer_norm_epsilon, act_fn=c.activation_function, normalization_type="LN",
            positional_embedding_type="standard", use_attn_scale=True,
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        )
    if getattr(c, "rope_scaling", None) and c.rope_scaling.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope_scaling {c.rope_scaling} is not mapped")
    if (getattr(c, "attention_bias", False) and arch != "Qwen2ForCausalLM") or getattr(c, "mlp_bias", False):
        raise NotImplementedError("the TransformerLens converter would drop attention/MLP biases")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kw: dict[str, Any] = dict(
        d_head=d_head, n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size,
        n_ctx=min(c.max_position_embeddings, n_ctx), eps=c.rms_norm_eps,
        act_fn=getattr(c, "hidden_activation", None) or c.hidden_act, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_base=c.rope_theta, rotary_dim=d_head,
        rotary_adjacent_pairs=False, final_rms=True, gated_mlp=True, use_attn_scale=True,
        use_qk_norm=arch == "Qwen3ForCausalLM",
    )
    if arch == "Gemma2ForCausalLM":  # W_E·sqrt(d_model) and the 1+w gains are done by convert_gemma_weights
        kw.update(
            attn_scale=math.sqrt(c.query_pre_attn_scalar), use_local_attn=True, window_size=c.sliding_window,
            # TL's built-in gemma-2 configs say ["global", "local"]·n; HF's layer_types is the truth.
            attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
            attn_scores_soft_cap=c.attn_logit_softcapping or -1.0,
            output_logits_soft_cap=c.final_logit_softcapping or -1.0,
            use_normalization_before_and_after=True,
        )
    elif getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention is only mapped for Gemma-2")
    return HookedTransformerConfig(**common, **kw)


def load_ct_transcoders(transcoder_dir: Path) -> Any:
    """circuit-tracer's own loaders on a local circuit-tracer directory (config.yaml + safetensors), fp32, eager."""
    transcoder_dir = Path(transcoder_dir)
    cfg = yaml.safe_load((transcoder_dir / "config.yaml").read_text())
    if cfg.get("activation") not in (None, "relu", "jump_relu", "jumprelu"):
        # 0.5.0's load_relu_transcoder ignores `activation`/`k` and would silently use ReLU (#94/#95).
        raise NotImplementedError(f"circuit-tracer 0.5.0 cannot load activation {cfg['activation']!r}")
    hooks = dict(feature_input_hook=cfg["feature_input_hook"], feature_output_hook=cfg["feature_output_hook"])
    if cfg["model_kind"] == "cross_layer_transcoder":  # load_transcoders would snapshot_download here
        return load_clt(str(transcoder_dir), scan=str(transcoder_dir), **hooks, device=torch.device("cpu"),
                        dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    n = len(list(transcoder_dir.glob("layer_*.safetensors")))
    cfg = {**cfg, "repo_id": "", "scan": str(transcoder_dir),
           "transcoders": cfg.get("transcoders") or [str(transcoder_dir / f"layer_{i}.safetensors") for i in range(n)]}
    return load_transcoders(cfg, torch.device("cpu"), torch.float32, lazy_encoder=False, lazy_decoder=False)


def replacement_model(
    hf_model: torch.nn.Module, tokenizer: Any, transcoder_dir: Path
) -> TransformerLensReplacementModel:
    """circuit-tracer's TransformerLensReplacementModel holding `hf_model`'s weights and the transcoders."""
    cfg = tl_config(hf_model)
    with torch.no_grad():
        state = {k: v.detach().clone().float() for k, v in CONVERTERS[cfg.original_architecture](hf_model, cfg).items()}
    model = TransformerLensReplacementModel(cfg, move_to_device=False)  # no tokenizer: TL would reload it by name
    # As HookedTransformer.from_pretrained with circuit-tracer's flags (fold_value_biases keeps TL's default).
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    model.tokenizer = tokenizer
    model._configure_replacement_model(load_ct_transcoders(transcoder_dir))
    return model.eval()


def check_logits(hf_model: torch.nn.Module, model: TransformerLensReplacementModel, tokens: torch.Tensor) -> float:
    """max |logits_HF − logits_TL| on `tokens`; raises AssertionError above LOGIT_ATOL."""
    with torch.no_grad():
        ref = hf_model(tokens.view(1, -1)).logits.float()
        got = model(tokens.view(1, -1)).float()
    diff = (ref - got).abs().max().item()
    assert diff <= LOGIT_ATOL, (
        f"TransformerLens conversion of {type(hf_model).__name__} is wrong: max|logits HF - TL| = {diff:.3g} "
        f"> {LOGIT_ATOL} (check tl_config: eps, rope, attention scale/softcaps, local-attention order, d_mlp)"
    )
    return diff


def circuit_tracer_graph(
    hf_model: torch.nn.Module,
    tokenizer: Any,
    transcoder_dir: Path,
    tokens: torch.Tensor,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 32,
    attribution_targets: Any = None,
) -> Graph:
    """circuit-tracer 0.5.0's unpruned attribution graph of `tokens` (1-D, must start with a special id so
    that nothing is prepended) on `hf_model`'s weights, fp32 on CPU."""
    tokens = torch.as_tensor(tokens).view(-1).long()
    if tokens[0].item() not in tokenizer.all_special_ids:
        raise ValueError("tokens must start with a special id (circuit-tracer would prepend one)")
    model = replacement_model(hf_model, tokenizer, transcoder_dir)
    check_logits(hf_model, model, tokens)
    return attribute(
        tokens, model, attribution_targets=attribution_targets, max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob, batch_size=batch_size, max_feature_nodes=max_feature_nodes,
    )


def circuit_tracer_logits(
    hf_model: torch.nn.Module, tokenizer: Any, transcoder_dir: Path, tokens: torch.Tensor
) -> torch.Tensor:
    """Logits [T, vocab] of the circuit-tracer replacement model (equal to the HF model's; checked)."""
    model = replacement_model(hf_model, tokenizer, transcoder_dir)
    check_logits(hf_model, model, tokens)
    with torch.no_grad():
        return model(torch.as_tensor(tokens).view(1, -1)).squeeze(0).float()


__all__ = ["circuit_tracer_graph", "circuit_tracer_logits", "replacement_model", "tl_config", "check_logits",
           "load_ct_transcoders"]
