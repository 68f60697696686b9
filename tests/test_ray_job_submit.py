"""`ray job submit` of the caching job against a local `ray start --head`. Its own module: `ray stop` at the
end stops every Ray instance on the machine, so no other test may hold a Ray session meanwhile."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", "--port=0", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
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
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
