"""The `tokens` explainer: an offline, deterministic label from what a feature fires on and what it promotes.

A label is a list of triggers, then the tokens its decoder promotes most (its top logits):

    "Paris", "Lyon" → France, French        fires on "Paris" or "Lyon"
    "capital" "of" → Paris                  fires on "of" right after "capital"
    after "the" → car                       fires on whatever token follows "the"

Triggers come from the train examples' peaks (the token at each example's maximum and the one before it): the
most frequent peak tokens (at most 3, until they cover 80% of the examples); the most frequent preceding tokens
instead when those cover more examples ("after"). A peak token becomes a two-token trigger when it peaks twice
or more, always after the same token, and appears without activation in the train windows, but never after that
token. Tokens compare stripped of surrounding whitespace. The score is token-match detection: a context is
predicted "activating" iff a trigger matches in it (in place for two-token and "after" triggers); the balanced
accuracy of those predictions on the held-out examples against the negatives.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from attribute_ray.explanations.records import FeatureRecord, balanced_accuracy

MAX_TRIGGERS = 3
COVER = 0.8
MAX_LOGITS = 3
ARROW = "→"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_TRIGGER = re.compile(rf"after (?P<after>{_QUOTED})|(?P<first>{_QUOTED})(?: (?P<second>{_QUOTED}))?")


def norm(token: str) -> str:
    """A token as labels show and match it: stripped of surrounding whitespace (whitespace-only tokens kept)."""
    return token.strip() or token


@dataclass(frozen=True)
class Trigger:
    """Fires on `token` (any token when None) right after `before` (anything when None)."""

    token: str | None
    before: str | None = None

    def render(self) -> str:
        q = lambda t: json.dumps(t, ensure_ascii=False)  # noqa: E731
        if self.token is None:
            return f"after {q(self.before)}"
        return q(self.token) if self.before is None else f"{q(self.before)} {q(self.token)}"

    def matches(self, tokens: Sequence[str]) -> bool:
        """Does the trigger match in a context of (normalised) tokens?"""
        if self.before is None:
            return self.token in tokens
        return any(tokens[i - 1] == self.before and (self.token is None or tokens[i] == self.token)
                   for i in range(1, len(tokens)))


def parse_label(text: str) -> list[Trigger]:
    """The triggers at the start of a label ([] when it has none)."""
    triggers, pos = [], 0
    while m := _TRIGGER.match(text, pos):
        if m["after"]:
            triggers.append(Trigger(None, json.loads(m["after"])))
        elif m["second"]:
            triggers.append(Trigger(json.loads(m["second"]), json.loads(m["first"])))
        else:
            triggers.append(Trigger(json.loads(m["first"])))
        pos = m.end()
        if not text.startswith(", ", pos):
            break
        pos += 2
    return triggers


def _cover(values: list[str | None]) -> tuple[list[str], float]:
    """The most frequent values (ties: alphabetical), at most MAX_TRIGGERS, until they cover COVER of the
    items; with the fraction covered."""
    counts = Counter(v for v in values if v is not None)
    chosen, covered = [], 0
    for v, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_TRIGGERS]:
        chosen.append(v)
        covered += c
        if covered >= COVER * len(values):
            break
    return chosen, covered / len(values) if values else 0.0


def triggers_of(record: FeatureRecord) -> list[Trigger]:
    """The label's triggers, from the train examples only."""
    peaks: list[tuple[str | None, str]] = []
    quiet_tokens: set[str] = set()
    quiet_pairs: set[tuple[str, str]] = set()
    for ex in record.train:
        toks = [norm(t) for t in ex.tokens]
        for j, a in enumerate(ex.activations):
            if a <= 0:
                quiet_tokens.add(toks[j])
                if j > 0:
                    quiet_pairs.add((toks[j - 1], toks[j]))
        if ex.activations and max(ex.activations) > 0:
            i = max(range(len(ex.activations)), key=lambda j: (ex.activations[j], -j))
            peaks.append((toks[i - 1] if i > 0 else None, toks[i]))
    if not peaks:
        return []
    current, c_cur = _cover([cur for _, cur in peaks])
    previous, c_prev = _cover([prev for prev, _ in peaks])
    if c_prev > c_cur:
        return [Trigger(None, p) for p in previous]
    triggers = []
    for t in current:
        before = [prev for prev, cur in peaks if cur == t]
        q = before[0]
        if len(before) > 1 and set(before) == {q} and q is not None and t in quiet_tokens and (q, t) not in quiet_pairs:
            triggers.append(Trigger(t, q))
        else:
            triggers.append(Trigger(t))
    return triggers


class TokensExplainer:
    """Offline, deterministic labels (module docstring); `score` is token-match detection."""

    name = "tokens"

    def explain(self, record: FeatureRecord) -> str:
        logits = list(dict.fromkeys(t.strip() for t in record.top_logits if t.strip()))[:MAX_LOGITS]
        head = ", ".join(t.render() for t in triggers_of(record))
        tail = f"{ARROW} {', '.join(logits)}" if logits else ""
        return f"{head} {tail}".strip()

    def score(self, record: FeatureRecord, text: str) -> float:
        triggers = parse_label(text)

        def predict(tokens: list[str]) -> bool:
            toks = [norm(t) for t in tokens]
            return any(t.matches(toks) for t in triggers)

        return balanced_accuracy([predict(e.tokens) for e in record.held_out], [predict(e.tokens) for e in record.negatives])
