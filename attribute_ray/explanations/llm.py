"""LLM explanations of features (delphi-style) and their detection score, over any chat function.

A `ChatFn` maps OpenAI-style messages (``[{"role": "system" | "user" | "assistant", "content": str}, ...]``) to the
assistant's reply. Two are provided:

- `openai_chat`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, Ray Serve LLM, a hosted API, or
  the repository's own `deployments/chat.py`), over httpx, retrying connection errors, 429 and 5xx with
  exponential backoff; a dead endpoint raises `EndpointError`.
- `local_chat`: a transformers chat model in this process (its chat template, greedy decoding).

Explaining (`LLMExplainer.explain`): the record's top `n_examples` training examples, with the tokens where the
feature fires marked ``<<like this>>``, and the tokens its decoder promotes; the reply's explanation line is the
explanation. Scoring (`detection_score`): every held-out (activating) and negative (non-activating) example,
unmarked, shuffled with a seed fixed by the feature, is shown with the explanation alone, one request each, and
the model answers yes or no; the score is the balanced accuracy (TPR + TNR) / 2 — 0.5 is chance.
"""

from __future__ import annotations

import email.utils
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import torch

from attribute_ray.errors import AttributeRayError
from attribute_ray.explanations.records import Example, FeatureRecord, balanced_accuracy

ChatFn = Callable[[list[dict]], str]  # OpenAI-style messages -> assistant text

MAX_EXPLANATION_CHARS = 200

# The ChatML template, for tokenizers that ship none (SmolLM2's own template is ChatML too).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class EndpointError(AttributeRayError):
    """A chat endpoint failed for good: unreachable after the retries, or it refused the request (4xx)."""


# ----- the remote chat function -------------------------------------------------------------------------------


class OpenAIChat:
    """A `ChatFn` over an OpenAI-compatible endpoint (what `openai_chat` returns); picklable (the HTTP client is
    created on first use in each process) and safe to call from several threads."""

    RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 4, max_tokens: int = 128, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        if max_retries < 0 or timeout_s <= 0 or max_tokens < 1 or backoff_s < 0:
            raise ValueError("need max_retries >= 0, timeout_s > 0, max_tokens >= 1 and backoff_s >= 0")
        base = endpoint.rstrip("/")
        self.endpoint = base
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model, self.api_key, self.timeout_s, self.max_retries = model, api_key, timeout_s, max_retries
        self.max_tokens, self.backoff_s, self.max_backoff_s = max_tokens, backoff_s, max_backoff_s
        self.transport, self.sleep = transport, sleep
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _client=None, _lock=threading.Lock())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                self._client = httpx.Client(timeout=self.timeout_s, headers=headers, transport=self.transport)
            return self._client

    def body(self, messages: list[dict]) -> dict:
        """The request body: OpenAI's chat-completions fields, greedy."""
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0}

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before retry `attempt` (0-based): the server's Retry-After (seconds or an HTTP date)
        when it sends one, else backoff_s · 2^attempt; at most max_backoff_s."""
        wait = self.backoff_s * 2**attempt
        header = response.headers.get("retry-after") if response is not None else None
        if header:
            try:
                wait = float(header)
            except ValueError:
                try:
                    wait = email.utils.parsedate_to_datetime(header).timestamp() - time.time()
                except (TypeError, ValueError):
                    pass
        return min(max(wait, 0.0), self.max_backoff_s)

    def __call__(self, messages: list[dict]) -> str:
        body = self.body(messages)
        cause = ""
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = self._http().post(self.url, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out: transient
                cause = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 200:
                    return self._content(response)
                cause = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in self.RETRY_STATUS:
                    raise EndpointError(f"chat endpoint {self.endpoint} refused the request ({cause})")
            if attempt < self.max_retries:
                self.sleep(self.delay(attempt, response))
        raise EndpointError(f"chat endpoint {self.endpoint} failed after {self.max_retries + 1} attempts; last: {cause}")

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"chat endpoint {self.endpoint} sent a malformed response: {response.text[:300]!r}") from None
        return content or ""


def openai_chat(endpoint: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                max_retries: int = 4, max_tokens: int = 128, backoff_s: float = 1.0,
                transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep) -> OpenAIChat:
    """A `ChatFn` that POSTs OpenAI's chat-completions body (model, messages, max_tokens, temperature 0) to
    ``{endpoint}/v1/chat/completions`` (an endpoint already ending in /v1 is not doubled).

    Connection errors, timeouts, 429 and 5xx are retried up to `max_retries` times, waiting backoff_s · 2^k
    seconds or the server's Retry-After (`OpenAIChat.delay`); any other status, or running out of retries, raises
    `EndpointError` naming the endpoint and the cause. At worst a call takes (max_retries + 1) · timeout_s plus
    the waits. `api_key` goes in a bearer header; `transport` and `sleep` are for tests."""
    return OpenAIChat(endpoint, model, api_key=api_key, timeout_s=timeout_s, max_retries=max_retries,
                      max_tokens=max_tokens, backoff_s=backoff_s, transport=transport, sleep=sleep)


# ----- the local chat function --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatReply:
    """One generated reply (what `deployments/chat.py` serves)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_new_tokens reached)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template (ChatML when it has none), ready for the reply."""
    template = None if getattr(tokenizer, "chat_template", None) else CHATML
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template writes its own special tokens


@torch.no_grad()
def generate_reply(hf_model, tokenizer, messages: list[dict], *, max_new_tokens: int = 48, temperature: float = 0.0,
                   seed: int = 0, stop: Sequence[str] = ()) -> ChatReply:
    """The model's reply to `messages`: greedy at temperature 0, else plain sampling seeded by `seed`; the reply is
    cut at the first of the `stop` strings."""
    ids = chat_prompt_ids(tokenizer, messages)
    device = next(hf_model.parameters()).device
    inp = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(inp), pad_token_id=pad)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        new = hf_model.generate(inp, **kwargs)[0, len(ids):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    finish = "length" if len(new) >= max_new_tokens and new[-1] not in _eos_ids(hf_model, tokenizer) else "stop"
    cuts = [text.index(s) for s in stop if s and s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return ChatReply(text, len(ids), len(new), finish)


def _eos_ids(hf_model, tokenizer) -> set[int]:
    eos = getattr(hf_model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def local_chat(hf_model, tokenizer, *, max_new_tokens: int = 48) -> ChatFn:
    """A `ChatFn` over a transformers causal LM in this process: its chat template (ChatML when it has none),
    greedy decoding, at most `max_new_tokens` tokens."""

    def chat(messages: list[dict]) -> str:
        return generate_reply(hf_model, tokenizer, messages, max_new_tokens=max_new_tokens).text

    return chat


# ----- prompts --------------------------------------------------------------------------------------------------

EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher studying a feature of a language model. You will see text examples; "
    "in each, the tokens where the feature fires are between delimiters <<like this>>. You may also see the "
    "tokens the feature makes more likely to come next. Find what the marked tokens and their contexts have in "
    "common and describe the feature in a short phrase of at most 12 words. Do not mention the << >> "
    "delimiters and do not list the examples. Reply with one line: Explanation: <your explanation>"
)
DETECT_SYSTEM = (
    "You are a meticulous AI researcher. A feature of a language model is described by an explanation. You will "
    "see one text. Decide, from the explanation alone, whether the feature fires on any token of the text. "
    "Reply with one word: Yes or No."
)


def format_example(example: Example, mark: bool = True) -> str:
    """The example's text (its token strings joined); with `mark`, each run of tokens with a positive activation
    is wrapped as <<run>>, leading whitespace kept outside the delimiters."""
    if not mark:
        return "".join(example.tokens)
    out, run = [], []

    def close() -> None:
        if run:
            text = "".join(run)
            stripped = text.lstrip()
            out.append(f"{text[: len(text) - len(stripped)]}<<{stripped}>>" if stripped else text)
            run.clear()

    for tok, act in zip(example.tokens, example.activations):
        if act > 0:
            run.append(tok)
        else:
            close()
            out.append(tok)
    close()
    return "".join(out)


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) made one space: one example, one line."""
    return " ".join(text.split())


def _peak(example: Example) -> float:
    return max(example.activations, default=0.0)


def explanation_messages(record: FeatureRecord, n_examples: int = 10) -> list[dict]:
    """The explaining prompt: the `n_examples` training examples with the highest peak activation, marked, plus
    the decoder's top logits."""
    examples = sorted(record.train, key=_peak, reverse=True)[:n_examples]
    lines = [f"Example {i}: {one_line(format_example(ex))}" for i, ex in enumerate(examples, 1)]
    if record.top_logits:
        lines.append("Tokens the feature promotes: " + ", ".join(repr(t.strip() or t) for t in record.top_logits))
    lines.append("Explanation:")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def parse_explanation(reply: str) -> str:
    """The explanation in a reply: after the last "Explanation:" (or from the start), the first line with a word
    character that is not an echoed "Example N:"; without markdown emphasis, delimiters or surrounding quotes, at
    most MAX_EXPLANATION_CHARS; "" when there is none."""
    found = list(re.finditer(r"explanation\s*:", reply, flags=re.IGNORECASE))
    text = reply[found[-1].end():] if found else reply
    lines = (re.sub(r"\*\*|__|<+|>+|`", "", ln).strip().strip("\"'“”‘’").strip() for ln in text.splitlines())
    line = next((ln for ln in lines if re.search(r"\w", ln) and not re.match(r"example \d+:", ln, re.IGNORECASE)), "")
    return one_line(line)[:MAX_EXPLANATION_CHARS].strip()


def detection_messages(explanation: str, text: str) -> list[dict]:
    """The scoring prompt for one example: the explanation and the example's text, nothing marked."""
    user = f"Explanation: {explanation}\nText: {text}\nDoes the feature fire on this text? Reply Yes or No."
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


def parse_yes_no(reply: str) -> bool | None:
    """The first "yes"/"no" (or "true"/"false") word of a reply, any case; None when there is none."""
    m = re.search(r"\b(yes|no|true|false)\b", reply, flags=re.IGNORECASE)
    return None if m is None else m.group(1).lower() in ("yes", "true")


def detection_score(chat: ChatFn, record: FeatureRecord, text: str) -> float:
    """Balanced accuracy of `chat` telling the record's held-out examples (the feature fires) from its negatives
    (it does not) given only the explanation `text`: one request per example, in an order shuffled with a seed
    fixed by (layer, feature). A reply with no yes/no counts as "no"; no examples at all score 0.5
    (`records.balanced_accuracy`). Errors of `chat` (EndpointError) propagate."""
    items = [(ex, True) for ex in record.held_out] + [(ex, False) for ex in record.negatives]
    random.Random(f"{record.layer}:{record.feature}").shuffle(items)
    said = [bool(parse_yes_no(chat(detection_messages(text, one_line(format_example(ex, mark=False)))))) for ex, _ in items]
    return balanced_accuracy([p for p, (_, fires) in zip(said, items) if fires],
                             [p for p, (_, fires) in zip(said, items) if not fires])


class LLMExplainer:
    """The `llm` explainer: delphi-style explanations from top examples and top logits, scored by detection."""

    name = "llm"

    def __init__(self, chat: ChatFn, n_examples: int = 10):
        if n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {n_examples}")
        self.chat, self.n_examples = chat, n_examples

    def explain(self, record: FeatureRecord) -> str:
        return parse_explanation(self.chat(explanation_messages(record, self.n_examples)))

    def score(self, record: FeatureRecord, text: str) -> float:
        return detection_score(self.chat, record, text)
