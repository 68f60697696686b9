import os

# A stray ray call in a unit test must not silently start a cluster (docs/ray-notes.md).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def free_port() -> int:
    """A free loopback port (a fixed 8000 would collide with parallel runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, transcoder dir): the tiny llama and a skip transcoder in sparsify format, as the service loads them."""
    from attribute_ray import save_sparsify
    from attribute_ray.tiny import save_tiny_model, tiny_model, transcoder_for

    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(root / "model", "llama", seed=0)
    tc_dir = save_sparsify(transcoder_for(tiny_model("llama", seed=0)[0], kind="concat", skip=True, gates=True), root / "tc")
    return model_dir, tc_dir


@pytest.fixture(scope="module")
def serve_url():
    """Base URL of Serve's HTTP proxy on a lean local Ray, for the module's applications (docs/ray-notes.md,
    "Test fixture pattern"). Module-scoped: Ray stops (and Serve with it) when the module's tests are done."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False,
             namespace="tests")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()


DASHBOARD = {"feature": 1, "index": 1, "activation_frequency": 0.5, "act_min": 0.0, "act_max": 1.0, "dense": False,
             "top_logits": ["a"], "bottom_logits": ["b"], "histogram": [1.0, 2.0], "examples_quantiles": []}
"""A minimal feature dashboard, as the feature store holds it."""


def marked_pair(root: Path, features: list[tuple[int, int]]) -> tuple[Path, Path, Path, Path]:
    """(model dir, transcoder dir, graph store dir, feature store dir) below `root` (a folder whose name the tests
    look for in responses): the tiny llama, a gated skip CLT, and `DASHBOARD` for each (layer, feature)."""
    from attribute_ray import save_sparsify
    from attribute_ray.features.storage import write_feature_store
    from attribute_ray.tiny import save_tiny_model, tiny_model, transcoder_for

    model_dir = save_tiny_model(root / "tiny-llama", "llama", seed=0)
    tc_dir = save_sparsify(transcoder_for(tiny_model("llama", seed=0)[0], kind="concat", skip=True, gates=True),
                           root / "tiny-tc")
    write_feature_store({k: {**DASHBOARD, "feature": k[1], "index": k[1]} for k in features}, root / "features",
                        transcoder_id=str(tc_dir))  # as the jobs record it: a path the service must not show
    return model_dir, tc_dir, root / "graphs", root / "features"


def deploy_app(serve_url: str, name: str, route_prefix: str = "/", **fields) -> str:
    """Deploy the attribution app with `AppArgs(**fields)` (CPU only, half a CPU per engine unless given) on the
    module's Serve; its base URL."""
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    serve.run(app_builder(AppArgs(**{"num_gpus": 0, "num_cpus": 0.5, **fields})), name=name, route_prefix=route_prefix)
    return serve_url + route_prefix.rstrip("/")
