"""A local multi-node Ray cluster on 127.0.0.1: one head and N workers on this machine, for tests and for trying
the service and the jobs on more than one node.

    python -m tests.cluster up [--workers 2] [--state /tmp/arc.json]   # start; prints the addresses, writes the state
    python -m tests.cluster down [--state /tmp/arc.json]               # stop exactly the nodes `up` started

Each node is its own `ray start --block` process in its own process group (with its raylet and agents; Ray's
worker processes lead groups of their own and are found as its descendants), with its own temp dir (a short path
under /tmp: Ray's unix sockets live there), free ports, and a custom resource naming it: {"node_head": 1},
{"node_w1": 1}, ... The head has no CPUs (nothing CPU-bound lands there: the job drivers, the Serve controller,
proxy and ingress need none); each worker has `worker_cpus` logical CPUs. Stopping signals only these processes
(never `ray stop`, which stops every Ray on the machine); `kill_node` SIGKILLs all of one node's processes at once,
which is what losing a machine looks like to the rest of the cluster.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_STATE = "/tmp/attribute-ray-cluster.json"
# Run a command with the parent-death signal set (prctl PR_SET_PDEATHSIG = 1, kept across exec): a test process
# killed outright (a CI timeout) still takes its nodes down. A wrapper, not `preexec_fn`, which may deadlock a
# parent that has threads (a Ray driver has).
TIE = [sys.executable, "-c", "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 15); os.execv(sys.argv[1], sys.argv[1:])"]
# The head declares a vanished node dead after about period × threshold (Ray's defaults take longer).
HEALTH_ENV = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
              "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class Node:
    name: str  # "head", "w1", "w2", ...
    pid: int  # the `ray start --block` process, leader of the node's process group
    temp_dir: str
    resource: str  # the custom resource naming the node, e.g. "node_w1"


@dataclass
class LocalCluster:
    gcs_address: str  # 127.0.0.1:PORT, for `ray.init(address=...)` and `ray start --address`
    dashboard_url: str  # http://127.0.0.1:PORT, for `ray job submit` and the state API
    root: str  # the folder holding every node's temp dir
    nodes: list[Node] = field(default_factory=list)
    worker_cpus: int = 2
    object_store_mb: int = 100
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every node
    tied: bool = True  # nodes get SIGTERM when the process that started them dies, however it dies

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def node_ids(self) -> dict[str, str]:
        """{node name: Ray node id} of the nodes alive now (from the state API)."""
        from ray.util.state import list_nodes

        alive = list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], timeout=30,
                           raise_on_missing_output=False)
        names = {n.resource: n.name for n in self.nodes}
        return {names[r]: nd.node_id for nd in alive for r in (nd.resources_total or {}) if r in names}

    def wait_nodes(self, names: set[str], timeout_s: float = 120) -> None:
        """Until exactly the nodes `names` are alive."""
        deadline, seen = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                seen = set(self.node_ids())
                if seen == names:
                    return
            except Exception as e:  # noqa: BLE001 - the dashboard is still starting
                seen = repr(e)[:200]
            time.sleep(0.5)
        raise TimeoutError(f"alive nodes {seen}, expected {sorted(names)}, after {timeout_s:.0f} s")

    def kill_node(self, name: str) -> None:
        """SIGKILL one node's processes (its group: `ray start`, raylet, agents; and its Ray worker processes):
        they die at once, as when a machine is lost."""
        _kill(self.node(name))

    def start_worker(self, name: str) -> Node:
        """Start worker `name` (anew after `kill_node`: fresh temp dir and ports, the same naming resource)."""
        self.nodes = [n for n in self.nodes if n.name != name]
        i = sum(1 for _ in Path(self.root).glob(f"{name}*.log"))
        node = _start_node(name, [f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}"], self.root,
                           f"{name}.{i}" if i else name, self.object_store_mb, _node_env(self.env), self.tied)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), then delete their temp dirs. Idempotent."""
        for n in sorted(self.nodes, key=lambda n: n.name == "head"):
            _stop_node(n)
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workers: int = 2, worker_cpus: int = 2, object_store_mb: int = 100, stop_at_exit: bool = True,
          env: dict[str, str] | None = None, timeout_s: float = 180) -> LocalCluster:
    """Start the head and `workers` workers and wait until all are alive; stops what it started if anything fails.
    `env`: extra environment for every node (and so for every Ray worker process). `stop_at_exit`: stop the nodes
    when this process exits (atexit) or dies (parent-death signal); `up` leaves them running."""
    for attempt in range(2):
        try:
            return _start(workers, worker_cpus, object_store_mb, stop_at_exit, env, timeout_s)
        except HeadExited as e:  # a free port taken by someone else in between, say: once more with other ports
            if attempt:
                raise
            print(f"retrying: {str(e)[-500:]}", file=sys.stderr)
    raise AssertionError("unreachable")


class HeadExited(RuntimeError):
    pass


def _start(workers: int, worker_cpus: int, object_store_mb: int, stop_at_exit: bool, env: dict[str, str] | None,
           timeout_s: float) -> LocalCluster:
    root = tempfile.mkdtemp(prefix="arc", dir="/tmp")
    gcs, dash = free_port(), free_port()
    cluster = LocalCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", root, [], worker_cpus, object_store_mb,
                           dict(env or {}), tied=stop_at_exit)
    if stop_at_exit:
        atexit.register(cluster.stop)
    try:
        head = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                "--num-cpus=0", f"--ray-client-server-port={free_port()}"]
        cluster.nodes.append(_start_node("head", head, root, "head", object_store_mb, _node_env(cluster.env),
                                         cluster.tied))
        _wait_for_dashboard(cluster, timeout_s)
        for i in range(1, workers + 1):
            cluster.start_worker(f"w{i}")
        _wait_for_workers(cluster, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_workers(cluster: LocalCluster, timeout_s: float, restarts: int = 2) -> None:
    """Until every node is alive; a worker whose `ray start` exited (a free port taken in between, say) is started
    again, at most `restarts` times in all. On timeout the error carries the nodes' log tails."""
    deadline = time.monotonic() + timeout_s
    names = {n.name for n in cluster.nodes}
    while time.monotonic() < deadline:
        for node in [n for n in cluster.nodes if n.name != "head" and not _alive(n)]:
            if restarts == 0:
                break
            restarts -= 1
            print(f"worker {node.name} exited; starting it again", file=sys.stderr)
            cluster.start_worker(node.name)
        try:
            cluster.wait_nodes(names, timeout_s=min(10.0, max(1.0, deadline - time.monotonic())))
            return
        except TimeoutError:
            continue
    logs = "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for log in Path(cluster.root).glob("*.log"))
    raise TimeoutError(f"the cluster's nodes did not all come up in {timeout_s:.0f} s:{logs}")


def _node_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **HEALTH_ENV, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _start_node(name: str, args: list[str], root: str, dirname: str, object_store_mb: int, env: dict[str, str],
                tied: bool) -> Node:
    temp = os.path.join(root, dirname)
    os.makedirs(temp)
    resource = f"node_{name}"
    ports = [f"--{flag}={free_port()}" for flag in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                                    "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port")]
    worker_ports = random.randrange(20000, 32000, 100)  # below Linux's ephemeral ports; another node's range is unlikely
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", *args, "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp}", f"--object-store-memory={object_store_mb * 2**20}",
           f"--resources={json.dumps({resource: 1})}", f"--min-worker-port={worker_ports}",
           f"--max-worker-port={worker_ports + 99}", "--disable-usage-stats", *ports]
    with open(os.path.join(root, f"{dirname}.log"), "wb") as log:
        proc = subprocess.Popen([*TIE, *cmd] if tied else cmd, env=env, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)
    return Node(name, proc.pid, temp, resource)


def _wait_for_dashboard(cluster: LocalCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    head = cluster.node("head")
    while time.monotonic() < deadline:
        if not _alive(head):
            raise HeadExited("the head exited:\n" + Path(cluster.root, "head.log").read_text(errors="replace")[-3000:])
        try:
            urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard {cluster.dashboard_url} did not come up in {timeout_s:.0f} s")


def _ours(node: Node) -> bool:
    """Whether `node.pid` still is the `ray start` we launched (not a recycled pid)."""
    try:
        return node.temp_dir in Path(f"/proc/{node.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _procs() -> dict[int, tuple[str, int, int]]:
    """{pid: (state, parent pid, process group)} of every process now."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            out[int(stat.parent.name)] = (state, int(ppid), int(pgrp))
        except (OSError, ValueError):
            continue
    return out


def _tree(node: Node) -> set[int]:
    """Live pids of the node: its process group and every descendant (Ray worker processes lead groups of their
    own, so signalling the node's group alone would leave them running)."""
    procs = _procs()
    found = {pid for pid, (state, _, pgrp) in procs.items() if pgrp == node.pid and state != "Z"}
    grew = True
    while grew:
        more = {pid for pid, (state, ppid, _) in procs.items() if ppid in found and state != "Z"} - found
        found |= more
        grew = bool(more)
    return found


def _alive(node: Node) -> bool:
    try:
        os.waitpid(node.pid, os.WNOHANG)  # reap the leader if it is our child
    except ChildProcessError:
        pass
    return bool(_tree(node))


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill(node: Node) -> None:
    """SIGKILL every process of the node, the leader's group and descendants alike."""
    for _ in range(5):  # a process forked while we kill is caught in the next pass
        pids = _tree(node) if (_ours(node) or _alive(node)) else set()
        if not pids:
            return
        _signal(pids, signal.SIGKILL)
        time.sleep(0.1)


def _stop_node(node: Node, grace_s: float = 5) -> None:
    """SIGTERM the node's processes (`ray start --block` then stops its raylet and workers), SIGKILL what lingers."""
    if not (_ours(node) or _alive(node)):
        return
    _signal(_tree(node), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(node) and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill(node)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down"])
    p.add_argument("--workers", type=int, default=2, help="worker nodes (besides the head)")
    p.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs per worker")
    p.add_argument("--state", default=DEFAULT_STATE, help="where `up` records the nodes and `down` reads them")
    a = p.parse_args(argv)
    state = Path(a.state)
    if a.command == "up":
        if state.exists():
            p.error(f"{state} exists: a cluster is up (python -m tests.cluster down --state {state})")
        cluster = start(a.workers, a.worker_cpus, stop_at_exit=False)
        state.write_text(json.dumps(asdict(cluster), indent=2))
        print(f"up: {len(cluster.nodes)} nodes; RAY_ADDRESS={cluster.gcs_address}  dashboard {cluster.dashboard_url}"
              f"\n  ray job submit --address {cluster.dashboard_url} --working-dir . -- python -m jobs...\n"
              f"  python -m tests.cluster down --state {state}")
        return 0
    if not state.exists():
        p.error(f"no {state}: nothing to stop")
    raw = json.loads(state.read_text())
    cluster = LocalCluster(**{**raw, "nodes": [Node(**n) for n in raw["nodes"]]})
    cluster.stop()
    state.unlink()
    print(f"down: stopped {len(cluster.nodes)} nodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
