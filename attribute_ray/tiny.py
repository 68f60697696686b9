"""Tiny random models, tokenizers and transcoders built in-process (no network).

`save_tiny_model(dir, family)` writes a loadable HF folder (config, safetensors, tokenizer) — the
fixture the CLI/loader tests use; run ``python -m attribute_ray.tiny DIR [family]`` to make one by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from attribute_ray.transcoders import Activation, Decoder, Encoder, Hookpoints, Skip, Transcoder

WORDS = (
    "the a of to and in is was for on that with as by at it from his her he she they capital france paris "
    "city river big small red blue green one two three cat dog ran sat over under when where who what "
    "Michael Jordan plays basketball game team score "
).split()
SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
VOCAB = 64
FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gpt2")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_config(family: str, n_layers: int = 3, d_model: int = 32):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=1024, n_inner=64, **common)
    kw = dict(
        hidden_size=d_model, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, **common,
    )
    if family == "llama":
        return LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, **kw)
    if family == "qwen2":
        return Qwen2Config(rms_norm_eps=1e-6, **kw)
    if family == "qwen3":
        return Qwen3Config(rms_norm_eps=1e-6, head_dim=8, **kw)
    if family == "gemma2":
        return Gemma2Config(
            head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0, rms_norm_eps=1e-6, **kw,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, n_layers: int = 3):
    """(model, tokenizer) with random weights; norm gains are randomised so a wrong gain is visible."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, n_layers)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim >= 2 else 0.2)  # larger than HF init: non-trivial attention
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and "bias" not in name:
                p.copy_((0.0 if family == "gemma2" else 1.0) + 0.3 * torch.randn_like(p))
    return model, tiny_tokenizer()


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0) -> Path:
    model, tok = tiny_model(family, seed)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_transcoder(
    n_layers: int,
    d_model: int,
    *,
    n_features: int = 48,
    kind: str = "plt",
    activation: Activation = Activation("topk", k=6),
    skip: bool = False,
    gates: bool = False,
    hookpoints: Hookpoints = Hookpoints(),
    seed: int = 0,
) -> Transcoder:
    """kind: "plt", "clt" (untied, every later layer) or "concat" (per-target tied CLT).
    `gates` adds clt-training post_enc offsets and scales; thresholds are drawn for JumpReLU."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    F, D, L = n_features, d_model, n_layers
    encoders = [
        Encoder(
            rnd(F, D, scale=D**-0.5),
            rnd(F, scale=0.3),
            (rnd(F).abs() * 0.3 + 0.1) if activation.kind == "jumprelu" else None,
        )
        for _ in range(L)
    ]
    decoders: dict[tuple[int, int], Decoder] = {}
    tied = [rnd(F, D, scale=0.3) for _ in range(L)]
    for s in range(L):
        targets = [s] if kind == "plt" else range(s, L)
        for t in targets:
            W = tied[t] if kind == "concat" else rnd(F, D, scale=0.3)
            off = rnd(F).abs() * 0.2 if gates else None
            sc = 1.0 + rnd(F, scale=0.2) if gates else None
            decoders[(s, t)] = Decoder(W, 1.0, off, sc)
    skips = {(t, t): Skip(rnd(D, D, scale=0.3 * D**-0.5)) for t in range(L)} if skip else {}
    return Transcoder(encoders, decoders, [rnd(D, scale=0.1) for _ in range(L)], activation, skips, hookpoints)


def transcoder_for(model, **kw) -> Transcoder:
    return random_transcoder(model.config.num_hidden_layers, model.config.hidden_size, **kw)


if __name__ == "__main__":
    out = save_tiny_model(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama")
    print(f"tiny model written to {out}")
