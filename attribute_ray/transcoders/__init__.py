"""Transcoders in every published format, loaded into one `Transcoder` representation.

`load_transcoder(ref)` takes a local directory or a Hugging Face reference and detects the format:
circuit-tracer (``config.yaml``), sparsify/clt-training (``layers.N.mlp/cfg.json``) or GemmaScope
(``layer_N/**/params.npz``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import torch

from attribute_ray import hub
from attribute_ray.errors import TranscoderFormatError
from attribute_ray.transcoders import circuit_tracer as ct
from attribute_ray.transcoders import sparsify
from attribute_ray.transcoders.circuit_tracer import save_circuit_tracer
from attribute_ray.transcoders.sparsify import save_sparsify
from attribute_ray.transcoders.transcoder import (
    Activation,
    Decoder,
    Encoder,
    Hookpoints,
    Skip,
    Transcoder,
)

Format = Literal["auto", "sparsify", "circuit-tracer", "gemmascope"]

__all__ = [
    "Activation", "Decoder", "Encoder", "Hookpoints", "Skip", "Transcoder",
    "load_transcoder", "save_circuit_tracer", "save_sparsify",
]

# Short names circuit-tracer users know.
ALIASES = {"gemma": "mwhanna/gemma-scope-transcoders", "llama": "mntss/transcoder-Llama-3.2-1B"}


def load_transcoder(
    ref: str | os.PathLike | Transcoder,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    format: Format = "auto",
    hookpoints: Hookpoints | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transcoder:
    """Load a transcoder from a local directory or a hub reference (``user/repo[/sub][@rev]``, ``hf://...``).

    `hookpoints` overrides what the format/config says the transcoder reads and writes. Every tensor ends up in
    `dtype`, or, when files mix dtypes (clt-training's bf16 weights beside fp32 buffers), in the dtype that
    holds them all without loss.
    """
    if isinstance(ref, Transcoder):
        tc = ref if hookpoints is None else ref.with_hookpoints(hookpoints)
        return tc.to(device, dtype) if (device or dtype) else tc
    ref = ALIASES.get(str(ref), ref)
    name = str(ref) if hub.is_local(ref) else str(hub.HubRef.parse(str(ref), subfolder, revision))
    # Fetch only metadata first, then only the weight files the detected format needs.
    meta = hub.resolve(ref, subfolder=subfolder, revision=revision, allow_patterns=["config.yaml", "*cfg.json"])
    fmt = format if format != "auto" else _detect(meta)
    if fmt == "circuit-tracer":
        cfg = ct.read_config(meta)
        if cfg["model_kind"] == "cross_layer_transcoder":
            root = hub.resolve(ref, subfolder=subfolder, revision=revision, allow_patterns=["*.safetensors", "config.yaml"])
            tc = ct.load_clt(root, cfg, hookpoints=hookpoints, name=name)
        else:
            pattern = [] if "transcoders" in cfg else ["layer_*.safetensors"]
            root = hub.resolve(ref, subfolder=subfolder, revision=revision, allow_patterns=pattern + ["config.yaml"])
            files = ct.layer_files(root, cfg, lambda e: hub.resolve_file(e, root))
            if all(f.suffix == ".npz" for f in files):
                tc = ct.load_gemmascope(files, hookpoints=hookpoints or ct.hookpoints_from_config(cfg), name=name)
            else:
                tc = ct.load_transcoder_set(files, cfg, hookpoints=hookpoints, name=name)
    elif fmt == "sparsify":
        folders = [p.name for p in sparsify.find_hookpoints(meta).values()]
        # plus the training run's root config.json (per_layer_k, hookpoints_in), when there is one
        patterns = [f"{f}/*" for f in folders] + ["config.json"]
        root = hub.resolve(ref, subfolder=subfolder, revision=revision, allow_patterns=patterns)
        tc = sparsify.load_sparsify(root, hookpoints=hookpoints, name=name)
    elif fmt == "gemmascope":
        root = hub.resolve(ref, subfolder=subfolder, revision=revision, allow_patterns=["*params.npz"])
        tc = ct.load_gemmascope(_gemmascope_files(root), hookpoints=hookpoints, name=name)
    else:
        raise TranscoderFormatError(f"unknown transcoder format {fmt!r}")
    if dtype is None and len({t.dtype for t in tc.tensors() if t.is_floating_point()}) > 1:
        dtype = tc.common_dtype()
    return tc.to(device, dtype) if (device or dtype) else tc


def _detect(root: Path) -> str:
    if (root / "config.yaml").is_file():
        return "circuit-tracer"
    if sparsify.is_sparsify_dir(root):
        return "sparsify"
    if root.is_dir() and any(root.glob("layer_*/**/params.npz")):
        return "gemmascope"
    raise TranscoderFormatError(
        f"{root}: no transcoder found (expected config.yaml, layers.N.mlp/cfg.json folders, or layer_N/**/params.npz)"
    )


def _gemmascope_files(root: Path) -> list[Path]:
    by_layer: dict[int, list[Path]] = {}
    for p in root.glob("layer_*/**/params.npz"):
        layer = int(re.match(r"layer_(\d+)", p.relative_to(root).parts[0]).group(1))
        by_layer.setdefault(layer, []).append(p)
    if sorted(by_layer) != list(range(len(by_layer))):
        raise TranscoderFormatError(f"{root}: GemmaScope layers {sorted(by_layer)} are not 0..N")
    ambiguous = {k: v for k, v in by_layer.items() if len(v) > 1}
    if ambiguous:
        layer, paths = next(iter(ambiguous.items()))
        raise TranscoderFormatError(
            f"{root}: layer {layer} has {len(paths)} params.npz ({[str(p.relative_to(root)) for p in paths]}); "
            "pass subfolder= or a config.yaml listing one file per layer"
        )
    return [by_layer[i][0] for i in range(len(by_layer))]
