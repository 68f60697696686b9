"""The explanations store (docs/formats.md §l): explanations of features, kept beside their dashboards.

    {features}/explanations/{explainer}/layer_{l:03d}.parquet   feature int32 (sorted), text string, score float64?

`{features}` is the feature store's folder (docs/formats.md §i) as ``read_feature`` finds it: `store_dir` itself
when it holds ``index.json``, else ``store_dir/features``. One file per explainer and layer: writes merge into
it (a feature's new explanation replaces its old one) and replace it atomically, so a crash leaves the previous
file, and two explainers never write the same file. Reads are cached per file version (mtime, size, inode).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from attribute_ray.errors import AttributeRayError
from attribute_ray.files import atomic_path

SCHEMA = pa.schema([("feature", pa.int32()), ("text", pa.string()), ("score", pa.float64())])
_EXPLAINER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_FILE = re.compile(r"layer_(\d{3,})\.parquet")


class ExplanationsError(AttributeRayError, ValueError):
    """An explanation that cannot be stored (bad explainer name, score outside [0, 1], negative ids)."""


@dataclass(frozen=True)
class Explanation:
    """One explanation of feature (layer, feature) by an explainer, with its detection score."""

    layer: int
    feature: int
    explainer: str
    text: str
    score: float | None  # balanced accuracy in [0, 1]; None when unscored


def explanations_dir(store_dir: str | os.PathLike) -> Path:
    """``{features}/explanations`` of a feature store given as ``read_feature`` accepts it."""
    p = Path(store_dir)
    features = p if (p / "index.json").exists() and not (p / "features" / "index.json").exists() else p / "features"
    return features / "explanations"


def _layer_file(root: Path, explainer: str, layer: int) -> Path:
    return root / explainer / f"layer_{layer:03d}.parquet"


@lru_cache(maxsize=64)
def _load(path: str, mtime_ns: int, size: int, inode: int) -> dict[int, tuple[str, float | None]]:
    t = pq.read_table(path, schema=SCHEMA)
    return {int(f): (str(x), s) for f, x, s in zip(*(t.column(c).to_pylist() for c in SCHEMA.names))}


def _read(path: Path) -> dict[int, tuple[str, float | None]]:
    """{feature: (text, score)} of one file; {} when it does not exist."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    return _load(str(path), st.st_mtime_ns, st.st_size, st.st_ino)  # a replaced file is a new inode


def _files(root: Path, explainer: str | None = None) -> Iterable[tuple[str, int, Path]]:
    """(explainer, layer, file) of every stored file (of one explainer)."""
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()) if explainer is None else [root / explainer]:
        if d.is_dir() and _EXPLAINER.fullmatch(d.name):
            for f in sorted(d.iterdir()):
                m = _FILE.fullmatch(f.name)
                if m:
                    yield d.name, int(m.group(1)), f


def _check(e: Explanation) -> None:
    if not _EXPLAINER.fullmatch(e.explainer):
        raise ExplanationsError(f"explainer name {e.explainer!r}: use lower-case letters, digits, '_' or '-'")
    if e.layer < 0 or e.feature < 0:
        raise ExplanationsError(f"negative layer or feature in {e}")
    if e.score is not None and not 0.0 <= e.score <= 1.0:
        raise ExplanationsError(f"score {e.score} of L{e.layer} #{e.feature} is not a balanced accuracy in [0, 1]")


def write_explanations(store_dir: str | os.PathLike, explanations: Iterable[Explanation]) -> None:
    """Merge `explanations` into the store: per (explainer, layer) file, a feature's new explanation replaces the
    stored one; each changed file is replaced atomically (an unchanged one is not rewritten)."""
    root = explanations_dir(store_dir)
    groups: dict[tuple[str, int], dict[int, tuple[str, float | None]]] = {}
    for e in explanations:
        _check(e)
        score = None if e.score is None else float(e.score)
        groups.setdefault((e.explainer, int(e.layer)), {})[int(e.feature)] = (str(e.text), score)
    for (explainer, layer), new in sorted(groups.items()):
        path = _layer_file(root, explainer, layer)
        old = _read(path)
        merged = {**old, **new}
        if merged == old:
            continue
        feats = sorted(merged)
        table = pa.table({"feature": feats, "text": [merged[f][0] for f in feats],
                          "score": [merged[f][1] for f in feats]}, schema=SCHEMA)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
            os.chmod(tmp, 0o644)


def _best_first(es: list[Explanation]) -> list[Explanation]:
    return sorted(es, key=lambda e: (e.score is None, -(e.score or 0.0), e.explainer))


def read_explanations(store_dir: str | os.PathLike, layer: int, feature: int) -> list[Explanation]:
    """Every stored explanation of (layer, feature), best score first (unscored last; ties by explainer name)."""
    root = explanations_dir(store_dir)
    found = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if _EXPLAINER.fullmatch(d.name):
                hit = _read(_layer_file(root, d.name, int(layer))).get(int(feature))
                if hit is not None:
                    found.append(Explanation(int(layer), int(feature), d.name, *hit))
    return _best_first(found)


def feature_labels(store_dir: str | os.PathLike) -> dict[tuple[int, int], str]:
    """{(layer, feature): the text of its best-scored non-empty explanation} over the whole store."""
    best: dict[tuple[int, int], list[Explanation]] = {}
    for explainer, layer, path in _files(explanations_dir(store_dir)):
        for feature, (text, score) in _read(path).items():
            if text.strip():
                best.setdefault((layer, feature), []).append(Explanation(layer, feature, explainer, text, score))
    return {k: _best_first(es)[0].text for k, es in sorted(best.items())}


def explained(store_dir: str | os.PathLike, explainer: str) -> set[tuple[int, int]]:
    """The (layer, feature) pairs that `explainer` has explained already (what a resumed run skips)."""
    return {(layer, f) for _, layer, path in _files(explanations_dir(store_dir), explainer) for f in _read(path)}


def labels_version(store_dir: str | os.PathLike | None) -> str:
    """A fingerprint of every stored explanation file (name, size, mtime): graphs labelled from the store are cached
    under it, so new explanations give new graphs instead of serving stale labels. "" without a store."""
    if store_dir is None:
        return ""
    stats = [(f"{e}/{l}", p.stat().st_size, p.stat().st_mtime_ns) for e, l, p in _files(explanations_dir(store_dir))]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16] if stats else ""
