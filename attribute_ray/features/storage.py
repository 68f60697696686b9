"""The feature store (docs/formats.md §i): dashboards as one compact parquet per layer, read one at a time.

    {out_dir}/features/index.json              {"layers": {"l": {"file", "n_features"}}, "transcoder_id"}
    {out_dir}/features/layer_{l:03d}.parquet    one row per feature, sorted by feature (`STORE_SCHEMA`)

The service reads single dashboards (``read_feature``, with the feature's explanations from
``attribute_ray.explanations.store``, kept in the same folder); ``export_feature_json`` writes the frontend's
``{cantor(layer, feature)}.json`` files (docs/formats.md §f) from dashboards or a store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribute_ray.features.dashboards import quantiles_from_histogram
from attribute_ray.features.partials import FeatureKey
from attribute_ray.files import atomic_path, atomic_write

STORE_SCHEMA = pa.schema([
    ("feature", pa.int32()),
    ("index", pa.int64()),
    ("frequency", pa.float64()),
    ("act_min", pa.float64()),
    ("act_max", pa.float64()),
    ("dense", pa.bool_()),
    ("top_logits", pa.list_(pa.string())),
    ("bottom_logits", pa.list_(pa.string())),
    ("histogram", pa.list_(pa.float64())),
    ("examples_json", pa.string()),
])


def _features_dir(out_dir: str | os.PathLike) -> Path:
    p = Path(out_dir)
    return p if (p / "index.json").exists() and not (p / "features" / "index.json").exists() else p / "features"


def write_feature_store(
    dashboards: Mapping[FeatureKey, dict], out_dir: str | os.PathLike, *, transcoder_id: str | None = None
) -> Path:
    """Write ``out_dir/features/layer_{l:03d}.parquet`` (one row per feature, sorted; `STORE_SCHEMA`) for every
    layer in `dashboards`, and ``out_dir/features/index.json`` = {"layers": {"l": {"file", "n_features"}},
    "transcoder_id"}. Layers already listed in an existing index (and not rewritten) are kept. Every file is
    written atomically. Returns the index path."""
    fdir = Path(out_dir) / "features"
    by_layer: dict[int, list[dict]] = {}
    for (layer, _), d in dashboards.items():
        by_layer.setdefault(int(layer), []).append(d)
    index_path = fdir / "index.json"
    old = json.loads(index_path.read_text()) if index_path.exists() else {}
    entries = {l: e for l, e in old.get("layers", {}).items() if (fdir / e["file"]).exists()}
    ids = {d.get("transcoder_id", "") for d in dashboards.values()}
    if transcoder_id is not None:
        tid = transcoder_id
    else:
        tid = ids.pop() if len(ids) == 1 else old.get("transcoder_id", "")
    for layer, ds in sorted(by_layer.items()):
        ds = sorted(ds, key=lambda d: d["feature"])
        table = pa.table({
            "feature": [int(d["feature"]) for d in ds],
            "index": [int(d["index"]) for d in ds],
            "frequency": [float(d["activation_frequency"]) for d in ds],
            "act_min": [float(d["act_min"]) for d in ds],
            "act_max": [float(d["act_max"]) for d in ds],
            "dense": [bool(d["dense"]) for d in ds],
            "top_logits": [list(d["top_logits"]) for d in ds],
            "bottom_logits": [list(d["bottom_logits"]) for d in ds],
            "histogram": [[float(x) for x in d["histogram"]] for d in ds],
            "examples_json": [json.dumps(d["examples_quantiles"], separators=(",", ":")) for d in ds],
        }, schema=STORE_SCHEMA)
        name = f"layer_{layer:03d}.parquet"
        with atomic_path(fdir / name) as tmp:
            pq.write_table(table, tmp, compression="zstd", compression_level=19)
        entries[str(layer)] = {"file": name, "n_features": len(ds)}
    entries = dict(sorted(entries.items(), key=lambda kv: int(kv[0])))
    atomic_write(index_path, json.dumps({"layers": entries, "transcoder_id": tid}, indent=1))
    return index_path


@lru_cache(maxsize=8)
def _load_index(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text())


@lru_cache(maxsize=32)
def _load_layer(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, pa.Table]:
    table = pq.read_table(path)
    return table.column("feature").to_numpy().astype(np.int64), table


def _index(fdir: Path) -> dict:
    p = fdir / "index.json"
    return _load_index(str(p), p.stat().st_mtime_ns)


def _row_dashboard(row: dict, layer: int, transcoder_id: str) -> dict:
    return {
        "index": int(row["index"]),
        "transcoder_id": transcoder_id,
        "layer": int(layer),
        "feature": int(row["feature"]),
        "activation_frequency": float(row["frequency"]),
        "dense": bool(row["dense"]),
        "act_min": float(row["act_min"]),
        "act_max": float(row["act_max"]),
        # not stored: the default percentiles follow exactly from the histogram
        "quantile_values": quantiles_from_histogram(np.asarray(row["histogram"]), row["act_min"], row["act_max"]),
        "histogram": list(row["histogram"]),
        "top_logits": list(row["top_logits"]),
        "bottom_logits": list(row["bottom_logits"]),
        "examples_quantiles": json.loads(row["examples_json"]),
    }


def read_feature(out_dir: str | os.PathLike, layer: int, feature: int) -> dict | None:
    """The dashboard of (layer, feature) from a store written by ``write_feature_store`` (`out_dir` as given
    there, or its ``features`` folder), or None. Reads only that layer's file (LRU-cached per file version).
    It carries ``"explanations": [{"explainer", "text", "score"}, ...]``, best score first (docs/formats.md §l)."""
    from attribute_ray.explanations.store import read_explanations  # the explanations live in this folder

    fdir = _features_dir(out_dir)
    if not (fdir / "index.json").exists():
        return None
    index = _index(fdir)
    entry = index["layers"].get(str(int(layer)))
    if entry is None:
        return None
    p = fdir / entry["file"]
    st = p.stat()
    feats, table = _load_layer(str(p), st.st_mtime_ns, st.st_size)
    i = int(np.searchsorted(feats, int(feature)))
    if i == len(feats) or feats[i] != feature:
        return None
    row = {name: col[0] for name, col in table.slice(i, 1).to_pydict().items()}
    dashboard = _row_dashboard(row, layer, index.get("transcoder_id", ""))
    dashboard["explanations"] = [{"explainer": e.explainer, "text": e.text, "score": e.score}
                                 for e in read_explanations(out_dir, layer, feature)]
    return dashboard


def stored_features(out_dir: str | os.PathLike) -> list[FeatureKey]:
    """Every (layer, feature) with a dashboard in the store, sorted; [] when there is no store."""
    fdir = _features_dir(out_dir)
    if not (fdir / "index.json").exists():
        return []
    out = []
    for l, entry in sorted(_index(fdir)["layers"].items(), key=lambda kv: int(kv[0])):
        p = fdir / entry["file"]
        st = p.stat()
        out.extend((int(l), int(f)) for f in _load_layer(str(p), st.st_mtime_ns, st.st_size)[0].tolist())
    return out


def feature_logits(out_dir: str | os.PathLike,
                   keys: Iterable[FeatureKey] | None = None) -> dict[FeatureKey, tuple[list[str], list[str]]]:
    """{(layer, feature): (top_logits, bottom_logits)} of the stored dashboards of `keys` (default: all); features
    without a dashboard are absent, and without a store the result is empty. Reads only the layers asked for."""
    fdir = _features_dir(out_dir)
    if not (fdir / "index.json").exists():
        return {}
    layers = _index(fdir)["layers"]
    by_layer: dict[int, list[int] | None] = {int(l): None for l in layers} if keys is None else {}
    if keys is not None:
        for l, f in keys:
            by_layer.setdefault(int(l), []).append(int(f))
    out: dict[FeatureKey, tuple[list[str], list[str]]] = {}
    for layer, feats in sorted(by_layer.items()):
        entry = layers.get(str(layer))
        if entry is None:
            continue
        p = fdir / entry["file"]
        st = p.stat()
        stored, table = _load_layer(str(p), st.st_mtime_ns, st.st_size)
        rows = np.arange(len(stored)) if feats is None else np.flatnonzero(np.isin(stored, feats))
        top, bottom = table.column("top_logits").take(rows).to_pylist(), table.column("bottom_logits").take(rows).to_pylist()
        out.update({(layer, int(f)): (t, b) for f, t, b in zip(stored[rows].tolist(), top, bottom)})
    return out


def iter_store(out_dir: str | os.PathLike) -> Iterable[dict]:
    """Every dashboard in a store, layer by layer, feature order."""
    fdir = _features_dir(out_dir)
    index = _index(fdir)
    for l, entry in sorted(index["layers"].items(), key=lambda kv: int(kv[0])):
        table = pq.read_table(fdir / entry["file"])
        for row in table.to_pylist():
            yield _row_dashboard(row, int(l), index.get("transcoder_id", ""))


def export_feature_json(source: Mapping[FeatureKey, dict] | str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Write one ``{cantor(layer, feature)}.json`` per feature (the frontend's ``{scan}/{index}.json``) from
    dashboards or a feature store directory; returns the number of files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dashboards = source.values() if isinstance(source, Mapping) else iter_store(source)
    n = 0
    for d in dashboards:
        atomic_write(out / f"{d['index']}.json", json.dumps(d, separators=(",", ":")))
        n += 1
    return n
