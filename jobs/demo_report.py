"""The demo transcoder's training report: a training run's transcoder next to an earlier one, measured the same way.

    python -m jobs.demo_report --run runs/demo --old OLD_DEMO_DIR --out attribute_ray/demo/training-report.json

`--run` is a `jobs.train_transcoder` output folder (its report.json, config and held-out activations); `--old` a
folder holding ``transcoder/`` and ``features/`` as `attribute_ray/demo` does (a copy of the shipped demo before
it is replaced). Both transcoders are measured on the run's held-out windows by the training evaluation
(attribute_ray/training/evaluate.py, which made the run's report.json: per-layer FVU, L0, never-active and dense
fractions; KL(model ‖ replacement without errors) and next-token agreement), then make the graphs of `PROMPTS`
(replacement and completeness scores, `max_feature_nodes` 500). For "The capital of France is" the ten features with the most influence on the
top logit are listed with their dashboards' top activating tokens and labels (`--new-features`, default the
demo's store). The report is written atomically and printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from attribute_ray import ReplacementModel, attribute, pruning
from attribute_ray.features import read_feature
from attribute_ray.files import atomic_write
from attribute_ray.graph import Graph
from attribute_ray.presets import DEMO_DIR
from attribute_ray.training import TrainConfig, evaluate

PROMPTS = ["The capital of France is", "In the beginning God created the", "def add(a, b):\n    return a +",
           "The opposite of hot is", "A hacker is a person who"]
MAX_FEATURE_NODES = 500
THREADS = 2


def top_logit_features(graph: Graph, features: str | Path, n: int = 10) -> list[dict]:
    """The `n` distinct (layer, feature) with the most influence on the graph's top logit (influence through the
    normalised graph, docs/method.md §6, from that logit alone), with their dashboard's activation frequency, top
    activating tokens and best label."""
    w = torch.zeros(graph.n_nodes, dtype=graph.rows.dtype)
    w[graph.logit_offset] = 1.0
    infl = pruning.influence(pruning.normalize(graph.rows), graph.row_nodes, w)[: graph.n_selected]
    best: dict[tuple[int, int], float] = {}
    for i in torch.argsort(infl, descending=True).tolist():
        layer, _, feat = graph.selected_nodes[i].tolist()
        best.setdefault((layer, feat), float(infl[i]))
    out = []
    for (layer, feat), value in list(best.items())[:n]:
        dash = read_feature(features, layer, feat) or {}
        examples = (dash.get("examples_quantiles") or [{}])[0].get("examples", [])
        tops = [ex["tokens"][max(range(len(ex["tokens_acts_list"])), key=ex["tokens_acts_list"].__getitem__)]
                for ex in examples[:5]]
        labels = dash.get("explanations") or [{}]
        out.append({"layer": layer, "feature": feat, "influence": value,
                    "frequency": dash.get("activation_frequency"), "top_tokens": tops, "label": labels[0].get("text", "")})
    return out


def measure(cfg: TrainConfig, transcoder: str, features: str | Path, evaluation: dict | None = None) -> dict:
    """The evaluation of `transcoder` on the run's held-out windows (`evaluation` when the run made it already),
    and its graphs of `PROMPTS`."""
    keys = ("layers", "kl", "agreement", "n_eval_tokens")
    report = {k: evaluation[k] for k in keys} if evaluation else evaluate(cfg.model_dump(), THREADS, transcoder)
    rm = ReplacementModel.from_pretrained(cfg.model, transcoder)
    report["prompts"] = []
    for prompt in PROMPTS:
        graph = attribute(prompt, rm, max_feature_nodes=MAX_FEATURE_NODES)
        replacement, completeness = graph.scores()
        report["prompts"].append({"prompt": prompt, "top_logit": graph.logit_targets[0].token,
                                  "replacement": replacement, "completeness": completeness})
        if prompt == PROMPTS[0]:
            report["top_features"] = top_logit_features(graph, features)
    return report


def print_report(report: dict) -> None:
    old, new = report["old"], report["new"]
    mean = lambda r, key: sum(x[key] for x in r["layers"]) / len(r["layers"])  # noqa: E731
    print(f"{'':<34}{'old':>10}{'new':>10}")
    rows = [("mean FVU", mean(old, "fvu"), mean(new, "fvu")), ("max FVU", max(x["fvu"] for x in old["layers"]),
            max(x["fvu"] for x in new["layers"])), ("L0 (mean per layer)", mean(old, "l0"), mean(new, "l0")),
            ("never active on held-out", mean(old, "unused_val_frac"), mean(new, "unused_val_frac")),
            ("dense (> 10% of tokens)", mean(old, "dense_frac"), mean(new, "dense_frac")),
            ("KL(model ‖ replacement), nats", old["kl"], new["kl"]), ("next-token agreement", old["agreement"], new["agreement"])]
    for name, a, b in rows:
        print(f"{name:<34}{a:>10.4f}{b:>10.4f}")
    print(f"\n{'prompt':<36}{'top logit':>12}{'old repl.':>11}{'new repl.':>11}{'old compl.':>12}{'new compl.':>12}")
    for a, b in zip(old["prompts"], new["prompts"]):
        print(f"{a['prompt'].replace(chr(10), '⏎'):<36}{b['top_logit']!r:>12}{a['replacement']:>11.3f}"
              f"{b['replacement']:>11.3f}{a['completeness']:>12.3f}{b['completeness']:>12.3f}")
    for name in ("old", "new"):
        print(f"\n{name}: top features on {report[name]['prompts'][0]['top_logit']!r} in {PROMPTS[0]!r}")
        for f in report[name]["top_features"]:
            print(f"  L{f['layer']:>2} #{f['feature']:<5} infl {f['influence']:.3f}  freq {f['frequency'] or 0:.3f}  "
                  f"tokens {f['top_tokens']}  label {f['label']!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo_report", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="jobs.train_transcoder output folder")
    p.add_argument("--old", required=True, help="folder with the earlier transcoder/ and features/")
    p.add_argument("--new-features", default=str(DEMO_DIR / "features"), help="feature store of the new transcoder")
    p.add_argument("--out", required=True, help="report JSON to write")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = json.loads((Path(a.run) / "report.json").read_text())
    identity = json.loads((Path(a.run) / "config.json").read_text())["identity"]  # the run's settings, less paths
    cfg = TrainConfig(**identity, out=a.run, batch_size=16)
    report = {"run": run,
              "old": measure(cfg, str(Path(a.old) / "transcoder"), Path(a.old) / "features"),
              "new": measure(cfg, run["transcoder"], a.new_features, evaluation=run)}
    atomic_write(a.out, json.dumps(report, indent=2))
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
