"""Self-explanation writes v · W_dec[f] into the residual stream at the placeholder tokens only, through the library's
steering, and a zero scale is plain greedy generation (tiny llama + an ungated per-layer transcoder)."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from attribute_ray import ReplacementModel
from attribute_ray.explanations.llm import detection_score, local_chat
from attribute_ray.explanations.records import Example, FeatureRecord
from attribute_ray.explanations.self_explain import SelfExplainer, SelfExplainSettings, clean_continuation
from attribute_ray.tiny import random_transcoder, tiny_model

pytestmark = pytest.mark.timeout(300)

LAYER, FEATURE, PEAK = 1, 5, 2.5
PROMPT = dict(prompt="what is w60 of the city", response_start="w60 is the", placeholder="w60", chat=False)


@pytest.fixture(scope="module")
def rm() -> ReplacementModel:
    hf, tok = tiny_model("llama", seed=0)
    return ReplacementModel(hf, tok, random_transcoder(3, 32, kind="plt", seed=1))  # ungated: Δ = v · W_dec[f]


def record() -> FeatureRecord:
    train = [Example(["the", "capital", "of", "france"], [0.0, 0.0, 1.0, PEAK]), Example(["big", "city"], [0.5, 0.0])]
    held = [Example(["paris", "is", "big"], [2.0, 0.0, 0.0]), Example(["the", "capital"], [0.0, 1.5])]
    neg = [Example(["the", "dog", "ran"], [0.0] * 3), Example(["red", "blue", "green"], [0.0] * 3)]
    return FeatureRecord(LAYER, FEATURE, train, held, neg, ["paris"], ["dog"])


def residuals(rm: ReplacementModel, run) -> list[torch.Tensor]:
    """Output of every decoder layer (the residual stream after it), [T, D], on the first forward inside `run()`
    (for generate(): the prompt), with plain torch hooks — independent of the library's own hooks."""
    seen: dict[int, torch.Tensor] = {}

    def hook(layer):
        def fn(module, args, out):
            if layer not in seen:
                seen[layer] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        return fn

    handles = [layer.register_forward_hook(hook(l)) for l, layer in enumerate(rm.layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [seen[l] for l in range(rm.n_layers)]


def test_placeholder_positions_are_the_placeholder_tokens(rm) -> None:
    tok = rm.tokenizer
    ids, positions = SelfExplainer(rm, settings=SelfExplainSettings(**PROMPT)).prompt()
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:]) == "what is w60 of the city w60 is the".split()
    assert positions == [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("w60")] == [3, 7]

    # with a chat template, only the user's turn and the answer's start count, not the template's own text
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{{ 'w60 <pad> ' }}{% for m in messages %}{{ m['content'] + ' <pad> ' }}{% endfor %}"
                              "{% if add_generation_prompt %}{{ 'a ' }}{% endif %}")
    model = copy.copy(rm)
    model.tokenizer = chat_tok
    ids, positions = SelfExplainer(model, settings=SelfExplainSettings(**{**PROMPT, "chat": True})).prompt()
    words = chat_tok.convert_ids_to_tokens(ids)
    assert words == ["<bos>", "w60", "<pad>", *"what is w60 of the city".split(), "<pad>", "a", *"w60 is the".split()]
    assert positions == [5, 11]


@pytest.mark.parametrize("unit, scale, v", [("absolute", 3.0, 3.0), ("max_activation", 2.0, 2.0 * PEAK)])
def test_decoder_direction_is_written_at_the_placeholder_only(rm, unit, scale, v) -> None:
    se = SelfExplainer(rm, settings=SelfExplainSettings(**PROMPT, scale=scale, unit=unit, max_new_tokens=3))
    rec = record()
    assert se.value(rec) == v
    ids, positions = se.prompt()
    steered = residuals(rm, lambda: se.explain(rec))
    plain = residuals(rm, lambda: rm.model(input_ids=torch.tensor([ids])))
    W = rm.transcoder.decoders[(LAYER, LAYER)].W[FEATURE]  # the feature's decoder row at its own layer's output site
    expected = torch.zeros(len(ids), rm.d_model)
    expected[positions] = v * W
    for layer in range(rm.n_layers):
        diff = steered[layer] - plain[layer]
        if layer < LAYER:  # before the feature's layer nothing changes
            torch.testing.assert_close(diff, torch.zeros_like(diff), atol=1e-6, rtol=0)
        elif layer == LAYER:  # at its layer: exactly v · W_dec[f] at the placeholders, nothing elsewhere
            torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)
        else:  # later layers: untouched before the first placeholder (causality), changed from it on
            torch.testing.assert_close(diff[: positions[0]], torch.zeros_like(diff[: positions[0]]), atol=1e-6, rtol=0)
            assert diff[positions[0]].abs().max() > 1e-3


def test_zero_scale_is_plain_generation(rm) -> None:
    rec, n = record(), 8
    se = SelfExplainer(rm, settings=SelfExplainSettings(**PROMPT, scale=0.0, max_new_tokens=n))
    ids, _ = se.prompt()
    inp = torch.tensor([ids])
    plain = rm.model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False,
                              pad_token_id=rm.tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert se.continuation(rec) == plain
    assert se.explain(rec) == clean_continuation(rm.tokenizer.decode(plain, skip_special_tokens=True))


def test_score_is_detection_by_the_given_chat_or_the_model_itself(rm) -> None:
    rec = record()

    def oracle(messages: list[dict]) -> str:  # says yes exactly on the held-out texts
        text = messages[-1]["content"].split("Text: ")[1].split("\n")[0]
        return "Yes." if text in ("parisisbig", "thecapital") else "No."

    assert SelfExplainer(rm, chat=oracle).score(rec, "capital cities") == 1.0
    se = SelfExplainer(rm, settings=SelfExplainSettings(**PROMPT))
    assert se.score(rec, "capital cities") == detection_score(local_chat(rm.model, rm.tokenizer), rec, "capital cities")


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        SelfExplainSettings(prompt="what is it", response_start="it is", placeholder="X")
    with pytest.raises(ValidationError):
        SelfExplainSettings(scale=-1.0)
    with pytest.raises(ValidationError):
        SelfExplainSettings(layer=3)  # the layer is the feature's own: not a setting
    assert all(f.description for f in SelfExplainSettings.model_fields.values())
