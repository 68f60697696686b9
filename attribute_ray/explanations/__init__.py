"""Feature explanations: a short, scored label for every feature, kept beside its dashboard (docs/formats.md §l).

    records.py       FeatureRecord: train / held-out / negative windows and logits of a feature, from a cache
    tokens.py        TokensExplainer: an offline label from the tokens a feature fires on and promotes
    llm.py           LLMExplainer: delphi-style prompts to an OpenAI-compatible chat endpoint (imported lazily)
    self_explain.py  SelfExplainer: the model explains its own feature directions (imported lazily)
    store.py         the explanations store: write, read per feature, best labels, what is done
    config.py        ExplainSettings and make_explainer
    run.py           explaining a whole cache in chunks, resumable (driven by ``jobs/explain_features.py``)
"""

from attribute_ray.explanations.config import ExplainSettings, make_explainer
from attribute_ray.explanations.records import (
    Example,
    Explainer,
    FeatureRecord,
    active_features,
    balanced_accuracy,
    feature_records,
)
from attribute_ray.explanations.run import ChunkResult, ExplainReport, MapChunks, explain_cache, explain_chunk, plan_chunks
from attribute_ray.explanations.store import (
    Explanation,
    ExplanationsError,
    explained,
    feature_labels,
    read_explanations,
    write_explanations,
)
from attribute_ray.explanations.tokens import TokensExplainer

__all__ = [
    "ChunkResult", "Example", "ExplainReport", "ExplainSettings", "Explainer", "Explanation", "ExplanationsError",
    "FeatureRecord", "MapChunks", "TokensExplainer", "active_features", "balanced_accuracy", "explain_cache",
    "explain_chunk", "explained", "feature_labels", "feature_records", "make_explainer", "plan_chunks",
    "read_explanations", "write_explanations",
]
