"""Named model + transcoder pairs, usable wherever a pair is taken (library, CLI, later the service and jobs).

Hub presets need the Hugging Face hub (or a filled HF cache). The offline ``demo`` preset arrives with the
demo-transcoder issue.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    transcoder: str
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("smollm2-135m-clt", "HuggingFaceTB/SmolLM2-135M", "nev/SmolLM2-CLT-135M-73k-k32",
               "SmolLM2-135M with the reference project's per-target-tied TopK CLT (30 layers, 73,728 features/layer)"),
        Preset("llama-3.2-1b-plt", "meta-llama/Llama-3.2-1B", "mntss/transcoder-Llama-3.2-1B",
               "Llama-3.2-1B with circuit-tracer's per-layer skip transcoders (gated model: needs HF_TOKEN)"),
        Preset("gemma-2-2b-plt", "google/gemma-2-2b", "mwhanna/gemma-scope-transcoders",
               "Gemma-2-2B with GemmaScope JumpReLU transcoders (gated model: needs HF_TOKEN)"),
        Preset("gemma-2-2b-clt-426k", "google/gemma-2-2b", "mntss/clt-gemma-2-2b-426k",
               "Gemma-2-2B with circuit-tracer's 426k-feature CLT (gated model: needs HF_TOKEN)"),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
