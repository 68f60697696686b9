"""The `attribute-ray` command: the library's commands (graph, info) plus ``serve``, which needs Ray.

``attribute-ray serve --preset demo`` (or ``--model M --transcoder T``) starts the service on a local Ray, or on
the cluster at RAY_ADDRESS, until Ctrl-C. Its flags are `AppArgs` fields and, under "default graph settings",
the `GraphSettings` a request may override (``--max-feature-nodes 500``).
"""

import argparse
import logging
import os
import signal
import sys
import threading

import attribute_ray.cli
from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.presets import display_name
from attribute_ray.settings import GraphSettings
from deployments.config import AppArgs

APP_NAME = "attribute-ray"


DRAIN_S = 5.0  # on SIGINT, requests in flight get this long to finish while new ones get 503
SHUTDOWN_S = 8.0  # then Serve's graceful shutdown gets this long; then Ray stops regardless (docs/ray-notes.md)


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the `attribute-ray` parser."""
    srv = subparsers.add_parser("serve", help="serve attribution graphs over HTTP (Ray Serve)")
    srv.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port of the HTTP proxy (default 8000)")
    srv.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS if set, else "
                     "start a local Ray of our own)")
    add_arguments(srv.add_argument_group("service (AppArgs)"), AppArgs, exclude={"autoscaling", "defaults"})
    add_arguments(srv.add_argument_group("default graph settings (a request may override them)"), GraphSettings)
    srv.set_defaults(func=serve_command)


class _FreshStartNotice(logging.Filter):
    """Drops Serve's "Connecting to existing Serve app ... New http_options ... will not be applied": `serve.run`
    logs it whenever Serve already runs, including the instance `serve.start` just created with our options."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Connecting to existing Serve app" not in record.getMessage()


def serve_command(args: argparse.Namespace) -> int:
    """Start the Serve application, say what it serves, and block until SIGINT / SIGTERM; then shut Serve and Ray
    down within about `DRAIN_S` + `SHUTDOWN_S`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray is imported here, not at the top: `attribute-ray graph` and `info` should not pay for it.
    import ray
    from ray import serve

    from deployments.app import app_builder

    app_args = from_arguments(AppArgs, args, defaults=from_arguments(GraphSettings, args)).resolved()
    names = f"{display_name(app_args.model)} + {display_name(app_args.transcoder)}"  # never a server path
    url = f"http://{args.host}:{args.port}"
    stop = threading.Event()
    code = 0
    try:
        if not ray.is_initialized():
            # --address / RAY_ADDRESS: deploy onto that cluster; otherwise always our own local instance — never
            # silently join (and, on exit, shut down) whatever Ray a stale cluster file names.
            address = args.address or os.environ.get("RAY_ADDRESS") or "local"
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        app = app_builder(app_args)  # before the proxy starts: it answers 404 until the app's route exists
        serve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly")
        notice = _FreshStartNotice()
        logging.getLogger("ray.serve").addFilter(notice)
        try:  # not waiting for the engine: /healthz answers (and says "starting") while the model loads
            serve.run_many([serve.RunTarget(target=app, name=APP_NAME, route_prefix="/")],
                           wait_for_applications_running=False)
        finally:
            logging.getLogger("ray.serve").removeFilter(notice)
        print(f"attribute-ray starting {names} on {url} ...", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if wait_running(stop):
            print(f"attribute-ray serving {names} on {url} (web UI at /, API docs at /docs). Ctrl-C to stop.",
                  flush=True)
        stop.wait()
    except KeyboardInterrupt:  # Ctrl-C while starting
        pass
    except RuntimeError as e:  # the deploy failed: say so, then stop as on Ctrl-C
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    print("stopping ...", flush=True)
    if ray.is_initialized():
        drain(DRAIN_S)
        # A daemon thread with a deadline: Serve's graceful shutdown waits for in-flight requests, which must not
        # hold Ctrl-C for long; ray.shutdown() then stops whatever is left.
        quit_serve = threading.Thread(target=serve.shutdown, daemon=True)
        quit_serve.start()
        quit_serve.join(SHUTDOWN_S)
        ray.shutdown()
    return code


def drain(timeout_s: float) -> None:
    """Let the ingress finish its requests in flight (new ones get 503), so stopping Serve cuts none off."""
    from ray import serve

    try:
        left = serve.get_deployment_handle("Ingress", app_name=APP_NAME).drain.remote(timeout_s).result(
            timeout_s=timeout_s + 5)
        if left:
            print(f"{left} requests still running after {timeout_s:.0f} s; stopping anyway", flush=True)
    except Exception:  # noqa: BLE001 - nothing deployed (a failed start) or already gone: nothing to drain
        pass


def wait_running(stop: threading.Event) -> bool:
    """Wait until the application is RUNNING (True) or `stop` is set (False); a failed deploy raises."""
    from ray import serve

    while not stop.wait(0.5):
        app = serve.status().applications.get(APP_NAME)
        status = str(app.status) if app else ""
        if status.endswith("RUNNING"):
            return True
        if status.endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"the application failed to deploy: {app.message}")
    return False


def main(argv: list[str] | None = None) -> int:
    return attribute_ray.cli.main(argv, commands=[add_serve])


if __name__ == "__main__":
    sys.exit(main())
