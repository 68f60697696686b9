"""The activation cache (docs/formats.md §g): sparse transcoder activations of a token corpus, in shards.

    {out}/manifest.json            written last; `config` = the settings a re-run must match to resume
    {out}/tokens/{id:06d}.parquet  sequence int64, tokens list<int32> (length ctx_len)
    {out}/shards/{id:06d}.parquet  layer int16, feature int32, sequence int64, position int16, activation float32,
                                   sorted by (sequence, position, layer, feature)

Shard `id` holds the consecutive windows [first_sequence, first_sequence + n_sequences); `sequence` is the global
window index. A row is one activation a'_{S,S} (what the feature's own decoder consumes, docs/method.md §2)
above `threshold`; with `bos`, position 0 of every window is skipped. A shard's token file is written before
its activation file, each under a temp name and then renamed, so a shard whose activation file exists is
complete. `out` is a local directory or any fsspec URL.

This module is the format's writer (``encode_windows``, ``write_shard``, ``write_manifest``) and reader
(``read_manifest``, ``read_shard``, ``cache_tokens_lookup``); ``jobs/cache_activations.py`` maps the writer
over a Ray actor pool and the dashboard passes (``attribute_ray.features``) read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from attribute_ray.corpus import CorpusSettings
from attribute_ray.errors import AttributeRayError
from attribute_ray.files import atomic_open
from attribute_ray.presets import resolve_refs
from attribute_ray.replacement import ReplacementModel

if TYPE_CHECKING:  # pandas only for the reader: the encoder actors start without it
    import pandas as pd

ACT_COLUMNS = ("layer", "feature", "sequence", "position", "activation")
IDENTITY = ("model", "transcoder", "dataset", "split", "text_column", "n_tokens", "ctx_len", "threshold", "bos",
            "filter_bos", "shard_windows")
"""The `CacheConfig` fields a cache is made of: a re-run with other values would mix two caches."""


class CacheMismatchError(AttributeRayError, ValueError):
    """The output folder holds a cache made with other settings."""


class CacheConfig(CorpusSettings):
    """What to cache and how (the flags of ``python -m jobs.cache_activations``)."""

    model: str | None = Field(None, description="a Hugging Face model id or a local folder (or give --preset)")
    transcoder: str | None = Field(None, description="a Hugging Face transcoder id or a local folder (or --preset)")
    preset: str | None = Field(None, description="a named model + transcoder pair; --model/--transcoder override it")
    n_tokens: int = Field(1_000_000, ge=1, description="text tokens to cache (the last partial window is dropped)")
    ctx_len: int = Field(256, ge=2, description="tokens per window, BOS included")
    out: str = Field(description="output directory or fsspec URI")
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    shard_windows: int = Field(256, ge=1, description="windows per output shard")
    threshold: float = Field(0.0, ge=0.0, description="keep activations above this")
    num_actors: int | None = Field(None, ge=1, description="encoder actors (default: one per GPU, else CPUs/2 up to 4)")
    device: str = Field("auto", description="encoder device: auto (CUDA when present), cpu, cuda, cuda:N")
    build_features: bool = Field(True, description="build feature dashboards from the cache afterwards")

    @model_validator(mode="after")
    def _refs(self) -> CacheConfig:
        refs = resolve_refs(self.preset, self.model, self.transcoder)
        self.model, self.transcoder = refs.model, refs.transcoder
        return self

    def identity(self) -> dict:
        """What must match for a re-run to resume the same cache (the manifest's `config`)."""
        return self.model_dump(include=set(IDENTITY))


# ----- writer ---------------------------------------------------------------------------------------------


def plan_shards(n_windows: int, shard_windows: int) -> list[tuple[int, int, int]]:
    """(id, first_sequence, n_sequences) of every shard of `n_windows` windows, `shard_windows` per shard."""
    return [(i, s, min(shard_windows, n_windows - s)) for i, s in enumerate(range(0, n_windows, shard_windows))]


@torch.no_grad()
def encode_windows(model: ReplacementModel, windows: np.ndarray, first: int, *, batch_size: int, threshold: float,
                   bos: bool) -> pa.Table:
    """Activation rows (`ACT_COLUMNS`, sorted like a shard) of token windows [n, T] whose first is sequence `first`:
    the gated activations above `threshold`, position 0 skipped with `bos`; `batch_size` windows per forward.

    Each batch is sorted on its own device (a stable sort by row of the layers' (row, feature)-sorted activations)
    and copied to the host once; batches follow each other in sequence order, so their concatenation is sorted."""
    tc = model.transcoder
    T = windows.shape[1]
    tables = []
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(np.asarray(windows[i : i + batch_size], np.int64)).to(model.device)
        parts: dict[str, list[torch.Tensor]] = {"rows": [], "layer": [], "feature": [], "activation": []}
        for layer, x in enumerate(model.capture(batch, outputs=False).inputs):
            acts = tc.encode_sparse(layer, x.reshape(-1, x.shape[-1]))  # sorted by (row, feature)
            values = tc.gated(layer, layer, acts.values, acts.features)  # what the decoder consumes
            keep = values > threshold
            if bos:
                keep &= (acts.rows % T) != 0
            parts["rows"].append(acts.rows[keep])
            parts["layer"].append(torch.full_like(parts["rows"][-1], layer, dtype=torch.int16))
            parts["feature"].append(acts.features[keep].int())
            parts["activation"].append(values[keep].float())
        rows, order = torch.cat(parts["rows"]).sort(stable=True)  # (row, layer, feature) order
        rows = rows.cpu().numpy()
        tables.append(pa.table({"layer": torch.cat(parts["layer"])[order].cpu().numpy(),
                                "feature": torch.cat(parts["feature"])[order].cpu().numpy(),
                                "sequence": (first + i + rows // T).astype(np.int64),
                                "position": (rows % T).astype(np.int16),
                                "activation": torch.cat(parts["activation"])[order].cpu().numpy()}))
    return pa.concat_tables(tables).combine_chunks()


def write_shard(out: str, shard_id: int, first: int, windows: np.ndarray, activations: pa.Table) -> int:
    """Write one shard's token windows [n, T], then its activation rows; returns the bytes written.

    Dictionary encoding only where values repeat (not `activation`: every value differs); tokens are one
    list<int32> array over the windows' buffer, without a Python list per window."""
    n, T = windows.shape
    tokens = pa.table({"sequence": np.arange(first, first + n, dtype=np.int64),
                       "tokens": pa.ListArray.from_arrays(np.arange(0, n * T + 1, T, dtype=np.int32),
                                                          np.ascontiguousarray(windows, np.int32).reshape(-1))})
    n_bytes = 0
    for kind, table in (("tokens", tokens), ("shards", activations)):  # activations last: they mark it complete
        with atomic_open(_join(out, f"{kind}/{shard_id:06d}.parquet")) as f:
            pq.write_table(table, f, compression="zstd", use_dictionary=[c for c in table.column_names
                                                                         if c not in ("activation", "tokens")])
            n_bytes += f.tell()
    return n_bytes


def completed_shards(out: str) -> set[int]:
    """Ids of the shards whose activation file exists."""
    fs, root = _fs(out)
    return {int(PurePosixPath(p).stem) for p in fs.glob(f"{root}/shards/*.parquet")}


def shard_rows(out: str, shard_id: int) -> int:
    """Activation rows of a complete shard (from the parquet footer)."""
    fs, root = _fs(out)
    with fs.open(f"{root}/shards/{shard_id:06d}.parquet") as f:
        return pq.ParquetFile(f).metadata.num_rows


def cache_bytes(out: str) -> int:
    """Bytes of every shard and token file."""
    fs, root = _fs(out)
    return sum(fs.size(p) for kind in ("shards", "tokens") for p in fs.glob(f"{root}/{kind}/*.parquet"))


def remove_temporaries(out: str) -> None:
    """Delete the temp files a crashed writer left behind."""
    fs, root = _fs(out)
    for p in fs.glob(f"{root}/*/*.tmp") + fs.glob(f"{root}/*.tmp"):
        fs.rm_file(p)


def check_resumable(cfg: CacheConfig) -> None:
    """Raise `CacheMismatchError` when `cfg.out` holds a cache made with other settings."""
    fs, root = _fs(cfg.out)
    if not fs.exists(f"{root}/manifest.json"):
        return
    old = read_manifest(cfg.out).get("config")
    if old != cfg.identity():
        raise CacheMismatchError(f"{cfg.out} holds a cache made with different settings: {old}; "
                                 "use another --out or delete it")


def make_manifest(cfg: CacheConfig, n_sequences: int, shards: list[tuple[int, int, int]], n_activations: dict[int, int],
                  *, layer_features: list[int] | None, last_run: dict) -> dict:
    """The manifest of a complete cache: `shards` from ``plan_shards``, `n_activations` {shard id: rows},
    `layer_features` the transcoder's features per layer (None when not loaded), `last_run` {"encoded_tokens",
    "encode_seconds"}. `n_tokens` counts text tokens only (the denominator of a feature's frequency)."""
    return {
        "config": cfg.identity(),
        "model": cfg.model,
        "transcoder": cfg.transcoder,
        "n_layers": None if layer_features is None else len(layer_features),
        "n_features": layer_features,
        "ctx_len": cfg.ctx_len,
        "n_sequences": n_sequences,
        "n_tokens": n_sequences * (cfg.ctx_len - (1 if cfg.bos else 0)),
        "bos": cfg.bos,
        "threshold": cfg.threshold,
        "dataset": {"id": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column},
        "shards": [{"id": sid, "first_sequence": first, "n_sequences": n, "n_activations": n_activations[sid]}
                   for sid, first, n in shards],
        "last_run": last_run,
    }


def write_manifest(out: str, manifest: dict) -> None:
    with atomic_open(_join(out, "manifest.json")) as f:
        f.write(json.dumps(manifest, indent=2).encode())


# ----- reader ---------------------------------------------------------------------------------------------


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    fs, root = _fs(cache_dir)
    return json.loads(fs.cat_file(f"{root}/manifest.json"))


def read_shard(cache_dir: str | os.PathLike, shard_id: int) -> pd.DataFrame:
    """Activation rows of one shard (columns `ACT_COLUMNS`)."""
    fs, root = _fs(cache_dir)
    return pq.read_table(f"{root}/shards/{shard_id:06d}.parquet", columns=list(ACT_COLUMNS), filesystem=fs).to_pandas()


def cache_tokens_lookup(cache_dir: str | os.PathLike) -> Callable[[list[int]], dict[int, list[int]]]:
    """A `tokens_lookup` for `build_dashboards` reading only the token shards holding the requested sequences."""
    fs, root = _fs(cache_dir)
    shards = sorted(read_manifest(cache_dir)["shards"], key=lambda s: s["first_sequence"])
    firsts = np.array([s["first_sequence"] for s in shards], np.int64)

    def lookup(sequences: list[int]) -> dict[int, list[int]]:
        seqs = np.unique(np.asarray(sequences, np.int64))
        which = np.searchsorted(firsts, seqs, "right") - 1
        out: dict[int, list[int]] = {}
        for w in np.unique(which[which >= 0]).tolist():
            want = seqs[which == w]
            t = pq.read_table(f"{root}/tokens/{shards[w]['id']:06d}.parquet", filesystem=fs)
            t = t.filter(pc.is_in(t.column("sequence"), value_set=pa.array(want, pa.int64())))
            out.update(zip(t.column("sequence").to_pylist(), t.column("tokens").to_pylist()))
        return out

    return lookup


def _fs(url: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path without a trailing slash) of a local path or URL."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/")


def _join(out: str | os.PathLike, rel: str) -> str:
    return f"{str(out).rstrip('/')}/{rel}"
