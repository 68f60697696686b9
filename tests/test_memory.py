"""The memory model of a request (attribute_ray/memory.py, docs/memory.md) against measured peaks, and admission:
a request over its budget is trimmed to exactly the graph a smaller cap gives, or refused naming what fits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attribute_ray import ReplacementModel
from attribute_ray.attribution import attribute, request_shape
from attribute_ray.memory import (
    MemoryBudget,
    MemoryBudgetExceeded,
    ModelShape,
    PeakRss,
    RequestShape,
    estimate,
    least_bytes,
    release_memory,
)
from attribute_ray.settings import AttributionSettings
from attribute_ray.tiny import VOCAB, tiny_model, transcoder_for

# What the test accepts: the estimate never under by more than 25 % (admission relies on it) nor over by more
# than 2.5× (a budget would be wasted). Packing is bounded for a graph whose every entry is non-zero: on the tiny
# model's sparse graphs (about a fifth non-zero) and its small peaks (the 64 MiB allocator slack counts) that bound is
# the loosest part. Measured: 1.3–2.2× on the tiny cases, 1.29–1.40× on the demo.
UNDER, OVER = 0.8, 2.5


@pytest.fixture(scope="module")
def tiny() -> ReplacementModel:
    model, tok = tiny_model("llama", seed=0)
    return ReplacementModel(model, tok, transcoder_for(model, kind="concat", skip=True, gates=True))


def shape_of(model: ReplacementModel, tokens: torch.Tensor, cap: int | None, budget: MemoryBudget | None = None,
             batch_size: int = 256) -> RequestShape:
    """The request's shape as `attribute` sees it (its backward batch shrinks with a small budget)."""
    trace = model.trace(tokens, linearise=True)
    graph = attribute(tokens, model, max_feature_nodes=1, max_n_logits=10)  # the logit rows it picks
    n = len(trace.features)
    cfg = AttributionSettings(batch_size=batch_size)
    return request_shape(model, trace, n if cap is None else min(cap, n), graph.n_logits, cfg, budget)[0]


def measured_peak(model: ReplacementModel, tokens: torch.Tensor, **settings) -> tuple[int, bytes]:
    """Peak RSS above the level before (after one warm-up trace, whose one-off allocations are the model's)."""
    model.trace(tokens[:4], linearise=True)
    release_memory()
    with PeakRss() as peak:
        data = attribute(tokens, model, **settings).to_msgpack()
    assert peak.peak is not None, "this kernel offers no VmHWM: the test cannot measure"
    return peak.peak, data


def check_estimate(model: ReplacementModel, tokens: torch.Tensor, cap: int | None, batch_size: int = 256) -> None:
    est = estimate(ModelShape.of(model), shape_of(model, tokens, cap, batch_size=batch_size))
    peak, data = measured_peak(model, tokens, max_feature_nodes=cap, batch_size=batch_size)
    assert est.engine_peak <= OVER * peak and peak <= est.engine_peak / UNDER, (peak, est.breakdown())
    assert len(data) <= est.msgpack_max, (len(data), est.msgpack_max)  # the stored graph is what the model says


# With a feature cap the rows of one backward pass are the most influential pending features of one prefix
# (attribution.py): usually far fewer than batch_size at the full prompt, which the estimate assumes. A small
# batch_size keeps that bound (safe, not tight) from dominating the capped case.
@pytest.mark.parametrize("n_pos, cap, batch_size", [(150, None, 256), (600, 300, 16)])
def test_estimate_matches_measured_peak_on_a_tiny_model(tiny, n_pos, cap, batch_size) -> None:
    tokens = torch.randint(3, VOCAB, (n_pos,), generator=torch.Generator().manual_seed(n_pos))
    check_estimate(tiny, tokens, cap, batch_size)


@pytest.mark.slow
def test_estimate_matches_measured_peak_on_the_demo_model() -> None:
    from attribute_ray.presets import resolve_preset

    preset = resolve_preset("demo")
    model = ReplacementModel.from_pretrained(preset.model, preset.transcoder)
    text = "The capital of France is Paris. " * 300
    check_estimate(model, model.tokenize(text)[:192], 200)
    # the 2,048-token prompt the service accepts: its trace alone is gigabytes (logits, activations), so a
    # small budget refuses it before any forward, naming the longest prompt that fits
    shape = ModelShape.of(model)
    with pytest.raises(MemoryBudgetExceeded, match=r"a prompt of 2048 tokens .* at most (\d+) tokens") as e:
        attribute(model.tokenize(text)[:2048], model, memory=MemoryBudget(max_bytes=2**30))
    fits = int(e.value.advice.split()[-2])
    assert least_bytes(shape, fits) <= 2**30 < least_bytes(shape, fits + 1)


def fitting(model: ReplacementModel, tokens: torch.Tensor, rows: int, asked: int, **fields) -> MemoryBudget:
    """A budget that `rows` feature rows fit in and `asked` do not (the backward batch it implies included)."""
    budget = None
    for _ in range(3):  # the budget sizes the backward batch, which sizes the estimate: settle it
        shape = shape_of(model, tokens, asked, budget)
        assert shape.feature_rows == asked
        budget = MemoryBudget(max_bytes=estimate(ModelShape.of(model), replace(shape, feature_rows=rows)).engine_peak, **fields)
    assert estimate(ModelShape.of(model), shape_of(model, tokens, asked, budget)).engine_peak > budget.max_bytes
    return budget


def test_trim_gives_the_graph_of_the_smaller_cap(tiny) -> None:
    """Over the budget with on_exceed="trim": the most influential rows that fit, exactly what asking for that
    many would give, and the graph says it was trimmed."""
    tokens = torch.randint(3, VOCAB, (200,), generator=torch.Generator().manual_seed(1))
    budget = fitting(tiny, tokens, rows=500, asked=2000, min_feature_rows=10)
    trimmed = attribute(tokens, tiny, max_feature_nodes=2000, memory=budget)
    note = trimmed.settings["trimmed"]
    rows = note["feature_rows"]
    assert 500 <= rows < 2000 and note["requested_feature_rows"] == 2000 and trimmed.n_selected == rows
    assert note["estimated_peak_bytes"] <= budget.max_bytes and "memory budget" in note["reason"]
    plain = attribute(tokens, tiny, max_feature_nodes=rows)
    assert torch.equal(trimmed.selected_features, plain.selected_features)
    torch.testing.assert_close(trimmed.rows, plain.rows, rtol=1e-4, atol=1e-5)  # other batch sizes, other sums
    assert "trimmed" not in plain.settings
    assert trimmed.to_neuronpedia_json("t")["metadata"]["info"]["trimmed"] == note


def test_refuse_names_the_smallest_change_that_fits(tiny) -> None:
    tokens = torch.randint(3, VOCAB, (200,), generator=torch.Generator().manual_seed(2))
    budget = fitting(tiny, tokens, rows=500, asked=2000, on_exceed="refuse")
    with pytest.raises(MemoryBudgetExceeded, match=r"set max_feature_nodes to at most (\d+)") as e:
        attribute(tokens, tiny, max_feature_nodes=2000, memory=budget)
    assert e.value.needed > budget.max_bytes == e.value.budget
    fits = int(e.value.advice.split()[-1])
    graph = attribute(tokens, tiny, max_feature_nodes=fits, memory=budget)  # the advice is enough ...
    assert graph.n_selected == fits and "trimmed" not in graph.settings
    with pytest.raises(MemoryBudgetExceeded):  # ... and the smallest such change
        attribute(tokens, tiny, max_feature_nodes=fits + 1, memory=budget)


def test_a_prompt_too_long_to_trace_is_refused_before_the_forward(tiny, monkeypatch) -> None:
    tokens = torch.randint(3, VOCAB, (1000,), generator=torch.Generator().manual_seed(3))
    budget = MemoryBudget(max_bytes=least_bytes(ModelShape.of(tiny), 500))
    monkeypatch.setattr(tiny, "trace", lambda *a, **k: pytest.fail("traced a prompt over the budget"))
    with pytest.raises(MemoryBudgetExceeded, match="use a prompt of at most 500 tokens"):
        attribute(tokens, tiny, memory=budget)
