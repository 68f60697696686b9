"""The attribution service's builder: `AppArgs` → Ingress (HTTP, job table) + AttributionEngine (resident model).

    serve run deployments.app:app_builder preset=smollm2-135m-clt
    serve deploy serve_config.yaml

`deployments/config.py` holds `AppArgs`, `deployments/engine.py` the engine, `deployments/ingress.py` the routes and
`deployments/job_table.py` the job table (docs/architecture.md).
"""

from typing import Any

from ray import serve

from deployments.config import AppArgs
from deployments.engine import AttributionEngine
from deployments.ingress import Ingress

SHUTDOWN_DRAIN_S = 8.0  # replicas finish in-flight requests for this long on shutdown: inside the CLI's 10 s limit


def app_builder(args: Any) -> serve.Application:
    """Typed builder: `args` is an `AppArgs` or a dict of its fields (from `serve run ... key=value` or a config)."""
    import ray

    args = (args if isinstance(args, AppArgs) else AppArgs.model_validate(args)).resolved()
    num_gpus = args.num_gpus
    if num_gpus is None:  # never request a GPU a CPU-only cluster cannot schedule (docs/ray-notes.md #3)
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    scaling: dict[str, Any] = (
        {"autoscaling_config": args.autoscaling.model_dump()} if args.autoscaling else {"num_replicas": args.num_replicas}
    )
    placement: dict[str, Any] = {"max_replicas_per_node": args.max_replicas_per_node} if args.max_replicas_per_node else {}
    engine = AttributionEngine.options(
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": args.num_cpus, "resources": args.engine_resources},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        graceful_shutdown_timeout_s=SHUTDOWN_DRAIN_S,
        **scaling,
        **placement,
    ).bind(args)
    ingress = {"ray_actor_options": {"num_cpus": 0, "resources": args.ingress_resources}} if args.ingress_resources else {}
    return Ingress.options(graceful_shutdown_timeout_s=SHUTDOWN_DRAIN_S, **ingress).bind(engine, args)
