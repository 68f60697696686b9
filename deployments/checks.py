"""The checks the ingress makes on a request before any work is queued or any file is read: its prompt and targets,
its route parameters and query (404 or 422 naming the problem, never a 500)."""

from pathlib import Path

from fastapi import HTTPException
from pydantic import ValidationError

from attribute_ray.api import GraphView
from attribute_ray.loading import tokenize
from attribute_ray.neuronpedia import cantor, cantor_inverse
from attribute_ray.settings import INDEX_MAX, PruneSettings
from deployments.encoding import unprocessable

MAX_CANTOR_ID = cantor(INDEX_MAX, INDEX_MAX)  # the largest id of a (layer, index) pair that `feature_address` takes


def prompt_tokens(tokenizer, prompt: str | None, tokens: list[int] | None, *, max_tokens: int, vocab: int) -> list[int]:
    """The prompt's token ids (BOS prepended as the library does), at most `max_tokens`, each in [0, vocab)."""
    try:
        ids = tokenize(tokenizer, prompt if prompt is not None else tokens).tolist()
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    if len(ids) > max_tokens:
        raise HTTPException(422, f"prompt is {len(ids)} tokens; the limit is {max_tokens}")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise HTTPException(422, f"token ids {bad[:10]} are outside the vocabulary [0, {vocab})")
    return ids


def check_targets(tokenizer, targets: list[int] | list[str] | None, *, vocab: int) -> None:
    """Target logits the model can have: strings of exactly one token, or token ids in [0, vocab)."""
    if targets and isinstance(targets[0], str):
        for t in targets:
            ids = tokenizer.encode(t, add_special_tokens=False)
            if len(ids) != 1:
                raise HTTPException(422, f"target {t!r} is {len(ids)} tokens; each target must be exactly one token")
    elif targets:
        bad = [t for t in targets if not 0 <= t < vocab]
        if bad:
            raise HTTPException(422, f"target token ids {bad[:10]} are outside the vocabulary [0, {vocab})")


def graph_view(defaults: PruneSettings, node_threshold: float | None, edge_threshold: float | None,
               slug: str | None, pruned: bool) -> GraphView:
    """The query of GET /v1/graphs/{id} over the application's default thresholds; 422 naming a bad field (the
    bounds are `GraphView`'s, the same as POST's)."""
    given = {k: v for k, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)) if v is not None}
    try:
        return GraphView(**{**defaults.model_dump(include=set(PruneSettings.model_fields)), **given},
                         slug=slug, pruned=pruned)
    except ValidationError as e:
        raise unprocessable(e) from e


def feature_address(layer: int, index: int) -> tuple[int, int]:
    """(layer, index) of a feature route; 404 unless both are in [0, INDEX_MAX] (nothing else can exist)."""
    if not (0 <= layer <= INDEX_MAX and 0 <= index <= INDEX_MAX):
        raise HTTPException(404, f"no feature {layer}/{index}: layer and index must be in [0, {INDEX_MAX}]")
    return layer, index


def cantor_address(cantor_id: int) -> tuple[int, int]:
    """(layer, index) of a Cantor-paired feature id (docs/formats.md §e); 404 for a negative or too large id."""
    if not 0 <= cantor_id <= MAX_CANTOR_ID:
        raise HTTPException(404, f"no feature with cantor id {cantor_id}: ids are in [0, {MAX_CANTOR_ID}]")
    return feature_address(*cantor_inverse(cantor_id))


def ui_path(root: Path, path: str) -> Path:
    """The file `path` names below `root`; 404 for anything else (outside it, missing, or not a path at all)."""
    try:
        target = (root / path).resolve()
        if root.resolve() in target.parents and target.is_file():
            return target
    except (OSError, ValueError):  # an embedded NUL, a name too long: no such file
        pass
    raise HTTPException(404, f"no UI file {path[:200]!r}")
