"""`ray job submit` of the caching job (then of the explanations job on its cache) against a local `ray start --head --block`, run in its own process group
and stopped by signalling that group: only the Ray processes this test started are stopped (never `ray stop`,
which stops every Ray instance on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_cache_job import corpus, pair  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).parent.parent


def test_ray_job_submit_smoke(pair, corpus, tmp_path) -> None:
    """`ray job submit` against a local `ray start --head` (with its dashboard, which jobs need)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dash = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = Path("/tmp") / f"rj{os.getpid()}"
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus=2", "--port=0", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_dashboard(dash, head)
        out = tmp_path / "cache"
        cmd = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--runtime-env-json", json.dumps({"excludes": [".git", ".venv", "*.egg-info"]}), "--",
               sys.executable, "-m", "jobs.cache_activations", "--model", str(pair[0]), "--transcoder", str(pair[1]),
               "--dataset", str(corpus), "--n-tokens", "400", "--ctx-len", "16", "--out", str(out), "--num-actors", "1",
               "--no-features"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr).lower()
        assert (out / "manifest.json").exists() and list((out / "shards").glob("*.parquet"))

        # the explanations job on that cache, the same way: every active feature gets its label
        from attribute_ray.explanations import active_features, explained

        cmd = [*cmd[: cmd.index("--") + 1], sys.executable, "-m", "jobs.explain_features", str(out), "--explainer", "tokens"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert explained(out, "tokens") == set(active_features(out)) != set()
    finally:
        _stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard on port {port} did not come up in {timeout:.0f}s")


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (GCS, raylet, dashboard, workers), SIGKILL if it lingers."""
    pgid = os.getpgid(head.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # whatever outlived the head
    except ProcessLookupError:
        pass
    head.wait()
