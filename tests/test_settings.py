"""One contract: each setting declared once (attribute_ray/settings.py) with one default through the library,
the CLI and the HTTP models; every field described; requests set settings over the application's defaults."""

from __future__ import annotations

import argparse
import inspect

import httpx
import pydantic
import pytest
import torch

from attribute_ray import Graph, ReplacementModel, attribute, neuronpedia, pruning
from attribute_ray import cli as cli_module
from attribute_ray.api import GraphRequest, InterventionRequest, InterventionSpec, JobView, Progress, StreamEvent, SupernodeSpec
from attribute_ray.client import Client
from attribute_ray.graph import prune_graph
from attribute_ray.settings import AttributionSettings, GraphSettings, PruneSettings
from attribute_ray.tiny import save_tiny_model, tiny_model, transcoder_for

MODELS = [AttributionSettings, PruneSettings, GraphSettings, GraphRequest, InterventionRequest, InterventionSpec,
          SupernodeSpec, JobView, Progress, StreamEvent]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_described(model) -> None:
    schema = model.model_json_schema()  # what /docs shows
    undescribed = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert not undescribed, f"{model.__name__}: {undescribed}"


def _project_configs() -> dict[str, type[pydantic.BaseModel]]:
    """Every pydantic model defined anywhere in attribute_ray/, deployments/ and jobs/."""
    import importlib
    import pkgutil

    found = {}
    for package in ("attribute_ray", "deployments", "jobs"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel) and obj.__module__ == info.name:
                    found[f"{info.name}.{obj.__qualname__}"] = obj
    return found


def test_every_config_field_in_the_project_is_described() -> None:
    configs = _project_configs()
    # the configs the command lines and the service are generated from must be among those found
    assert {"deployments.config.AppArgs", "attribute_ray.activation_cache.CacheConfig",
            "attribute_ray.training.config.TrainConfig", "attribute_ray.settings.GraphSettings"} <= set(configs)
    undescribed = [f"{name}.{field}" for name, model in configs.items()
                   for field, info in model.model_fields.items() if not info.description]
    assert not undescribed


def test_graph_settings_are_attribution_plus_pruning_and_the_request_adds_only_the_prompt_and_view() -> None:
    assert set(GraphSettings.model_fields) == set(AttributionSettings.model_fields) | set(PruneSettings.model_fields)
    assert set(GraphRequest.model_fields) - set(GraphSettings.model_fields) == {"prompt", "tokens", "targets", "slug",
                                                                               "pruned"}
    for name, field in GraphSettings.model_fields.items():  # inherited, not restated: same default and bounds
        assert GraphRequest.model_fields[name].default == field.default
        assert GraphRequest.model_fields[name].metadata == field.metadata


def test_prune_defaults_come_from_prune_settings() -> None:
    want = PruneSettings()
    assert (want.node_threshold, want.edge_threshold) == (0.8, 0.98)  # the defaults the README documents
    for fn in (Graph.prune, Graph.pruned, Graph.to_neuronpedia_json, prune_graph, pruning.prune, neuronpedia.graph_json):
        params = inspect.signature(fn).parameters
        assert params["node_threshold"].default == want.node_threshold, fn.__qualname__
        assert params["edge_threshold"].default == want.edge_threshold, fn.__qualname__


def test_request_settings_are_the_given_fields_over_the_application_defaults() -> None:
    defaults = GraphSettings(max_n_logits=3, max_feature_nodes=100, node_threshold=0.5)
    req = GraphRequest.model_validate({"prompt": "the cat", "batch_size": 8, "max_feature_nodes": 5,
                                       "edge_threshold": 0.9, "max_n_logits": None})
    got = req.settings(defaults)
    assert type(got) is GraphSettings
    # given fields win; left-out and null ones are the application's, not the class's
    assert got == GraphSettings(max_n_logits=3, max_feature_nodes=5, batch_size=8, node_threshold=0.5,
                                edge_threshold=0.9)
    # a request that sets a field to the class default still overrides a different application default
    assert GraphRequest(prompt="x", max_feature_nodes=7500).settings(defaults).max_feature_nodes == 7500
    assert GraphRequest(prompt="x").settings(defaults) == defaults
    assert got.attribution() == AttributionSettings(max_n_logits=3, max_feature_nodes=5, batch_size=8)
    assert got.pruning() == PruneSettings(node_threshold=0.5, edge_threshold=0.9)


@pytest.mark.parametrize("body", [{"prompt": "x", "memory_budget_mb": 10**6}, {"prompt": "x", "colour": 1},
                                  {"prompt": "x", "batch_size": 0}, {"prompt": "x", "node_threshold": 1.5},
                                  {"prompt": "x", "tokens": [1]}, {}])
def test_bad_requests_are_refused(body) -> None:
    with pytest.raises(pydantic.ValidationError):
        GraphRequest.model_validate(body)


def test_library_defaults_are_the_settings_defaults() -> None:
    model, tok = tiny_model("llama")
    g = attribute(torch.tensor([0, 5, 6, 7]), ReplacementModel(model, tok, transcoder_for(model, kind="plt")))
    assert {k: v for k, v in g.settings.items() if k != "seconds"} == AttributionSettings().model_dump()
    with pytest.raises(pydantic.ValidationError):  # a misspelt override is an error, not ignored
        attribute(torch.tensor([0, 5]), ReplacementModel(model, tok, transcoder_for(model, kind="plt")), max_feature=3)


def _graph_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_module.add_graph(parser.add_subparsers())
    return parser.parse_args(["graph", "p", "-o", "g.msgpack", *argv])


def test_cli_flags_are_the_settings_with_the_same_defaults() -> None:
    from attribute_ray.config_args import from_arguments

    assert from_arguments(GraphSettings, _graph_args([])) == GraphSettings()
    argv = ["--max-n-logits", "3", "--desired-logit-prob", "0.5", "--max-feature-nodes", "12", "--batch-size", "4",
            "--update-interval", "2", "--node-threshold", "0.6", "--edge-threshold", "0.9"]
    assert from_arguments(GraphSettings, _graph_args(argv)) == GraphSettings(
        max_n_logits=3, desired_logit_prob=0.5, max_feature_nodes=12, batch_size=4, update_interval=2,
        node_threshold=0.6, edge_threshold=0.9)


def test_cli_graph_equals_the_library_graph(tmp_path) -> None:
    from attribute_ray import save_sparsify

    model, tok = tiny_model("llama")
    tc = transcoder_for(model, kind="concat", skip=True)
    model_dir, tc_dir = save_tiny_model(tmp_path / "model", "llama"), save_sparsify(tc, tmp_path / "tc")
    out = tmp_path / "g.msgpack"
    code = cli_module.main(["graph", "the capital of france is", "--model", str(model_dir), "--transcoder", str(tc_dir),
                            "--device", "cpu", "--max-feature-nodes", "10", "--batch-size", "4", "--update-interval", "1",
                            "-o", str(out)])
    assert code == 0
    got = Graph.from_msgpack(out.read_bytes())
    local = ReplacementModel.from_pretrained(str(model_dir), str(tc_dir))
    want = attribute("the capital of france is", local, max_feature_nodes=10, batch_size=4, update_interval=1)
    assert got.n_selected == 10 and torch.equal(got.selected_features, want.selected_features)
    torch.testing.assert_close(got.rows, want.rows, atol=1e-6, rtol=1e-5)


def test_cli_main_takes_extra_commands(capsys) -> None:
    seen = []

    def add_hello(subparsers: argparse._SubParsersAction) -> None:
        p = subparsers.add_parser("hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: seen.append(args.name) or 7)

    assert cli_module.main(["hello", "--name", "ray"], commands=[add_hello]) == 7 and seen == ["ray"]
    with pytest.raises(SystemExit):  # without the adder there is no such command
        cli_module.main(["hello"])
    capsys.readouterr()


def test_client_checks_settings_before_sending() -> None:
    sent = []
    client = Client("http://x.test", transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(500)))
    with pytest.raises(TypeError, match="unknown graph settings"):
        client.graph("the cat", max_featur_nodes=3)
    with pytest.raises(pydantic.ValidationError):
        client.submit("the cat", batch_size=0)
    with pytest.raises(TypeError, match="unknown graph settings"):
        client.graph("the cat", memory_budget_mb=64)  # the machine's business, not the request's
    assert sent == []
