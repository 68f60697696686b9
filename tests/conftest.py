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
