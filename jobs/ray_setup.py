"""How jobs use Ray: the one way a driver connects, and the one way it fans work out as tasks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def init_ray(address: str | None = None, *, task_output: bool = False) -> None:
    """Connect once. Join an existing cluster only when asked — `address` (a job's ``--address``) or RAY_ADDRESS
    (set inside `ray job submit`, where resource arguments are rejected: docs/ray-notes.md #7); otherwise start
    a lean local Ray of our own (``address="local"``): never whatever a `ray_current_cluster` file left behind
    by an earlier Ray names, which may be long dead (a bare `ray.init()` then waits on it for minutes).
    `task_output`: the local Ray prints its tasks' output here (their progress lines), as a job's log does."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=task_output)


class _JoinCluster(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None) -> None:
        os.environ["RAY_ADDRESS"] = value  # read by init_ray, wherever the job calls it
        setattr(namespace, self.dest, value)


def add_address_flag(parser: argparse.ArgumentParser) -> None:
    """``--address ADDR``: the Ray cluster to join; without it (or RAY_ADDRESS) the job starts its own local Ray."""
    parser.add_argument("--address", action=_JoinCluster, default=None,
                        help="Ray cluster to join (e.g. ray://head:10001 or auto); default: RAY_ADDRESS if set, "
                        "else a local Ray of the job's own")


def map_tasks(fn: Callable[..., T], calls: Sequence[tuple]) -> list[T]:
    """``fn(*args)`` of every call as one Ray task (1 CPU) each on the connected cluster; results in call order
    (an `attribute_ray.features.MapShards`)."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(*args) for args in calls])
