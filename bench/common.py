"""What every benchmark shares: timing, peak memory, a tiny model pair on disk, `--quick`, and the one table
they print (measure, value, reference, ratio, goal, met).

Benchmarks measure and print; they never assert. Run them from the repository root: ``python -m bench.NAME``.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def seconds(fn: Callable[[], Any], repeat: int = 1) -> list[float]:
    """Wall-clock seconds of `repeat` calls of `fn` (perf_counter)."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB: VmHWM, its own memory's high-water mark (ru_maxrss
    also counts the parent's resident memory at fork, which survives exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def add_model_size(parser: argparse.ArgumentParser, *, layers: int, d_model: int, features: int) -> None:
    """The size flags every bench shares: the random model's layers and width, the transcoder's features per layer."""
    parser.add_argument("--layers", type=int, default=layers, help="model layers")
    parser.add_argument("--d-model", type=int, default=d_model, help="model width")
    parser.add_argument("--features", type=int, default=features, help="features per layer")


def parse_args(parser: argparse.ArgumentParser, quick: dict[str, Any], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser`'s arguments plus ``--quick``, which swaps the defaults for `quick` (flags given explicitly still win)."""
    sizes = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"the smallest settings that exercise every step: {sizes}")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def run_module(module: str, args: Sequence[str]) -> dict:
    """Run ``python -m module *args`` in a fresh process (so its peak RSS is its own) and return the JSON object
    on the last line of its stdout; exit with its stderr if it fails."""
    cmd = [sys.executable, "-W", "ignore", "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind port 0 and read it back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_ray() -> None:
    """Environment for a benchmark's local Ray: no usage stats (docs/ray-notes.md). Call before importing ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def write_tiny_pair(root: Path, *, layers: int, d_model: int, features: int, k: int = 16) -> tuple[Path, Path]:
    """A random Llama-style model (with the tiny tokenizer, BOS id 0) and a TopK skip transcoder in the sparsify
    format under `root`; returns (model dir, transcoder dir). Deterministic (seed 0)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attribute_ray import save_sparsify
    from attribute_ray.tiny import random_transcoder, tiny_tokenizer
    from attribute_ray.transcoders import Activation

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, bos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(layers, d_model, n_features=features, kind="plt", skip=True, activation=Activation("topk", k=k))
    save_sparsify(tc, root / "tc")
    return root / "model", root / "tc"


_GOAL_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


@dataclass
class Comparison:
    """One row of the table: `value` measured against `reference`, and the goal for value / reference."""

    measure: str
    value: float
    reference: float
    unit: str = ""
    goal: str = ""  # "<= 1.1", ">= 1.7" or "" (no goal)

    @property
    def ratio(self) -> float:
        return self.value / self.reference if self.reference else float("nan")

    @property
    def met(self) -> str:
        if not self.goal:
            return ""
        op, bound = self.goal.split()
        return "yes" if _GOAL_OPS[op](self.ratio, float(bound)) else "no"


def _number(v: float, unit: str) -> str:
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{text} {unit}".rstrip()


def print_table(title: str, rows: Sequence[Comparison], notes: Sequence[str] = ()) -> None:
    """Print `title`, the rows side by side (value, reference, value/reference, goal, whether it is met), then notes."""
    cells = [(r.measure, _number(r.value, r.unit), _number(r.reference, r.unit), f"{r.ratio:.2f}", r.goal, r.met)
             for r in rows]
    head = ("measure", "value", "reference", "ratio", "goal", "met")
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    print(title)
    for c in [head, *cells]:
        print(f"{c[0]:<{widths[0]}}  " + "  ".join(f"{x:>{w}}" for x, w in zip(c[1:], widths[1:])))
    for n in notes:
        print(n)
