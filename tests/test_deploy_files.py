"""Deployment files: cluster.yaml, serve_config.yaml and the KubeRay RayService.

CPU-only, offline and fast: no Ray cluster is started, no cloud API is called. The files are checked with Ray's
own validators (autoscaler config schema, ServeDeploySchema) plus the project's AppArgs, and the key operational
facts (pinned image, loopback dashboard/proxy, warm GPU worker, /dev/shm) are asserted explicitly.
"""

import copy
import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
SERVE_CONFIG = ROOT / "serve_config.yaml"
RAYSERVICE = ROOT / "deployments" / "kuberay-rayservice.yaml"

# Ray Serve's own pydantic models emit these on import (harmless, docs/ray-notes.md "Harmless noise").
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")

APP_NAME = "attribute-ray"
IMPORT_PATH = "deployments.app:app_builder"
DEPLOYMENT_NAMES = {"Ingress", "AttributionEngine"}
# The project's cluster image: exact Ray version, Python 3.11, CUDA.
PYTHON_TAG = "py311"
EXPECTED_IMAGE = f"rayproject/ray:{ray.__version__}-{PYTHON_TAG}-gpu"


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _commented_yaml(text: str, key: str, indent: int):
    """Parse a commented-out example block (`<indent># key:` and the `#`-prefixed lines below it)."""
    prefix = " " * indent + "#"
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line == f"{prefix} {key}:")
    body = []
    for line in lines[start:]:
        if not line.startswith(prefix):
            break
        body.append(line[len(prefix) + 1 :])
    return yaml.safe_load("\n".join(body))[key]


# --------------------------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def prepared_cluster(cluster) -> dict:
    """`ray up`'s offline part of config resolution, on the real file.

    `ray up` -> commands._bootstrap_config runs: prepare_config -> provider.fillout_available_node_types_resources
    -> validate_config -> provider.bootstrap_config. We run the two offline steps:
      * util.prepare_config: merges ray/autoscaler/aws/defaults.yaml (a packaged file), merges setup_commands into
        head/worker_setup_commands, checks the docker block, fills per-type min/max_workers;
      * util.validate_config: jsonschema against ray/autoscaler/ray-schema.json plus the head_node_type and
        sum(min_workers) <= max_workers checks.
    Skipped because they call AWS through boto3 (not even installed here): fillout_available_node_types_resources
    (ec2:DescribeInstanceTypes, to fill CPU/GPU from the instance type; `resources: {}` is what lets it do so) and
    AWS bootstrap_config (IAM role, key pair, subnets, security group, default AMI).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_validates_with_ray_autoscaler(cluster, prepared_cluster):
    import jsonschema

    # The raw file alone must satisfy the schema too (validate_config only sees it merged with the AWS defaults).
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))

    assert prepared_cluster["cluster_name"] == "attribute-ray"
    assert prepared_cluster["head_node_type"] == "head"
    # The defaults' node types must not leak in: exactly our two types.
    assert set(prepared_cluster["available_node_types"]) == {"head", "gpu_worker"}
    assert prepared_cluster["available_node_types"]["head"]["max_workers"] == 0
    # setup_commands reach both node kinds after the merge.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert prepared_cluster[key][0] == "pip install -e ~/attribute-ray"


def test_cluster_yaml_provider_and_docker(cluster):
    provider = cluster["provider"]
    assert provider["type"] == "aws" and provider["region"] == "us-west-2"
    assert provider["cache_stopped_nodes"] is True
    assert cluster["auth"]["ssh_user"] == "ubuntu"

    docker = cluster["docker"]
    # Pinned to the exact Ray version and Python minor of the project: client and cluster must match.
    assert docker["image"] == EXPECTED_IMAGE
    assert "head_image" not in docker and "worker_image" not in docker
    opts = docker["run_options"]
    assert "--ulimit nofile=65536:65536" in opts
    assert any(o.startswith("-v ") and o.split(":")[-1].rstrip("/").endswith("/.cache") for o in opts), opts
    assert "-e RAY_USAGE_STATS_ENABLED=0" in opts


def test_cluster_yaml_node_types(cluster):
    types = cluster["available_node_types"]
    assert types["head"]["resources"] == {}
    gpu = types["gpu_worker"]
    assert gpu["resources"] == {}  # detected from the instance type
    assert gpu["min_workers"] >= 1  # one warm engine replica
    assert gpu["max_workers"] >= gpu["min_workers"]
    assert cluster["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family


def test_cluster_yaml_code_sync_and_setup(cluster):
    assert cluster["file_mounts"] == {"~/attribute-ray": "."}
    assert {".git", ".venv", "__pycache__", "results"} <= set(cluster["rsync_exclude"])
    assert "pip install -e ~/attribute-ray" in cluster["setup_commands"]
    every_setup = " ".join(cluster["setup_commands"] + cluster.get("head_setup_commands", []))
    # Keep the image's ray and torch: no forced/upgrade reinstall, no CPU-only torch index.
    for flag in ("--force-reinstall", " -U ", "--upgrade", "download.pytorch.org"):
        assert flag not in f" {every_setup} ", flag


def test_cluster_yaml_start_commands(cluster):
    head = cluster["head_start_ray_commands"]
    assert head[0] == "ray stop"
    start = head[-1]
    assert start == (
        "ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1 --disable-usage-stats"
    )
    args = shlex.split(start.split(";", 1)[1])
    assert "--dashboard-host=127.0.0.1" in args and "--disable-usage-stats" in args
    worker = cluster["worker_start_ray_commands"]
    assert worker[0] == "ray stop"
    assert "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076" in worker[-1]
    assert "0.0.0.0" not in " ".join(head + worker)


# ---------------------------------------------------------------------------------------- serve_config.yaml


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return _load(SERVE_CONFIG)


def _validate_serve(config: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(config)


def _app_args(app):
    """The application args as the builder receives them (preset resolution is offline: names only)."""
    from deployments.config import AppArgs

    return AppArgs(**app.args)


def test_serve_config_validates(serve_config):
    schema = _validate_serve(serve_config)
    assert schema.proxy_location.value == "HeadOnly"
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000
    assert schema.grpc_options.grpc_servicer_functions == []  # no gRPC proxy started

    (app,) = schema.applications
    assert app.name == APP_NAME and app.route_prefix == "/" and app.import_path == IMPORT_PATH
    # No local working_dir: `serve deploy` rejects it, the package is installed on the nodes instead.
    assert "working_dir" not in (app.runtime_env or {})

    args = _app_args(app)
    assert args.preset == "smollm2-135m-clt" and args.model is None  # resolved by the builder on the cluster
    assert args.max_queued_requests == 16 and args.max_prompt_tokens == 2048
    assert args.autoscaling is not None
    assert (args.autoscaling.min_replicas, args.autoscaling.max_replicas) == (1, 4)
    assert args.autoscaling.target_ongoing_requests == 1
    assert "api_token" not in app.args  # the token comes from env ATTRIBUTE_RAY_API_TOKEN, not the file


def test_serve_config_commented_deployments_example_is_valid(serve_config):
    """The commented `deployments:` override example must still be valid once uncommented."""
    from ray.serve.schema import DeploymentSchema

    overrides = _commented_yaml(SERVE_CONFIG.read_text(), "deployments", indent=4)
    parsed = {d["name"]: DeploymentSchema.model_validate(d) for d in overrides}
    assert set(parsed) <= DEPLOYMENT_NAMES
    engine = parsed["AttributionEngine"]
    assert engine.ray_actor_options.num_gpus == 1 and engine.max_ongoing_requests == 1
    # And the whole config with it uncommented.
    cfg = copy.deepcopy(serve_config)
    cfg["applications"][0]["deployments"] = overrides
    _validate_serve(cfg)


def test_serve_autoscaling_fits_the_cluster(serve_config, cluster):
    (app,) = serve_config["applications"]
    gpus_per_replica = app["args"].get("num_gpus", 1)
    max_gpu_nodes = cluster["available_node_types"]["gpu_worker"]["max_workers"]
    assert app["args"]["autoscaling"]["max_replicas"] * gpus_per_replica <= max_gpu_nodes


def test_import_path_resolves():
    """The builder named by import_path exists."""
    module_name, attr = IMPORT_PATH.split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr))


# ------------------------------------------------------------------------------------ KubeRay RayService


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _load(RAYSERVICE)


def _pod_templates(rs: dict) -> dict:
    cluster = rs["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def test_rayservice_serve_config_v2(rayservice, serve_config):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    raw = rayservice["spec"]["serveConfigV2"]
    assert isinstance(raw, str)  # KubeRay wants the Serve config as a multi-line string
    inner = yaml.safe_load(raw)
    schema = _validate_serve(inner)
    assert schema.proxy_location.value == "HeadOnly"
    assert schema.grpc_options.grpc_servicer_functions == []
    # Deliberately not loopback on Kubernetes: the serve Service forwards to the pod IP (see the file's header).
    assert schema.http_options.port == 8000
    # Same application (name, route, import path, args) as serve_config.yaml.
    assert inner["applications"] == serve_config["applications"]
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH and "working_dir" not in (app.runtime_env or {})
    _app_args(app)


def test_rayservice_cluster(rayservice, serve_config):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    # The head stays schedulable (CPU-only Ingress, build tasks); KubeRay wants string values.
    assert head_params.get("num-cpus") != "0"
    for params in [head_params] + [g.get("rayStartParams", {}) for g in cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), params

    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] >= 1
    assert gpu["maxReplicas"] >= serve_config["applications"][0]["args"]["autoscaling"]["max_replicas"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1


def test_rayservice_pods(rayservice):
    images = set()
    for name, template in _pod_templates(rayservice).items():
        spec = template["spec"]
        shm = [v["name"] for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, f"{name}: no Memory emptyDir"
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/dev/shm") in shm, f"{name}/{container['name']}: /dev/shm not a Memory emptyDir"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_USAGE_STATS_ENABLED") == "0", f"{name}/{container['name']}"
            images.add(container["image"])
    # One image everywhere, with the package baked in (not the bare Ray image: no local working_dir on KubeRay).
    assert len(images) == 1
    (image,) = images
    assert not image.startswith("rayproject/ray"), image


def test_files_hold_no_secrets():
    for path in (CLUSTER_YAML, SERVE_CONFIG, RAYSERVICE):
        text = path.read_text()
        for marker in ("hf_", "AKIA", "BEGIN RSA", "BEGIN OPENSSH"):
            assert marker not in text, f"{path.name}: {marker}"
