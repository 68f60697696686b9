"""The memory model of one attribution request (docs/memory.md): peak bytes from the request's shape.

An attribution holds, in order of appearance (fp32 = 4 bytes, `s` = the model's activation dtype size):

    trace        the recorded linearised forward, kept until the rows are done: logits T·V·s + per-layer
                 activations L·T·(c_res·D + c_mlp·d_mlp)·s + the q, k, v attention keeps per layer L·T·(H + 2·KV)·dh·s
                 + the attention mask T²·4, + every pattern L·H·T²·4 while that is at most `KEEP_PATTERNS_BYTES`
                 (`keeps_patterns`). Past it, ``trace(linearise=True, keep_patterns=False)`` keeps no pattern:
                 attention runs in query blocks (`attention_block_bytes`, at most `PATTERN_BLOCK_BYTES` of pattern
                 each, 3 copies while softmaxing), while tracing and again in every backward pass (while tracing,
                 one layer's encoder pre-activations 2·T·F·s exist on top)
    sources      per layer the source vectors grouped by position, T·M_l·D·4 (+ their column ids), M_l = the most
                 sources (features writing to layer l, plus the error node) at one position
    row buffer   the rows being computed: (R)·(C + K)·4 with R = feature rows + K logit rows and
                 C = n_active + (L+1)·T columns (every active feature is a source until the end)
    influence    with a feature cap, `pruning.partial_influence`'s absolute values of one block of the rows computed
                 before the last influence update (`RequestShape.influence_step`; at most `INFLUENCE_BLOCK` floats)
    chunk        gradients of one backward batch: b·(L+3)·T·D·4·c_chunk, and its row slice b·C·4, plus one attention
                 block (each head's Pᵀ·g is a 2-D product: the pattern is never copied per row)
    graph        the selected rows R·N·4, N = n_sel + (L+1)·T + K, and while packing them into msgpack a byte mask,
                 the non-zero values (≤ R·N·4) and the output (≤ msgpack_max): at most R·N·(1 + 1/8 + 2·(4 + 1/8))
                 bytes more

So the trace grows with T (T² only in the mask, one block of at most 64 MiB of pattern, and at most 256 MiB of
kept patterns), the sources and the row buffer with n_active (itself ∝ T·L·k), the row buffer, influence and graph
with the rows.
The phases do not overlap entirely: the trace and the row buffer are gone when the graph is packed. The engine's
peak is the largest phase; the ingress holds at most one `STREAM_CHUNK` of a graph while storing it, and a full
decode (dense rows, the prune's copies) only when a client asks for JSON or a pruned view.

`plan` turns the model into admission: given a `MemoryBudget`, a request is run as asked, trimmed to fewer
feature rows, or refused with `MemoryBudgetExceeded` naming the limit and the smallest change that fits.
"""

from __future__ import annotations

import ctypes
import gc
import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from attribute_ray.errors import AttributeRayError

GiB = 2**30
STREAM_CHUNK = 8 * 2**20  # bytes of a graph per message when the engine streams it to the ingress
CHUNK_BUDGET = 512 * 2**20  # default cap on one backward batch's gradient buffers (bytes)
PATTERN_BLOCK_BYTES = 64 * 2**20  # most bytes of fp32 attention pattern one query block holds (replacement.py)
KEEP_PATTERNS_BYTES = 256 * 2**20  # attribution keeps every pattern while they take at most this (`keeps_patterns`)
CHUNK_FLOOR = 32 * 2**20  # the least a backward batch may hold when the result is small (`chunk_budget`)
INFLUENCE_BLOCK = 2**24  # elements of the row buffer `pruning.partial_influence` takes |·| of at a time (64 MiB)

# Calibrated on CPU fp32 (tiny models and SmolLM2-135M, bench/memory.py): the activations autograd keeps per layer,
# in units of T·D and T·d_mlp (5·T·D of them the `AttentionSites` attribution's first step reads), and the
# backward's working set per gradient row in units of (L+3)·T·D·4.
C_RES, C_MLP, C_CHUNK = 21, 4, 2.7
SLACK = 64 * 2**20  # what the allocator holds beyond the live tensors (per-thread arenas, fragmentation)


class MemoryBudgetExceeded(AttributeRayError, MemoryError):
    """A request needs more memory than its budget allows even when trimmed; `advice` is the smallest change that
    would fit (a shorter prompt or a smaller `max_feature_nodes`)."""

    def __init__(self, message: str, needed: int, budget: int, advice: str):
        super().__init__(f"{message}; {advice}")
        self.needed, self.budget, self.advice = needed, budget, advice


class MemoryBudget(BaseModel):
    """How much memory one attribution may use on top of the loaded model, and what to do beyond it."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(ge=1, description="bytes one request may use on top of the resident model")
    on_exceed: Literal["trim", "refuse"] = Field("trim", description="trim: compute fewer feature rows than asked "
                                                 "(the graph says so); refuse: raise MemoryBudgetExceeded")
    min_feature_rows: int = Field(100, ge=0, description="a trim that leaves fewer feature rows than this (or than "
                                  "asked, if fewer) is refused instead")


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory model needs from a `ReplacementModel`."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab_size: int
    features_per_layer: int
    dtype_bytes: int  # activations of the model and transcoder (4: fp32, 2: bf16/fp16)
    n_kv_heads: int = 0  # key-value heads (0: n_heads)
    head_dim: int = 0  # (0: d_model // n_heads)

    @property
    def qkv_width(self) -> int:
        """Floats per position and layer of the q, k, v the block attention keeps: (H + 2·KV)·dh."""
        return (self.n_heads + 2 * (self.n_kv_heads or self.n_heads)) * (self.head_dim or self.d_model // self.n_heads)

    @classmethod
    def of(cls, model) -> ModelShape:
        """From a `ReplacementModel`."""
        cfg = model.model.config
        n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
        d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * model.d_model
        tc = model.transcoder
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or model.d_model // n_heads
        return cls(model.n_layers, model.d_model, n_heads, d_mlp, cfg.vocab_size, tc.n_features(0),
                   tc.dtype.itemsize, n_kv, head_dim)


@dataclass(frozen=True)
class RequestShape:
    """One request's sizes: prompt positions, active features (known after the trace), rows and batch."""

    n_pos: int
    n_active: int
    feature_rows: int
    n_logits: int
    chunk_rows: int  # rows per backward batch
    max_sources: int = 0  # Σ_l M_l: busiest position's source count per layer, summed (0: estimate as n_active/T + L)
    # with a feature cap, feature rows between influence updates (update_interval · batch_size): the last update
    # normalises the rows done before it only (0: assume all of them)
    influence_step: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of each part of one request (see the module docstring), on top of the resident model."""

    trace: int
    trace_forward: int  # the trace plus what exists only while tracing
    sources: int
    row_buffer: int
    influence: int
    chunk: int
    graph: int  # the selected rows as a dense fp32 tensor
    reorder: int  # with a feature cap, the final reordering's two copies of the graph (0 without one)
    packing: int  # the graph plus its msgpack encoding's buffers
    msgpack_max: int  # the stored graph's size at most (every entry non-zero)
    ingress_decode: int  # what the ingress holds to answer JSON or a pruned view of the graph

    @property
    def rows_phase(self) -> int:
        """Trace, sources, row buffer and the larger of the backward's working set and the final reordering."""
        return self.trace + self.sources + self.row_buffer + max(self.influence + self.chunk, self.reorder)

    @property
    def engine_peak(self) -> int:
        return SLACK + max(self.trace_forward, self.rows_phase, self.packing)

    def breakdown(self) -> dict[str, int]:
        return {**asdict(self), "engine_peak": self.engine_peak}


def attention_block_bytes(m: ModelShape, n_pos: int, block: int = PATTERN_BLOCK_BYTES) -> int:
    """Working set of one attention query block (forward, or the backward's recomputed pattern): the fp32 scores,
    their softmax and the pattern, 3·H·q·T·4 bytes for q = the rows of at most `block` bytes of pattern."""
    rows = min(n_pos, max(1, block // (4 * m.n_heads * max(n_pos, 1))))
    return 3 * 4 * m.n_heads * rows * n_pos


def pattern_bytes(m: ModelShape, n_pos: int) -> int:
    """Every layer's attention pattern L·H·T² (fp32)."""
    return 4 * m.n_layers * m.n_heads * n_pos * n_pos


def keeps_patterns(m: ModelShape, n_pos: int) -> bool:
    """Whether attribution's linearised graphs keep the patterns (faster: no recomputation in each backward pass)
    rather than q and k: while they are at most `KEEP_PATTERNS_BYTES`."""
    return pattern_bytes(m, n_pos) <= KEEP_PATTERNS_BYTES


def trace_bytes(m: ModelShape, n_pos: int) -> tuple[int, int]:
    """(kept, peak while tracing) bytes of the linearised forward of `n_pos` tokens (`keeps_patterns` decides
    whether it holds the patterns)."""
    T, s, L = n_pos, m.dtype_bytes, m.n_layers
    kept = T * m.vocab_size * s + L * T * (C_RES * m.d_model + C_MLP * m.d_mlp + m.qkv_width) * s + 4 * T * T
    kept += pattern_bytes(m, T) if keeps_patterns(m, T) else 0
    return kept, kept + attention_block_bytes(m, T) + 2 * T * m.features_per_layer * s


def chunk_row_bytes(m: ModelShape, n_pos: int) -> int:
    """Working set of one row in a backward batch: its gradients at every site and their temporaries."""
    return int(4 * (m.n_layers + 3) * n_pos * m.d_model * C_CHUNK)


def chunk_rows(m: ModelShape, n_pos: int, batch_size: int, chunk_budget: int = CHUNK_BUDGET) -> int:
    """Rows per backward batch: `batch_size`, fewer when their working set would exceed `chunk_budget`."""
    return max(1, min(batch_size, chunk_budget // chunk_row_bytes(m, n_pos)))


def chunk_budget(budget: MemoryBudget | None, cap: int = CHUNK_BUDGET, result_bytes: int | None = None) -> int:
    """Bytes one backward batch may hold: `cap`, at most an eighth of the request's budget and, given the size of the
    result (the row buffer), at most a quarter of it but not under `CHUNK_FLOOR` (smaller batches cost no time while
    they still fill a GEMM; they keep the working set in proportion to the graph)."""
    if result_bytes is not None:
        cap = min(cap, max(CHUNK_FLOOR, result_bytes // 4))
    return cap if budget is None else min(cap, budget.max_bytes // 8)


def row_buffer_bytes(n_feature_rows: int, n_logits: int, n_active: int, n_layers: int, n_pos: int) -> int:
    """The row buffer: (feature rows + K) × (n_active + (L+1)·T + K) fp32."""
    return 4 * (n_feature_rows + n_logits) * (n_active + (n_layers + 1) * n_pos + n_logits)


def estimate(m: ModelShape, r: RequestShape) -> MemoryEstimate:
    """The memory model: peak bytes of each part of the request `r` on model `m`."""
    L, T, D = m.n_layers, r.n_pos, m.d_model
    kept, forward = trace_bytes(m, T)
    kept += 48 * r.n_active  # the active features: 3 long ids, 2 values
    M = r.max_sources or (r.n_active // max(T, 1) + L)
    sources = T * M * (D * 4 + 8)
    R, K = r.feature_rows + r.n_logits, r.n_logits
    C = r.n_active + (L + 1) * T
    capped = r.feature_rows < r.n_active
    N = (r.feature_rows if capped else r.n_active) + (L + 1) * T + K
    row_buffer = row_buffer_bytes(r.feature_rows, K, r.n_active, L, T)
    influence = row_buffer if capped else 0
    if capped and r.influence_step:  # updates at 0, step, 2·step, ... rows done: the last one below feature_rows
        influence = min(row_buffer, (K + (r.feature_rows - 1) // r.influence_step * r.influence_step) * (C + K) * 4)
    influence = min(influence, 4 * INFLUENCE_BLOCK) + 4 * R  # partial_influence holds one block of |rows|
    chunk = r.chunk_rows * (chunk_row_bytes(m, T) + (C + 1) * 4) + attention_block_bytes(m, T)
    graph = R * N * 4
    msgpack_max = R * N * 4 + R * N // 8 + 28 * r.n_active + 64 * T  # + active features, prompt
    return MemoryEstimate(
        trace=kept, trace_forward=forward, sources=sources, row_buffer=row_buffer,
        influence=influence, chunk=chunk, graph=graph, reorder=2 * graph if capped else 0,
        packing=graph + R * N + R * N // 8 + 2 * msgpack_max, msgpack_max=msgpack_max,
        ingress_decode=R * N * (4 + 1 + 4 + 4) + 2 * msgpack_max,
    )


@dataclass(frozen=True)
class Admission:
    """What `plan` decided: the feature rows to compute, the backward batch, the estimate, and why it trimmed."""

    feature_rows: int
    chunk_rows: int
    estimate: MemoryEstimate
    trimmed_from: int | None = None  # the feature rows asked for, when fewer are computed

    def note(self, budget: MemoryBudget) -> dict | None:
        """What the graph's settings record about a trim (None when nothing was trimmed)."""
        if self.trimmed_from is None:
            return None
        return {"requested_feature_rows": self.trimmed_from, "feature_rows": self.feature_rows,
                "memory_budget_bytes": budget.max_bytes, "estimated_peak_bytes": self.estimate.engine_peak,
                "reason": f"{self.trimmed_from} feature rows need an estimated {fmt(self.full_peak)} but the memory budget "
                          f"is {fmt(budget.max_bytes)}; computed the {self.feature_rows} most influential"}

    full_peak: int = 0  # the untrimmed request's estimated peak


def fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def least_bytes(m: ModelShape, n_pos: int) -> int:
    """What any request on a prompt of `n_pos` tokens needs at least: no active feature, one logit row, one row
    per backward pass."""
    return estimate(m, RequestShape(n_pos, 0, 0, 1, 1)).engine_peak


def check_prompt(m: ModelShape, n_pos: int, budget: MemoryBudget | None) -> None:
    """Before the trace: refuse a prompt that cannot fit the budget whatever its features (`least_bytes`), naming
    the longest prompt that could."""
    if budget is None:
        return
    needed = least_bytes(m, n_pos)
    if needed > budget.max_bytes:
        fits = _largest(lambda t: least_bytes(m, t) <= budget.max_bytes, n_pos)
        raise MemoryBudgetExceeded(f"a prompt of {n_pos} tokens needs at least an estimated {fmt(needed)} (its trace), "
                                   f"over the memory budget of {fmt(budget.max_bytes)}", needed, budget.max_bytes,
                                   f"use a prompt of at most {fits} tokens")


def plan(m: ModelShape, shape: RequestShape, budget: MemoryBudget | None) -> Admission:
    """Admit `shape` as asked, or with fewer feature rows, within `budget`; MemoryBudgetExceeded when neither fits."""
    full = estimate(m, shape)
    if budget is None or full.engine_peak <= budget.max_bytes:
        return Admission(shape.feature_rows, shape.chunk_rows, full)
    fits = lambda rows: estimate(m, _with_rows(shape, rows)).engine_peak <= budget.max_bytes  # noqa: E731
    rows = _largest(fits, shape.feature_rows) if fits(0) else -1
    floor = min(budget.min_feature_rows, shape.feature_rows)
    if budget.on_exceed == "refuse" or rows < max(floor, 1):
        msg = (f"{shape.feature_rows} feature rows on a {shape.n_pos}-token prompt ({shape.n_active} active features) "
               f"need an estimated {fmt(full.engine_peak)}, over the memory budget of {fmt(budget.max_bytes)}")
        advice = (f"set max_feature_nodes to at most {rows}" if rows >= 1 else
                  f"use a prompt of at most {_largest(lambda t: fits_prompt(m, shape, t, budget), shape.n_pos)} tokens")
        raise MemoryBudgetExceeded(msg, full.engine_peak, budget.max_bytes, advice)
    trimmed = _with_rows(shape, rows)
    return Admission(rows, shape.chunk_rows, estimate(m, trimmed), trimmed_from=shape.feature_rows, full_peak=full.engine_peak)


def fits_prompt(m: ModelShape, shape: RequestShape, n_pos: int, budget: MemoryBudget) -> bool:
    """Whether a prompt of `n_pos` tokens (active features scaled with it) fits with `min_feature_rows` rows."""
    scale = n_pos / shape.n_pos
    rows = min(budget.min_feature_rows, shape.feature_rows)
    small = replace(shape, n_pos=n_pos, n_active=math.ceil(shape.n_active * scale), feature_rows=max(rows, 1), max_sources=0)
    return estimate(m, small).engine_peak <= budget.max_bytes


def _with_rows(shape: RequestShape, rows: int) -> RequestShape:
    return replace(shape, feature_rows=rows)


def _largest(ok, hi: int) -> int:
    """The largest n in [0, hi] with ok(n), for ok monotone decreasing in n (0 when none above 0 is)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def release_memory() -> None:
    """Return freed memory to the operating system: collect garbage, then (glibc) trim the malloc heap, which
    otherwise keeps the pages of freed tensors smaller than its mmap threshold."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def available_bytes() -> int:
    """Memory available to new allocations on this machine now (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


class PeakRss:
    """Peak resident memory of this process (or `pid`) above its level at entry, in bytes (Linux: VmHWM, reset at
    entry through /proc/PID/clear_refs). `peak` is None where the kernel offers neither."""

    def __init__(self, pid: int | str = "self"):
        self.pid, self.start, self.peak = pid, 0, None

    def _read(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    def __enter__(self) -> PeakRss:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start = self._read("VmRSS:")
        except OSError:
            self.start = -1
        return self

    def __exit__(self, *exc) -> None:
        if self.start >= 0:
            self.peak = self._read("VmHWM:") - self.start

    def rss(self) -> int:
        """The resident memory now, in bytes."""
        return self._read("VmRSS:")
