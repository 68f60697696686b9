"""`ExplainSettings` (the flags of ``python -m jobs.explain_features``) and ``make_explainer``, the one place an
explainer is built from them. The `llm` and `self` explainers are imported only when asked for."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from attribute_ray.explanations.records import Explainer
from attribute_ray.explanations.tokens import TokensExplainer

if TYPE_CHECKING:
    from attribute_ray.replacement import ReplacementModel


SELF_FIELDS = ("scale", "prompt", "response_start", "placeholder")
"""The fields mirrored from `SelfExplainSettings` (None: its default), so the job's flags can set them."""


class ExplainSettings(BaseModel):
    """Which explainer writes the explanations, what it is shown and scored on, and how the job runs it."""

    model_config = ConfigDict(extra="forbid")

    explainer: Literal["tokens", "llm", "self"] = Field(
        "tokens", description="tokens: an offline label from the top tokens and logits; llm: an OpenAI-compatible "
                              "chat endpoint explains examples; self: the model explains its own feature directions")
    endpoint: str | None = Field(None, description="base URL of an OpenAI-compatible server (/v1/chat/completions is "
                                                   "appended); llm needs one; self uses it to score, if given")
    llm_model: str | None = Field(None, description="the model name sent to the endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the endpoint's API key "
                                                           "(unset: no key is sent)")
    concurrency: int = Field(8, ge=1, description="chat requests in flight at once, over all tasks")
    n_train: int = Field(10, ge=1, description="top-activating examples shown to the explainer")
    n_held_out: int = Field(10, ge=0, description="other top-activating examples, never shown, for scoring")
    n_negatives: int = Field(10, ge=0, description="examples where the feature does not fire, for scoring")
    seed: int = Field(0, description="seed of the train/held-out split and of the negatives")
    context: int = Field(16, ge=1, description="tokens shown up to and including an example's maximum")
    after: int = Field(4, ge=0, description="tokens shown after an example's maximum")
    scale: float | None = Field(None, ge=0, description="self: how much the feature's activation is raised at the "
                                "placeholder, in units of its top activation (default: SelfExplainSettings')")
    prompt: str | None = Field(None, description="self: the question holding the placeholder, e.g. 'What does \"X\" "
                                                  "mean?' (default: SelfExplainSettings')")
    response_start: str | None = Field(None, description="self: the text the answer starts with, e.g. '\"X\" means' "
                                                          "(default: SelfExplainSettings')")
    placeholder: str | None = Field(None, description="self: the word standing for the feature in the prompt "
                                                      "(default: SelfExplainSettings')")
    chunk_size: int | None = Field(None, ge=1, description="features per Ray task (default 1024 for tokens, 64 for "
                                                           "llm and self)")

    @model_validator(mode="after")
    def _endpoint(self) -> ExplainSettings:
        if self.explainer == "llm" and not self.endpoint:
            raise ValueError("the llm explainer needs --endpoint URL (an OpenAI-compatible server) and --llm-model")
        if self.endpoint and not self.llm_model:
            raise ValueError(f"--endpoint {self.endpoint} needs --llm-model NAME (the model the server serves)")
        return self

    @property
    def chunk(self) -> int:
        """Features per task."""
        return self.chunk_size or (1024 if self.explainer == "tokens" else 64)


def make_explainer(settings: ExplainSettings, model: ReplacementModel | None = None) -> Explainer:
    """The explainer `settings` name; "self" needs the `model` whose features it explains."""
    if settings.explainer == "tokens":
        return TokensExplainer()
    from attribute_ray.explanations.llm import LLMExplainer, openai_chat

    chat = None
    if settings.endpoint:
        chat = openai_chat(settings.endpoint, settings.llm_model, api_key=os.environ.get(settings.api_key_env) or None)
    if settings.explainer == "llm":
        return LLMExplainer(chat, n_examples=settings.n_train)
    from attribute_ray.explanations.self_explain import SelfExplainer, SelfExplainSettings

    if model is None:
        raise ValueError("the self explainer needs the model whose features it explains")
    given = {name: getattr(settings, name) for name in SELF_FIELDS if getattr(settings, name) is not None}
    return SelfExplainer(model, chat=chat, settings=SelfExplainSettings(**given))
