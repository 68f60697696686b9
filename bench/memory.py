"""The memory model against measured peaks: ``python -m bench.memory`` (``--quick``: the tiny model only).

For each case it runs `attribute()` once, reads the process's peak RSS above its level before (Linux VmHWM), and
prints the estimate beside it (value = estimate, reference = measured; the goal is the band the tests accept),
then the estimate's breakdown for the demo layout at growing prompt lengths: what grows with T (the trace: logits,
activations, q/k/v; no attention pattern is kept), with n_active (the sources, the row buffer's columns) and with
the rows. ``python -m bench.long_prompt`` measures one long prompt on this layout.
"""

from __future__ import annotations

import argparse

import torch

from attribute_ray import ReplacementModel
from attribute_ray.attribution import attribute, request_shape, select_targets
from attribute_ray.memory import (
    CHUNK_BUDGET,
    GiB,
    MemoryBudget,
    MemoryBudgetExceeded,
    ModelShape,
    PeakRss,
    RequestShape,
    chunk_budget,
    chunk_rows,
    estimate,
    plan,
    release_memory,
    row_buffer_bytes,
)
from attribute_ray.settings import AttributionSettings
from bench.common import Comparison, parse_args, print_table


def measure(model: ReplacementModel, tokens: torch.Tensor, cap: int | None) -> tuple[int, int]:
    """(estimated, measured) peak bytes of one attribution above the resident model."""
    trace = model.trace(tokens, linearise=True)
    n = len(trace.features)
    k = len(select_targets(model, trace, None, 10, 0.95).nodes)  # the default logit targets
    req, _ = request_shape(model, trace, n if cap is None else min(cap, n), k, AttributionSettings(), None)
    del trace
    release_memory()
    with PeakRss() as peak:
        attribute(tokens, model, max_feature_nodes=cap).to_msgpack()
    return estimate(ModelShape.of(model), req).engine_peak, peak.peak


def sweep(m: ModelShape, k: int, rows: int, budget: MemoryBudget, lengths: tuple[int, ...]) -> None:
    """The estimate's breakdown and the admission verdict of `rows` feature rows + 10 logits on layout `m` (TopK `k`
    per layer: n_active = L·k·(T − 1)) at each prompt length, within `budget`."""
    print(f"\n{rows} feature rows + 10 logits, k = {k}, budget {budget.max_bytes / GiB:.0f} GiB (GiB):")
    print(f"{'tokens':>6} {'n_active':>9} {'trace':>6} {'sources':>7} {'rows':>6} {'influence':>9} {'chunk':>6} "
          f"{'packing':>7} {'peak':>6}  admitted")
    step = AttributionSettings().update_interval * 256
    for T in lengths:
        n = m.n_layers * k * (T - 1)
        chunk = chunk_rows(m, T, 256, chunk_budget(budget, CHUNK_BUDGET, row_buffer_bytes(rows, 10, n, m.n_layers, T)))
        req = RequestShape(T, n, rows, 10, chunk, m.n_layers * (k + 1), step)
        e = estimate(m, req)
        try:
            verdict = f"{plan(m, req, budget).feature_rows} rows"
        except MemoryBudgetExceeded as err:
            verdict = f"refused: {err.advice}"
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        print(f"{T:>6} {n:>9} {g(e.trace):>6} {g(e.sources):>7} {g(e.row_buffer):>6} {g(e.influence):>9} "
              f"{g(e.chunk):>6} {g(e.packing):>7} {g(e.engine_peak):>6}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = parse_args(parser, {})
    torch.set_num_threads(2)
    from attribute_ray.tiny import VOCAB, tiny_model, transcoder_for

    model, tok = tiny_model("llama", seed=0)
    cases = [("tiny", ReplacementModel(model, tok, transcoder_for(model, kind="concat", skip=True, gates=True)),
              [(150, None), (600, 300)])]
    if not args.quick:
        from attribute_ray.presets import resolve_preset

        preset = resolve_preset("demo")
        cases.append(("demo", ReplacementModel.from_pretrained(preset.model, preset.transcoder),
                      [(64, 500), (256, 100), (512, 100)]))
    rows = []
    for name, rm, sizes in cases:
        rm.trace(rm.tokenize([0, 1, 2]), linearise=True)  # one-off allocations belong to the resident model
        for n_pos, cap in sizes:
            tokens = torch.randint(3, VOCAB, (n_pos,), generator=torch.Generator().manual_seed(n_pos)) \
                if name == "tiny" else rm.tokenize("The capital of France is Paris. " * 200)[:n_pos]
            est, peak = measure(rm, tokens, cap)
            rows.append(Comparison(f"{name}: {n_pos} tokens, max_feature_nodes={cap}: estimate vs measured peak",
                                   est / 2**20, peak / 2**20, "MiB", ">= 0.8"))
    print_table("memory model vs measured peak RSS (above the resident model)", rows,
                ["tests/test_memory.py accepts 0.8 ≤ estimate/measured ≤ 2.5"])

    demo = ModelShape(30, 576, 9, 1536, 49152, 768, 4, 3, 64)  # SmolLM2-135M + the demo transcoder (k = 16 per layer)
    print("\nthe demo layout, default settings (7,500 feature rows):", end="")
    sweep(demo, 16, 7500, MemoryBudget(max_bytes=10 * GiB), (64, 256, 512, 1024, 2048, 4096))

if __name__ == "__main__":
    main()
