"""Loading a Hugging Face causal LM and its tokenizer (hub id, local folder or local ``.gguf`` file), and the
tokenization every entry point shares (the BOS rule of docs/method.md §2)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from attribute_ray.errors import HubUnavailableError


def tokenize(tokenizer, prompt: str | list[int] | Tensor) -> Tensor:
    """[T] token ids; a special token is prepended unless the first token already is one (docs/method.md §2).
    Unlike circuit-tracer, a BOS id of 0 counts (it picks the first *truthy* id)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).flatten().cpu()
    if ids.numel() == 0:
        raise ValueError("empty prompt")
    if int(ids[0]) not in set(tokenizer.all_special_ids):
        candidates = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
        bos = next((c for c in candidates if c is not None), None)
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
    return ids


def _hf_kwargs(ref: str | os.PathLike, revision: str | None, trust_remote_code: bool) -> tuple[str, dict]:
    """(path, from_pretrained kwargs): a local .gguf file loads from its folder with gguf_file=."""
    path = str(ref)
    if path.endswith(".gguf") and os.path.isfile(path):
        folder, fname = os.path.split(os.path.abspath(path))
        return folder, dict(gguf_file=fname, trust_remote_code=trust_remote_code)
    return path, dict(revision=revision, trust_remote_code=trust_remote_code)


def load_tokenizer(ref: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, kwargs = _hf_kwargs(ref, revision, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise
        raise HubUnavailableError(f"could not load the tokenizer of {ref!r} from the Hugging Face hub or its cache: {e}") from e


def load_model(
    ref: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a hub id, a local directory, or a local ``.gguf`` file (dequantised)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code)
    path, kwargs = _hf_kwargs(ref, revision, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise
        raise HubUnavailableError(f"could not load model {ref!r} from the Hugging Face hub or its cache: {e}") from e
    return model.to(device), tokenizer
