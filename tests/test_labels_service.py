"""Feature labels everywhere a feature is: the service's graph JSON (`clerp`) and msgpack, /v1/features and the CLI
carry the feature store's best explanation of each feature; new explanations give a new graph, never stale labels."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import msgpack
import numpy as np
import pytest

from attribute_ray.explanations.store import Explanation, read_explanations, write_explanations
from tests.conftest import DASHBOARD, deploy_app

pytestmark = pytest.mark.timeout(300)
DATA = Path(__file__).parent / "data"
PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def labelled(dirs, tmp_path_factory) -> tuple[Path, dict[tuple[int, int], str]]:
    """(feature store, {(layer, feature): expected label}) with explanations for every other feature of the
    prompt's graph: a tokens label everywhere, and a better-scored llm label for some, which must win."""
    from attribute_ray import ReplacementModel
    from attribute_ray.attribution import attribute
    from attribute_ray.features.storage import write_feature_store

    rm = ReplacementModel.from_pretrained(*dirs)
    keys = sorted({(l, f) for l, _, f in attribute(PROMPT, rm).selected_nodes.tolist()})
    store = tmp_path_factory.mktemp("labels") / "cache"
    write_feature_store({k: {**DASHBOARD, "feature": k[1], "index": k[1]} for k in keys}, store)
    expected = {}
    for i, (layer, feat) in enumerate(keys[::2]):
        explanations = [Explanation(layer, feat, "tokens", f'"tok{i}" → out{i}', 0.6)]
        if i % 3 == 0:
            explanations.append(Explanation(layer, feat, "llm", f"the llm's label {i}", 0.9))
        write_explanations(store, explanations)
        expected[(layer, feat)] = explanations[-1].text
    return store, expected


@pytest.fixture(scope="module")
def service(dirs, labelled, serve_url, tmp_path_factory) -> str:
    return deploy_app(serve_url, "labels", model=str(dirs[0]), transcoder=str(dirs[1]), max_prompt_tokens=64,
                      graph_store=str(tmp_path_factory.mktemp("graphs")), feature_store=str(labelled[0]))


def graph_json(service: str) -> dict:
    r = httpx.post(f"{service}/v1/graphs", json={"prompt": PROMPT, "node_threshold": 1.0, "edge_threshold": 1.0},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def assert_clerps(data: dict, expected: dict[tuple[int, int], str]) -> int:
    """Every feature node's clerp is its expected label ("" without one); returns how many were labelled."""
    jsonschema.validate(data, json.loads((DATA / "graph-schema.json").read_text()))
    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features
    for n in features:
        layer, feat, _ = n["node_id"].split("_")
        assert n["clerp"] == expected.get((int(layer), int(feat)), ""), n["node_id"]
    return sum(1 for n in features if n["clerp"])


def test_graph_json_and_msgpack_carry_the_best_label(service, labelled) -> None:
    store, expected = labelled
    assert assert_clerps(graph_json(service), expected) > 0

    r = httpx.post(f"{service}/v1/graphs", json={"prompt": PROMPT}, headers={"Accept": "application/msgpack"}, timeout=120)
    header = msgpack.unpackb(r.content, raw=False)
    selected = header["arrays"]["selected_features"]
    assert len(header["feature_labels"]) == len(np.frombuffer(selected["data"], dtype=selected["dtype"]))
    assert set(header["feature_labels"]) - {""} <= set(expected.values())


def test_features_route_returns_explanations_best_first(service, labelled) -> None:
    store, expected = labelled
    (layer, feat), label = next((k, v) for k, v in expected.items() if v.startswith("the llm"))
    body = httpx.get(f"{service}/v1/features/{layer}/{feat}", timeout=30).json()
    assert [e["explainer"] for e in body["explanations"]] == ["llm", "tokens"]
    assert body["explanations"][0] == {"explainer": "llm", "text": label, "score": 0.9}


def test_new_explanations_give_a_new_graph_with_new_labels(service, labelled) -> None:
    store, expected = labelled
    before = graph_json(service)
    (layer, feat) = next(iter(expected))
    write_explanations(store, [Explanation(layer, feat, "self", "a better label", 1.0)])
    assert read_explanations(store, layer, feat)[0].text == "a better label"
    after = graph_json(service)
    assert after["metadata"]["slug"] != before["metadata"]["slug"]  # another content key: not the cached graph
    assert assert_clerps(after, {**expected, (layer, feat): "a better label"}) > 0


def test_cli_writes_labels_from_a_feature_store(dirs, labelled, tmp_path) -> None:
    from attribute_ray.cli import main

    store, expected = labelled
    out = tmp_path / "g.json"
    assert main(["graph", PROMPT, "--model", str(dirs[0]), "--transcoder", str(dirs[1]), "--features", str(store),
                 "--node-threshold", "1.0", "--edge-threshold", "1.0", "-o", str(out)]) == 0
    current = {k: read_explanations(store, *k)[0].text for k in expected}  # the other test may have relabelled one
    assert assert_clerps(json.loads(out.read_text()), current) > 0
