"""How jobs use Ray: the one way a driver connects, and the one way it fans work out as tasks."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def init_ray() -> None:
    """Connect once: to the cluster when RAY_ADDRESS is set (inside `ray job submit`, where resource arguments
    are rejected: docs/ray-notes.md #7), else a lean local Ray without a dashboard."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def map_tasks(fn: Callable[..., T], calls: Sequence[tuple]) -> list[T]:
    """``fn(*args)`` of every call as one Ray task (1 CPU) each on the connected cluster; results in call order
    (an `attribute_ray.features.MapShards`)."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(*args) for args in calls])
