"""The CLI and the service give the same graph for the same prompt and settings, and the same defaults."""

import dataclasses
import os
import subprocess
import sys

import httpx
import pytest
import torch

from attribute_ray import Graph

pytestmark = pytest.mark.timeout(600)
PROMPT = "the capital of france is"
SETTINGS = {"max_feature_nodes": 12, "batch_size": 8, "max_n_logits": 3, "desired_logit_prob": 0.5,
            "update_interval": 2}


@pytest.fixture(scope="module")
def service(dirs, serve_url, tmp_path_factory) -> str:
    """One application on the tiny pair; one CPU per engine replica, hence one torch thread, as in `cli_graph`."""
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    args = AppArgs(model=str(dirs[0]), transcoder=str(dirs[1]), num_gpus=0, num_cpus=1,
                   graph_store=str(tmp_path_factory.mktemp("store")))
    serve.run(app_builder(args), name="cli-parity", route_prefix="/")
    return serve_url


def cli_graph(dirs, out, settings: dict) -> Graph:
    """`attribute-ray graph PROMPT ... -o out.msgpack` in its own process (one torch thread, like the engine)."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    cmd = [sys.executable, "-m", "deployments.cli", "graph", PROMPT, "--model", str(dirs[0]),
           "--transcoder", str(dirs[1]), "-o", str(out), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return Graph.from_msgpack(out.read_bytes())


def service_graph(url: str, settings: dict) -> Graph:
    r = httpx.post(f"{url}/v1/graphs", json={"prompt": PROMPT, **settings}, headers={"accept": "application/msgpack"},
                   timeout=300)
    assert r.status_code == 200, r.text
    return Graph.from_msgpack(r.content)


def assert_same_graph(a: Graph, b: Graph) -> None:
    """Every field equal, tensors exactly; only the recorded run time may differ."""
    for f in dataclasses.fields(Graph):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif f.name == "settings":
            assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
        else:
            assert x == y, f.name


@pytest.mark.parametrize("settings", [SETTINGS, {}], ids=["explicit", "defaults"])
def test_cli_and_service_give_the_same_graph(service, dirs, tmp_path, settings) -> None:
    from attribute_ray.settings import AttributionSettings

    served = service_graph(service, settings)
    local = cli_graph(dirs, tmp_path / "x.msgpack", settings)
    assert_same_graph(local, served)
    # and both used exactly the settings asked for, the rest at the one set of defaults
    want = AttributionSettings(**settings).model_dump()
    assert {k: served.settings[k] for k in want} == want
    assert served.n_selected <= want["max_feature_nodes"]
