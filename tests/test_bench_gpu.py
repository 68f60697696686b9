"""`python -m bench.gpu`: the GPU path's script, run here on the CPU (``--device cpu --quick``) end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu
from bench.common import Comparison

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).parent.parent


def bench_gpu(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env}, timeout=850)


def row(table: str, measure: str) -> list[str]:
    """The cells after `measure` on its table line: value [unit], reference [unit], ratio, ..."""
    line = next(line for line in table.splitlines() if line.startswith(measure))
    return re.split(r"\s{2,}", line[len(measure):].strip())


@pytest.mark.slow
def test_the_cpu_variant_runs_every_step_and_prints_one_table() -> None:
    out = bench_gpu("--device", "cpu", "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("bench.gpu on cpu"):]
    for step in gpu.STEPS:
        assert step in table, step
    assert ": failed" not in table and "FAILED" not in table
    # the bf16 graph is close to the fp32 one and ranks mostly the same features on top
    assert float(row(table, "bf16 vs fp32 graph: max |A_bf16 - A_fp32| vs max |A_fp32|")[2]) < 0.1
    shared, of = row(table, "bf16 vs fp32 graph: top-10 features by influence shared")[:2]
    assert int(of) == 10 and int(shared) >= 5
    assert "top logit the same" in table
    # the served graph and the job ran for real: positive times and rates
    assert float(row(table, "serve, 1 GPU per engine: one graph over HTTP vs in-process")[0].split()[0]) > 0
    job = row(table, "cache job, 1 GPU actor vs in-process encode")
    assert float(job[0].split()[0].replace(",", "")) > 0 and job[0].endswith("tok/s")


def test_without_cuda_it_says_so_and_exits_non_zero() -> None:
    out = bench_gpu(CUDA_VISIBLE_DEVICES="")
    assert out.returncode == gpu.NO_CUDA == 2
    assert "no CUDA device is visible" in out.stderr and "--device cpu" in out.stderr
    assert "measure" not in out.stdout  # no table


def test_a_failed_step_is_listed_and_the_exit_status_is_one(monkeypatch, capsys) -> None:
    def measure(args, root):
        return "title", [Comparison("serve, 1 GPU per engine: failed", float("nan"), float("nan"))], [], [
            ("serve, 1 GPU per engine", "RuntimeError: boom")]

    monkeypatch.setattr(gpu, "measure", measure)
    assert gpu.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "serve, 1 GPU per engine: failed" in out and "FAILED serve, 1 GPU per engine: RuntimeError: boom" in out
