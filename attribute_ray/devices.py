"""Device and dtype names → torch objects, with one meaning of "auto" for the CLI, the service and the jobs."""

from __future__ import annotations

from typing import Literal

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto": the first CUDA device when one is visible, else the CPU; anything else as torch reads it."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """"auto": bfloat16 on a GPU, float32 on the CPU; otherwise a key of `DTYPES`."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]
