"""jobs/demo_report.py: the features listed for the top logit are those with the most influence on it, computed
here from the dense adjacency matrix: Σ_{k≥1} w·Âᵏ = w·((I − Â)⁻¹ − I), Â the row-normalised |A|."""

from __future__ import annotations

import pytest
import torch

from attribute_ray import ReplacementModel, attribute
from attribute_ray.tiny import tiny_model, transcoder_for
from jobs.demo_report import top_logit_features


def test_top_logit_features_rank_by_influence_on_the_top_logit(tmp_path) -> None:
    model, tok = tiny_model("llama", seed=0)
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="plt", skip=True))
    graph = attribute("the cat sat on the mat", rm, max_feature_nodes=40, batch_size=16)
    got = top_logit_features(graph, tmp_path / "no-store", n=6)

    a = graph.adjacency.double().abs()
    a_hat = a / a.sum(1, keepdim=True).clamp_min(1e-8)
    w = torch.zeros(graph.n_nodes, dtype=torch.float64)
    w[graph.logit_offset] = 1.0  # the top logit alone, not the probability-weighted logits
    infl = (w @ (torch.linalg.inv(torch.eye(graph.n_nodes, dtype=torch.float64) - a_hat) - torch.eye(graph.n_nodes)))
    best: dict[tuple[int, int], float] = {}
    for i in torch.argsort(infl[: graph.n_selected], descending=True).tolist():
        layer, _, feat = graph.selected_nodes[i].tolist()
        best.setdefault((layer, feat), float(infl[i]))
    want = list(best.items())[:6]
    assert len(got) == 6 and [(f["layer"], f["feature"]) for f in got] == [k for k, _ in want]
    for f, (_, value) in zip(got, want):
        assert f["influence"] == pytest.approx(value, rel=1e-4)
        assert f["top_tokens"] == [] and f["label"] == "" and f["frequency"] is None  # no feature store here
