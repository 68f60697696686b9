"""msgpack wire format of a `Graph` (docs/formats.md §h): a versioned header plus numpy arrays as raw bytes.

    {"format": "attribute-ray.graph", "version": 1, "model": ..., "transcoder": ..., "prompt": ...,
     "settings": {...}, "scores": {...}, "n_layers": L, "vocab_size": V, "logit_targets": [[token, index], ...],
     "special_positions": [int, ...], "feature_labels": [str, ...] (optional),
     "arrays": {name: {"dtype": "<f4", "shape": [...], "data": b"..."}
                | {"masked": true, "shape": [R, N], "mask": packed bits, "values": array}}}

The adjacency rows are stored as a bit mask of their non-zero entries plus the non-zero values. Decoding executes no code
(plain msgpack types only, dtypes from a whitelist) and rejects unknown formats/versions.

This module works on a graph's fields by name (`Graph`'s dataclass fields, logit targets as (token, index)
pairs), never on the `Graph` class: graph.py imports this module, not the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import torch
from torch import Tensor

from attribute_ray.errors import AttributeRayError

FORMAT, VERSION = "attribute-ray.graph", 1
DTYPES = {"<f4", "<f2", "<i4", "<i8", "|b1", "<u2"}
ARRAYS = ("input_tokens", "active_features", "activation_values", "selected_features", "logit_probabilities", "rows")


class WireFormatError(AttributeRayError, ValueError):
    """Bytes that are not a graph this version of attribute-ray can read."""


def _array(t: Tensor) -> dict:
    a = t.detach().cpu().contiguous().numpy()
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _from_array(d: dict, name: str) -> Tensor:
    try:
        if d.get("masked"):
            R, N = d["shape"]
            values = _from_array(d["values"], name).numpy()
            mask = np.unpackbits(np.frombuffer(d["mask"], dtype=np.uint8), count=R * N).astype(bool)
            dense = np.zeros(R * N, dtype=values.dtype)
            dense[mask] = values
            return torch.from_numpy(dense.reshape(R, N))
        if d["dtype"] not in DTYPES:
            raise WireFormatError(f"array {name!r}: dtype {d['dtype']!r} not allowed")
        a = np.frombuffer(d["data"], dtype=np.dtype(d["dtype"]))
        return torch.from_numpy(a.reshape(d["shape"]).copy())
    except WireFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise WireFormatError(f"array {name!r} is malformed: {e}") from e


def _rows(rows: Tensor) -> dict:
    """Adjacency rows as a bit mask of the non-zero entries plus their values (causality leaves about half of
    every row zero, pruning far more): 1 bit + 4 bytes per non-zero instead of 4 bytes per entry."""
    bits = rows.view(torch.int32) if rows.dtype == torch.float32 else rows
    nz = (bits != 0).numpy()  # bitwise test keeps -0.0 exact
    return {"masked": True, "shape": list(rows.shape), "mask": np.packbits(nz, axis=None).tobytes(),
            "values": _array(rows[torch.from_numpy(nz)])}


def _labels(labels: Any) -> list[str] | None:
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise WireFormatError("feature_labels must be a list of strings")
    return labels


def to_msgpack(graph: Mapping[str, Any], scores: dict | None = None) -> bytes:
    """Encode a graph's fields (`graph`: name -> value, as `from_msgpack` returns them) and its scores."""
    arrays = {name: _array(graph[name]) for name in ARRAYS if name != "rows"}
    arrays["rows"] = _rows(graph["rows"])
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": graph["model_id"],
        "transcoder": graph["transcoder_id"],
        "prompt": graph["input_string"],
        "prompt_tokens": list(graph["prompt_tokens"]),
        "settings": graph["settings"],
        "scores": scores or {},
        "n_layers": graph["n_layers"],
        "vocab_size": graph["vocab_size"],
        "logit_targets": [[token, index] for token, index in graph["logit_targets"]],
        "special_positions": [int(p) for p in graph.get("special_positions") or []],
    }
    if graph.get("feature_labels") is not None:
        header["feature_labels"] = [str(label) for label in graph["feature_labels"]]
    return msgpack.packb({**header, "arrays": arrays}, use_bin_type=True)


def from_msgpack(data: bytes) -> tuple[dict[str, Any], dict]:
    """(fields, scores) from `to_msgpack` bytes: `fields` are `Graph`'s constructor arguments, with
    `logit_targets` as (token, index) pairs."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise WireFormatError(f"not msgpack: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise WireFormatError(f"not an attribute-ray graph (format={obj.get('format') if isinstance(obj, dict) else None!r})")
    if obj.get("version") != VERSION:
        raise WireFormatError(f"graph wire version {obj.get('version')!r} is not supported (this reader: {VERSION})")
    try:
        fields = {name: _from_array(obj["arrays"][name], name) for name in ARRAYS}
        fields.update(
            input_string=obj["prompt"],
            logit_targets=[(str(t), int(i)) for t, i in obj["logit_targets"]],
            n_layers=int(obj["n_layers"]),
            vocab_size=int(obj["vocab_size"]),
            model_id=obj["model"],
            transcoder_id=obj["transcoder"],
            settings=dict(obj["settings"]),
            prompt_tokens=[str(t) for t in obj.get("prompt_tokens", [])],
            special_positions=[int(p) for p in obj.get("special_positions", [])],  # optional: older bytes lack it
            feature_labels=_labels(obj.get("feature_labels")),  # optional, like special_positions
        )
    except WireFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise WireFormatError(f"graph header is malformed: {type(e).__name__}: {e}") from e
    # node order (docs/method.md §5): rows [n_sel + K, n_sel + (L+1)·T + K]
    n_sel, K, T = fields["selected_features"].numel(), len(fields["logit_targets"]), fields["input_tokens"].numel()
    if fields["rows"].shape != (n_sel + K, n_sel + (fields["n_layers"] + 1) * T + K):
        raise WireFormatError(f"rows shape {list(fields['rows'].shape)} does not match the node counts")
    if fields["feature_labels"] is not None and len(fields["feature_labels"]) != n_sel:
        raise WireFormatError(f"{len(fields['feature_labels'])} feature labels for {n_sel} selected features")
    if any(not 0 <= p < T for p in fields["special_positions"]):
        raise WireFormatError(f"special positions {fields['special_positions']} outside the prompt's {T} positions")
    return fields, dict(obj.get("scores") or {})
