"""Explaining every feature of an activation cache: the work of ``python -m jobs.explain_features``, without Ray.

``plan_chunks`` lists the features still to explain (resuming: what the store holds is skipped) in chunks;
``explain_chunk`` explains and scores one chunk (one pass over the cache for all its features, optionally with
threads for chat requests); ``explain_cache`` runs chunks wave by wave through a `MapChunks` (serial here, Ray
tasks or an actor in the job), writes each chunk's explanations into the store as it comes back, shows progress,
and stops cleanly at the first dead endpoint: what was explained stays, and the report says how many are left.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from attribute_ray.explanations.config import ExplainSettings, make_explainer
from attribute_ray.explanations.records import Decode, Explainer, FeatureRecord, active_features, feature_records
from attribute_ray.explanations.store import Explanation, explained, write_explanations
from attribute_ray.features.partials import FeatureKey


@dataclass
class ChunkResult:
    """The explanations of one chunk, and the endpoint error that stopped it early (None: it completed)."""

    explanations: list[Explanation]
    error: str | None = None


@dataclass
class ExplainReport:
    """What a run did: explanations written, features left unexplained, the error that stopped it."""

    done: int
    left: int
    error: str | None
    seconds: float


MapChunks = Callable[[Sequence[list[FeatureKey]]], list[ChunkResult]]
"""``map_chunks(chunks)``: the `ChunkResult` of every chunk, wherever they are computed."""


def _stop_errors(explainer: Explainer) -> tuple[type[BaseException], ...]:
    """The errors that stop a run cleanly: a dead chat endpoint (only the chat explainers have one)."""
    if explainer.name == "tokens":
        return ()
    from attribute_ray.explanations.llm import EndpointError

    return (EndpointError,)


def plan_chunks(cache_dir: str | os.PathLike, explainer: str, chunk_size: int, *, store_dir: str | os.PathLike | None = None,
                keys: Sequence[FeatureKey] | None = None) -> list[list[FeatureKey]]:
    """The features of `keys` (default: every active feature of the cache) that `explainer` has not explained in
    the store (default: the feature store beside the cache), in chunks of `chunk_size`, in (layer, feature) order."""
    done = explained(cache_dir if store_dir is None else store_dir, explainer)
    todo = [k for k in sorted(keys if keys is not None else active_features(cache_dir)) if tuple(k) not in done]
    return [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]


def explain_chunk(cache_dir: str | os.PathLike, keys: Sequence[FeatureKey], settings: ExplainSettings,
                  explainer: Explainer | None = None, *, threads: int = 1, decode: Decode | None = None,
                  store_dir: str | os.PathLike | None = None) -> ChunkResult:
    """Explain and score the features `keys` (`explainer` defaults to ``make_explainer(settings)``), `threads`
    records at a time, with the logits of the feature store `store_dir` (default: beside the cache). A dead
    endpoint stops the chunk: the result holds what was finished and the error."""
    explainer = explainer or make_explainer(settings)
    stop = _stop_errors(explainer)
    records = list(feature_records(cache_dir, keys, n_train=settings.n_train, n_held_out=settings.n_held_out,
                                   n_negatives=settings.n_negatives, seed=settings.seed, context=settings.context,
                                   after=settings.after, decode=decode, store_dir=store_dir))

    def one(r: FeatureRecord) -> Explanation:
        text = explainer.explain(r)
        return Explanation(r.layer, r.feature, explainer.name, text, float(explainer.score(r, text)))

    out: list[Explanation] = []
    if threads <= 1:
        for r in records:
            try:
                out.append(one(r))
            except stop as e:
                return ChunkResult(out, f"{type(e).__name__}: {e}")
        return ChunkResult(out)
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(one, r) for r in records]
        finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        wait(pending)
        error = None
        for f in futures:
            if f.cancelled():
                continue
            e = f.exception()
            if e is None:
                out.append(f.result())
            elif isinstance(e, stop):
                error = error or f"{type(e).__name__}: {e}"
            else:
                raise e
    return ChunkResult(sorted(out, key=lambda x: (x.layer, x.feature)), error)


def explain_cache(cache_dir: str | os.PathLike, settings: ExplainSettings, map_chunks: MapChunks, *, wave: int = 1,
                  store_dir: str | os.PathLike | None = None, keys: Sequence[FeatureKey] | None = None,
                  progress: bool = True) -> ExplainReport:
    """Explain every feature not yet explained by ``settings.explainer``: `wave` chunks at a time through
    `map_chunks`, each chunk's explanations written into the store (default: beside the cache) as its wave
    returns. Stops after the first wave with an endpoint error."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    store = cache_dir if store_dir is None else store_dir
    chunks = plan_chunks(cache_dir, settings.explainer, settings.chunk, store_dir=store, keys=keys)
    total = sum(len(c) for c in chunks)
    done, error = 0, None
    with tqdm(total=total, unit="feature", desc=f"explain ({settings.explainer})", disable=not progress) as bar:
        for i in range(0, len(chunks), max(1, wave)):
            results = map_chunks(chunks[i : i + max(1, wave)])
            for r in results:
                write_explanations(store, r.explanations)
                done += len(r.explanations)
                bar.update(len(r.explanations))
            error = next((r.error for r in results if r.error), None)
            if error:
                break
    return ExplainReport(done, total - done, error, time.perf_counter() - t0)
