"""Self-explanation of features (SelfIE, Chen et al.; Kharlapenko et al.'s self-explaining SAE features): the model
itself is asked what a feature means.

The prompt asks about a placeholder word, e.g. user: ``What does "X" mean?``, assistant: ``"X" means``. At every
token of the placeholder, the feature's activation is raised by a value v (an ``add`` `Intervention` of
`attribute_ray.interventions`), so the residual stream there receives v · W_dec[S, T][f] at the output site of
each layer T the feature writes to — its own layer S for a per-layer transcoder (for a gated decoder, the change of
its gated activation, `Transcoder.gated`). The continuation generated greedily from there, with the library's
steering (`generate_with_interventions`), is the explanation. v = 0 is plain generation.

The explanation is scored like the `llm` explainer's (`detection_score`), by the given chat function or, without
one, by the model itself through its chat template (`local_chat`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from attribute_ray.explanations.llm import ChatFn, detection_score, local_chat
from attribute_ray.explanations.records import FeatureRecord
from attribute_ray.interventions import Intervention, generate_with_interventions
from attribute_ray.loading import tokenize
from attribute_ray.replacement import ReplacementModel


class SelfExplainSettings(BaseModel):
    """How a feature is written into the prompt and how much the model may say about it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field('What does "X" mean?', description="the question (the user's turn when `chat` applies); "
                        "the feature is written at the tokens of each `placeholder` in it and in `response_start`")
    response_start: str = Field('"X" means', description="text the answer starts with (the start of the assistant's "
                                "turn); the explanation is what the model writes after it")
    placeholder: str = Field("X", min_length=1, description="the word standing for the feature; every token "
                             "overlapping one of its occurrences in `prompt` or `response_start` receives the feature")
    chat: bool = Field(True, description="wrap `prompt` in the tokenizer's chat template when it has one; otherwise "
                       "(or when false) the text is `prompt` + ' ' + `response_start`")
    scale: float = Field(8.0, ge=0, description="how much the feature's activation is raised at the placeholder: "
                         "v = scale × unit (see `unit`); 0 = plain generation. On the demo model (SmolLM2-135M-Instruct) "
                         "answers below ~4 rarely depart from the placeholder's own meaning, and stay fluent up to ~16")
    unit: Literal["max_activation", "absolute"] = Field(
        "max_activation", description="max_activation: the unit is the feature's highest activation in the record's "
        "training examples (1.0 when it has none), so scale 1 writes the feature as strongly as it ever fired there; "
        "absolute: the unit is 1.0, v = scale, and the written vector is scale · W_dec[f] (ungated decoder)")
    max_new_tokens: int = Field(24, ge=1, le=256, description="most tokens generated for an explanation")

    @model_validator(mode="after")
    def _check(self) -> SelfExplainSettings:
        if self.placeholder not in self.prompt + "\n" + self.response_start:
            raise ValueError(f"the placeholder {self.placeholder!r} occurs neither in prompt nor in response_start")
        return self


def _occurrences(text: str, word: str, start: int, end: int) -> list[tuple[int, int]]:
    """Character spans of `word` in text[start:end]."""
    spans, i = [], text.find(word, start, end)
    while i >= 0:
        spans.append((i, i + len(word)))
        i = text.find(word, i + len(word), end)
    return spans


class SelfExplainer:
    """The `self` explainer: the model explains its own feature (module docstring)."""

    name = "self"

    def __init__(self, model: ReplacementModel, chat: ChatFn | None = None,
                 settings: SelfExplainSettings = SelfExplainSettings()):
        self.model, self.settings = model, settings
        self._chat = chat

    @property
    def chat(self) -> ChatFn:
        """The scoring chat: the one given, else the model itself (`local_chat`)."""
        if self._chat is None:
            self._chat = local_chat(self.model.model, self.model.tokenizer)
        return self._chat

    def prompt(self) -> tuple[list[int], list[int]]:
        """(prompt token ids, with the BOS the library prepends; positions of the placeholder tokens in them)."""
        s, tok = self.settings, self.model.tokenizer
        if s.chat and getattr(tok, "chat_template", None):
            head = tok.apply_chat_template([{"role": "user", "content": s.prompt}], add_generation_prompt=True,
                                           tokenize=False)
            p0 = head.rfind(s.prompt)
        else:
            head, p0 = s.prompt + " ", 0
        text = head + s.response_start
        spans = _occurrences(text, s.placeholder, p0, p0 + len(s.prompt)) + _occurrences(text, s.placeholder, len(head), len(text))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = tokenize(tok, enc.input_ids).tolist()
        shift = len(ids) - len(enc.input_ids)  # the BOS `tokenize` prepended, if any
        positions = [i + shift for i, (a, b) in enumerate(enc.offset_mapping)
                     if any(a < e and b > s0 for s0, e in spans)]
        if not positions:
            raise ValueError(f"no token of the prompt covers the placeholder {s.placeholder!r}: {text!r}")
        return ids, positions

    def value(self, record: FeatureRecord) -> float:
        """v, the amount added to the feature's activation at the placeholder tokens."""
        s = self.settings
        if s.unit == "absolute":
            return s.scale
        peak = max((a for ex in record.train for a in ex.activations), default=0.0)
        return s.scale * (peak if peak > 0 else 1.0)

    def interventions(self, record: FeatureRecord) -> tuple[list[int], list[Intervention]]:
        """(prompt token ids, the ``add`` intervention writing the feature at the placeholder tokens)."""
        ids, positions = self.prompt()
        return ids, [Intervention(record.layer, record.feature, "add", self.value(record), positions)]

    def continuation(self, record: FeatureRecord) -> list[int]:
        """Token ids the model generates (greedy) with the feature written at the placeholder."""
        ids, ivs = self.interventions(record)
        return generate_with_interventions(self.model, ids, ivs, max_new_tokens=self.settings.max_new_tokens)[1]

    def explain(self, record: FeatureRecord) -> str:
        """The cleaned continuation (`clean_continuation`)."""
        return clean_continuation(self.model.tokenizer.decode(self.continuation(record), skip_special_tokens=True))

    def score(self, record: FeatureRecord, text: str) -> float:
        return detection_score(self.chat, record, text)


def clean_continuation(text: str) -> str:
    """The continuation's first sentence on its first non-empty line, without quote marks, whitespace collapsed:
    ``"Uncaught" in some languages. It is`` → ``Uncaught in some languages``."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", line.strip(), maxsplit=1)[0]
    return " ".join(re.sub(r"[\"“”]", "", sentence).split()).removesuffix(".").strip()
