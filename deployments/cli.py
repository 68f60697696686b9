"""The `attribute-ray` command: the library's commands (graph, info) plus ``serve``, which needs Ray.

``attribute-ray serve --preset demo`` (or ``--model M --transcoder T``) starts the service on a local Ray, or on
the cluster at RAY_ADDRESS, until Ctrl-C. Its flags are `AppArgs` fields and, under "default graph settings",
the `GraphSettings` a request may override (``--max-feature-nodes 500``).
"""

import argparse
import os
import signal
import sys
import threading

import attribute_ray.cli
from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.settings import GraphSettings
from deployments.config import AppArgs


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the `attribute-ray` parser."""
    srv = subparsers.add_parser("serve", help="serve attribution graphs over HTTP (Ray Serve)")
    srv.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port of the HTTP proxy (default 8000)")
    add_arguments(srv.add_argument_group("service (AppArgs)"), AppArgs, exclude={"autoscaling", "defaults"})
    add_arguments(srv.add_argument_group("default graph settings (a request may override them)"), GraphSettings)
    srv.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Start the Serve application and block until SIGINT / SIGTERM; then shut Serve and Ray down."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray is imported here, not at the top: `attribute-ray graph` and `info` should not pay for it.
    import ray
    from ray import serve

    from deployments.app import app_builder

    app_args = from_arguments(AppArgs, args, defaults=from_arguments(GraphSettings, args)).resolved()
    try:
        if not ray.is_initialized():
            # RAY_ADDRESS: deploy onto that cluster; otherwise always our own local instance — never silently
            # join (and, on exit, shut down) whatever Ray happens to run on this machine.
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app_builder(app_args), name="attribute-ray", route_prefix="/")
        print(f"attribute-ray serving {app_args.model} + {app_args.transcoder} on http://{args.host}:{args.port} "
              f"(API docs at /docs). Ctrl-C to stop.", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    except KeyboardInterrupt:  # Ctrl-C while starting
        pass
    print("stopping ...", flush=True)
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return attribute_ray.cli.main(argv, commands=[add_serve])


if __name__ == "__main__":
    sys.exit(main())
