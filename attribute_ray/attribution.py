"""Exact attribution graphs (docs/method.md §3–6): direct effects between features, errors, tokens and logits.

One recorded, linearised forward serves every row. A batch of B target vectors (encoder rows at feature
input sites, demeaned unembeddings at the final-norm output) is pulled back through that single graph
with a vmapped backward (``is_grads_batched``) — no replicated forward. The gradient arriving at each
layer's transcoder output site is contracted with every source vector written there, grouped by
position: one [T, B, D] × [T, D, M] batched GEMM per layer, where M is the number of sources (features
writing to that layer + the error node) at the busiest position.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attribute_ray.graph import Graph, LogitTarget
from attribute_ray.memory import (
    CHUNK_BUDGET,
    MemoryBudget,
    ModelShape,
    RequestShape,
    check_prompt,
    chunk_budget,
    chunk_rows,
    keeps_patterns,
    plan,
    row_buffer_bytes,
)
from attribute_ray.pruning import partial_influence
from attribute_ray.replacement import AttentionSites, LinearGraph, Prefix, ReplacementModel, Trace
from attribute_ray.settings import AttributionSettings

ProgressFn = Callable[[str, int, int], None]
"""on_progress(phase, done, total): phases "trace", "logits", "features"."""

MEMORY_BUDGET_MB = CHUNK_BUDGET // 2**20
"""Default cap on the per-chunk gradient buffers (MiB). It changes speed and memory, never the graph, so it is
not an `AttributionSettings` field: whoever owns the machine sets it, never a graph request."""


@dataclass
class CustomTarget:
    """A custom logit node: any direction [D] read at the final-norm output, last position."""

    label: str
    weight: float
    vector: Tensor


TargetSpec = Sequence[int] | Sequence[str] | Sequence[CustomTarget] | Tensor | None


@dataclass
class Targets:
    nodes: list[LogitTarget]
    weights: Tensor  # [K]
    vectors: Tensor  # [K, D]


def select_targets(model: ReplacementModel, trace: Trace, spec: TargetSpec, max_n_logits: int, desired_logit_prob: float) -> Targets:
    """Logit targets at the last position (docs/method.md §4): salient logits, token ids, strings or custom."""
    logits = trace.logits[-1].float()
    probs = logits.softmax(-1)
    vocab = logits.numel()
    decode = model.tokenizer.decode
    if spec is None:
        top_p, top_idx = probs.topk(min(max_n_logits, vocab))
        cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
        ids = top_idx[:cutoff]
    elif len(spec) and isinstance(spec[0], CustomTarget):
        nodes = [LogitTarget(t.label, vocab + i) for i, t in enumerate(spec)]
        vecs = torch.stack([t.vector.to(model.device, model.transcoder.dtype) for t in spec])
        if vecs.shape[-1] != model.d_model:
            raise ValueError(f"custom target vectors must have d_model={model.d_model} entries, got {vecs.shape[-1]}")
        return Targets(nodes, torch.tensor([float(t.weight) for t in spec]), vecs)
    elif len(spec) and isinstance(spec[0], str):
        ids = []
        for s in spec:
            enc = model.tokenizer.encode(s, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"target string {s!r} is {len(enc)} tokens {enc}; each target must be exactly one token")
            ids.append(enc[0])
        ids = torch.tensor(ids, dtype=torch.long)
    else:
        ids = torch.as_tensor(spec, dtype=torch.long).flatten()
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise ValueError(f"target token ids {bad.tolist()} are outside the vocabulary [0, {vocab})")
    if ids.numel() == 0:
        raise ValueError("no attribution targets")
    ids = ids.to(probs.device)
    return Targets([LogitTarget(decode([int(i)]), int(i)) for i in ids], probs[ids].cpu(), model.logit_vectors(ids))


PREFIX_STEPS = 16
"""Causal truncation: a target at position p is pulled back through the linearised graph of the first n ≥ p + 1
tokens, n rounded up to a multiple of ⌈T / PREFIX_STEPS⌉ (so at most PREFIX_STEPS prefixes per queue)."""
RETRACE_ROWS = 32
"""A forward of n tokens costs about as much as pulling this many rows back through n tokens."""


class _RowComputer:
    """Computes attribution rows [B, n_active + (L+1)·T] for batches of targets on one trace.

    Causality: positions after a target's own cannot affect it, so its backward runs on the linearised graph of a
    prefix (`prefix_length`): traced on demand, at most one held at a time. The sources (decoder vectors, errors)
    always come from the full trace; the prefix graph only carries the gradients."""

    def __init__(self, model: ReplacementModel, trace: Trace, chunk_of: Callable[[int], int]):
        self.model, self.device = model, model.device
        dev = self.device
        L, T, D = model.n_layers, len(trace.tokens), model.d_model
        n = len(trace.features)
        self.L, self.T, self.D, self.n_active = L, T, D, n
        self.n_cols = n + (L + 1) * T
        self.trace = trace  # prefix graphs replay it
        self.step = -(-T // PREFIX_STEPS)
        self.held: tuple[int, LinearGraph | None] = (T, trace.graph)  # (prefix length, its graph)
        trace.graph = None  # held here only, so that it can be freed for a shorter prefix
        self.blocks: list[tuple[Tensor, Tensor]] = []  # per layer: sources [T, M, D], columns [T, M]
        for l in range(L):
            rows, vecs = model.decoder_vectors(trace.features, l)
            pos = torch.cat([trace.features.positions[rows], torch.arange(T, device=dev)])
            cols = torch.cat([rows.to(dev), n + l * T + torch.arange(T, device=dev)])
            self.blocks.append(self._pack(pos, cols, torch.cat([vecs, trace.errors[l]])))
        self.tokens = model.token_vectors(trace.tokens).float()  # [T, D]
        self.chunk_of = chunk_of  # prefix length -> rows per backward pass (the memory model's `chunk_rows`)

    def prefix_length(self, positions: Tensor) -> Tensor:
        """[B] the prefix each target's backward runs on: its position + 1, rounded up to a step."""
        return ((positions.cpu() // self.step + 1) * self.step).clamp(max=self.T)

    def assign(self, positions: Tensor) -> Tensor:
        """[R] the prefix length each of R targets at `positions` [R] is pulled back through: its own
        (`prefix_length`), or a longer one already needed when its rows are too few to pay for another forward."""
        need = self.prefix_length(positions)
        out = need.clone()
        lengths, counts = need.unique(return_counts=True)
        current = self.held[0]
        for n, r in zip(lengths.flip(0).tolist(), counts.flip(0).tolist()):  # longest first
            if n > current or r * (current - n) >= RETRACE_ROWS * n:
                current = n
            out[need == n] = current
        return out

    def _graph(self, n: int) -> LinearGraph:
        if self.held[0] != n:
            self.held = (n, None)  # the old graph goes before the new one is traced
            self.held = (n, linear_graph(self.model, self.trace, n))
        return self.held[1]

    def _pack(self, pos: Tensor, cols: Tensor, vecs: Tensor) -> tuple[Tensor, Tensor]:
        """Group source vectors by position into a zero-padded [T, M, D] block (padding → dump column)."""
        order = torch.argsort(pos, stable=True)
        pos, cols, vecs = pos[order], cols[order], vecs[order]
        counts = torch.bincount(pos, minlength=self.T)
        M = int(counts.max())
        slot = torch.arange(len(pos), device=pos.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        block = torch.zeros(self.T, M, self.D, dtype=torch.float32, device=pos.device)
        colmap = torch.full((self.T, M), self.n_cols, dtype=torch.long, device=pos.device)  # n_cols = dump column
        block[pos, slot] = vecs.float()
        colmap[pos, slot] = cols
        return block, colmap

    def __call__(self, n: int, sites: Tensor, positions: Tensor, vectors: Tensor, edges: Tensor, rows: Tensor) -> None:
        """Write into `edges[rows, :n_cols]` (CPU) the rows for targets read at `sites` [B] (layer l = input site
        of l, L = final-norm output), `positions` [B] (all < n), `vectors` [B, D], pulled back through the graph of
        the first `n` tokens."""
        graph = self._graph(n)
        sites, positions, vectors = sites.to(self.device), positions.to(self.device), vectors.to(self.device)
        chunk = self.chunk_of(n)
        for i in range(0, len(sites), chunk):
            j = i + chunk
            edges[rows[i:j], : self.n_cols] = self._chunk(graph, n, sites[i:j], positions[i:j], vectors[i:j])

    def _chunk(self, g: LinearGraph, n: int, sites: Tensor, positions: Tensor, vectors: Tensor) -> Tensor:
        B, L, T = len(sites), self.L, self.T
        outputs, grad_outputs = [], []
        for site in sites.unique().tolist():
            (rows,) = torch.nonzero(sites == site, as_tuple=True)
            inj = _at_positions(vectors[rows].to(g.final.dtype), positions[rows], n)
            if site == L:
                outputs.append(g.final)
                grad_outputs.append(_scatter_rows(inj, rows, B))
            else:
                sites_l, grads = _below_attention(g.attention[site], g.inputs[site], inj, positions[rows])
                outputs += sites_l
                grad_outputs += [_scatter_rows(gr, rows, B) for gr in grads]
        top = int(sites.max())  # sources at output sites >= the highest target site cannot reach it
        inputs = [*g.outputs[:top], g.embed]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True)
        buf = torch.zeros(B, self.n_cols + 1, device=self.device)
        for l, grad in enumerate(grads[:-1]):
            if grad is None:
                continue
            block, colmap = self.blocks[l]
            scores = torch.bmm(grad[:, 0].float().transpose(0, 1), block[:n].transpose(1, 2))  # [n, B, M]
            buf.index_add_(1, colmap[:n].flatten(), scores.transpose(0, 1).reshape(B, -1))
        if grads[-1] is not None:
            tok = (grads[-1][:, 0].float() * self.tokens[:n]).sum(-1)  # [B, n]
            first = self.n_active + L * T
            buf[:, first : first + n] += tok
        return buf[:, : self.n_cols].cpu()


def _below_attention(at: AttentionSites, site: Tensor, inj: Tensor, positions: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """A batch of feature targets' first step, by hand: from `inj` [b, 1, n, D] at their layer's input `site` (each
    row non-zero at its own position, `positions` [b]) to the tensors just below that layer's attention.

    Autograd would apply the attention's output and value projections at all n positions. But the gradient reaching
    the attention's output is non-zero at the target's position p alone, so the output projection's transpose runs
    there only; and the values' gradient at position k is P_h[p, k]·g_h per head h, so W_Vᵀ acts once per head on
    g_h, and the pattern row spreads the results over the positions. Returns (tensors, gradients): the attention's
    input [b, 1, n, D] (without a kept pattern: the output projection's input [b, 1, n, H·dh]) and the direct
    residual path to the layer's input [b, 1, n, D] (resid_mid = resid_pre + attention branch)."""
    g_mid, g_out = torch.autograd.grad(site, [at.resid_mid, at.proj_out], inj, retain_graph=True, is_grads_batched=True)
    b, n = len(positions), inj.shape[2]
    with torch.enable_grad():
        z = at.proj_in[0, positions].detach().requires_grad_()  # [b, H·dh]: the projection is linear in it
        (g_z,) = torch.autograd.grad(at.proj(z), z, g_out[torch.arange(b), 0, positions])
    if at.pattern is None:  # the rest through autograd, from the output projection's input
        return [at.proj_in, at.resid_pre], [_at_positions(g_z, positions, n), g_mid]
    H, D = at.pattern.shape[1], g_mid.shape[-1]
    dh = g_z.shape[-1] // H
    w_v = at.value_weight.reshape(-1, dh, D)  # [KV, dh, D]; query head h = k·(H / KV) + j reads key-value head k
    KV = len(w_v)
    u = torch.einsum("bkjd,kdD->bkjD", g_z.view(b, KV, H // KV, dh), w_v.to(g_z.dtype)).reshape(b, H, D)
    p_rows = at.pattern[0][:, positions, :n].to(u.dtype)  # [H, b, n]: each target's pattern row
    grad_in = torch.einsum("hbk,bhD->bkD", p_rows, u)[:, None]
    return [at.attn_in, at.resid_pre], [grad_in, g_mid]


def _at_positions(vectors: Tensor, positions: Tensor, n: int) -> Tensor:
    """[b, 1, n, X]: row i holds `vectors[i]` [X] at `positions[i]` and zeros elsewhere (a batched gradient)."""
    out = vectors.new_zeros(len(vectors), 1, n, vectors.shape[-1])
    out[torch.arange(len(vectors)), 0, positions] = vectors
    return out


def _scatter_rows(grad: Tensor, rows: Tensor, batch: int) -> Tensor:
    """`grad` [b, ...] of `rows` [b] of a batch of `batch` rows, as [batch, ...] (zero elsewhere)."""
    if len(rows) == batch:
        return grad
    out = grad.new_zeros(batch, *grad.shape[1:])
    out[rows] = grad
    return out


def linear_graph(model: ReplacementModel, trace: Trace, n: int) -> LinearGraph:
    """The linearised autograd graph of the first `n` tokens of `trace` alone: `trace(linearise=True)` without the
    unembedding, the transcoder encodings and the recorded tensors. The trace's patterns (when it kept them), norm
    scales and MLP outputs are replayed (`Prefix`) rather than recomputed."""
    strategy = Prefix(trace=trace, keep_patterns=keeps_patterns(ModelShape.of(model), n))
    with torch.enable_grad(), model.hooks(strategy) as run:
        model.model.base_model(input_ids=trace.tokens[None, :n].to(model.device))
    return LinearGraph.of(run, model.n_layers)


def batches(prefix: Tensor, layers: Tensor, batch_size: int) -> list[Tensor]:
    """Index batches of at most `batch_size` over R rows sorted by (prefix, layer), both [R]: a batch never spans
    two prefixes, and goes on past a layer only while it holds fewer than a quarter of `batch_size` rows (a backward
    pass has a fixed cost too: many tiny batches would cost more than the layers they save)."""
    prefix, layers = prefix.tolist(), layers.tolist()
    out, start, R = [], 0, len(prefix)
    for i in range(1, R + 1):
        new_prefix = i == R or prefix[i] != prefix[i - 1]
        new_layer = new_prefix or layers[i] != layers[i - 1]
        if i - start == batch_size or new_prefix or (new_layer and 4 * (i - start) >= batch_size):
            out.append(torch.arange(start, i))
            start = i
    return out


def special_positions(tokenizer, tokens: Tensor) -> list[int]:
    """Positions of `tokens` [T] holding the tokenizer's special tokens (BOS, EOS, chat markers such as
    ``<|im_start|>``). The unknown token is not one: it stands for prompt text the vocabulary lacks."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    special.discard(tokenizer.unk_token_id)
    return [p for p, t in enumerate(tokens.tolist()) if t in special]


def max_sources(model: ReplacementModel, trace: Trace) -> int:
    """Σ_l M_l: per layer, the most source vectors (features writing there + the error node) at one position."""
    feats, T = trace.features, len(trace.tokens)
    per_layer = torch.stack([torch.bincount(feats.positions[feats.layers == l], minlength=T)
                             for l in range(model.n_layers)]) if len(feats) else torch.zeros(model.n_layers, T)
    return sum(int(per_layer[model.transcoder.sources(t)].sum(0).max()) + 1 for t in range(model.n_layers))


def request_shape(model: ReplacementModel, trace: Trace, feature_rows: int, n_logits: int, cfg: AttributionSettings,
                  memory: MemoryBudget | None, memory_budget_mb: int = MEMORY_BUDGET_MB) -> tuple[RequestShape, int]:
    """(the request's shape for the memory model, the bytes one backward batch may hold) as `attribute` plans it."""
    L, T, n_active = model.n_layers, len(trace.tokens), len(trace.features)
    budget = chunk_budget(memory, memory_budget_mb * 2**20, row_buffer_bytes(feature_rows, n_logits, n_active, L, T))
    chunk = chunk_rows(ModelShape.of(model), T, cfg.batch_size, budget)
    step = cfg.update_interval * cfg.batch_size
    return RequestShape(T, n_active, feature_rows, n_logits, chunk, max_sources(model, trace), step), budget


def attribute(
    prompt: str | Sequence[int] | Tensor,
    model: ReplacementModel,
    *,
    targets: TargetSpec = None,
    settings: AttributionSettings | None = None,
    memory: MemoryBudget | None = None,
    memory_budget_mb: int = MEMORY_BUDGET_MB,
    progress: bool = False,
    on_progress: ProgressFn | None = None,
    **overrides,
) -> Graph:
    """Attribution graph of `prompt` (text or token ids) on `model`.

    `overrides` set fields of `AttributionSettings` over `settings` (its defaults when None; any subclass,
    e.g. `GraphSettings`, contributes its attribution fields). `targets`: None (salient logits), token ids,
    single-token strings, or `CustomTarget`s. `memory` (docs/memory.md): the bytes the request may use; before
    the trace a prompt too long for it is refused, after it the feature rows are trimmed to fit (the graph's
    `settings["trimmed"]` says so) or refused, as `memory.on_exceed` says (`MemoryBudgetExceeded`).
    `memory_budget_mb` caps the gradient buffers of one backward pass.
    """
    given = settings.model_dump(include=set(AttributionSettings.model_fields)) if settings is not None else {}
    cfg = AttributionSettings(**{**given, **overrides})
    if memory_budget_mb < 1:
        raise ValueError(f"memory_budget_mb must be >= 1, got {memory_budget_mb}")
    t0 = time.perf_counter()
    bar = tqdm(desc="trace", disable=not progress, unit="row")

    def report(phase: str, done: int, total: int) -> None:
        if phase != "trace":
            bar.set_description(phase)
            bar.update(done - report.done)
            report.done = done
        if on_progress:
            on_progress(phase, done, total)

    report.done = 0
    tokens = model.tokenize(prompt)
    shape = ModelShape.of(model)
    check_prompt(shape, len(tokens), memory)
    report("trace", 0, 1)
    trace = model.trace(tokens, linearise=True, keep_patterns=keeps_patterns(shape, len(tokens)))
    report("trace", 1, 1)
    tg = select_targets(model, trace, targets, cfg.max_n_logits, cfg.desired_logit_prob)
    feats = trace.features
    n_active, L, T, K = len(feats), model.n_layers, len(tokens), len(tg.nodes)
    n_feat = n_active if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_active)
    request, budget = request_shape(model, trace, n_feat, K, cfg, memory, memory_budget_mb)
    admitted = plan(shape, request, memory)
    n_feat = admitted.feature_rows
    rows_of = _RowComputer(model, trace, lambda n: chunk_rows(shape, n, cfg.batch_size, budget))
    n_cols = rows_of.n_cols  # logit columns are all zero: added at packaging
    logit_offset = n_cols
    bar.reset(total=K + n_feat)

    # Rows: uncapped, features sit at their own index and logits after them (already node order, no copy);
    # capped, logits come first and features follow in visit order, reordered at the end.
    capped = n_feat < n_active
    edges = torch.zeros(n_feat + K, n_cols + K)
    row_node = torch.zeros(n_feat + K, dtype=torch.long)
    first_logit = 0 if capped else n_feat
    for i in range(0, K, cfg.batch_size):
        rows = first_logit + torch.arange(i, min(i + cfg.batch_size, K))
        rows_of(T, torch.full((len(rows),), L), torch.full((len(rows),), T - 1), tg.vectors[rows - first_logit], edges, rows)
        row_node[rows] = logit_offset + rows - first_logit
        report("logits", i + len(rows), K + n_feat)

    f_layers, f_pos = feats.layers.cpu(), feats.positions.cpu()
    visited = torch.zeros(n_active, dtype=torch.bool)
    done = 0
    while done < n_feat:
        if not capped:
            pending = torch.arange(n_active)
        else:
            infl = partial_influence(edges[: K + done], row_node[: K + done], tg.weights)
            rank = torch.argsort(infl[:n_active], descending=True, stable=True)
            pending = rank[~visited[rank]][: min(cfg.update_interval * cfg.batch_size, n_feat - done)]
            del infl, rank
        # Longest prefix first (the graph held now is reused), then by layer: each batch's backward is as short
        # (one prefix) and as narrow (the layers below its highest target) as the queue allows.
        prefix = rows_of.assign(f_pos[pending])
        order = torch.argsort(f_layers[pending], stable=True)
        order = order[torch.argsort(prefix[order], descending=True, stable=True)]
        pending, prefix = pending[order], prefix[order]
        for batch in batches(prefix, f_layers[pending], cfg.batch_size):
            idx = pending[batch]
            rows = K + done + torch.arange(len(idx)) if capped else idx
            enc = model.encoder_vectors(feats, idx.to(model.device))
            rows_of(int(prefix[batch[0]]), f_layers[idx], f_pos[idx], enc, edges, rows)
            row_node[rows] = idx
            visited[idx] = True
            done += len(idx)
            report("features", K + done, K + n_feat)
    bar.close()
    vocab = trace.logits.shape[-1]
    del rows_of, trace  # the linearised graph: gone before the rows are reordered and packed

    selected = torch.nonzero(visited)[:, 0]
    if capped:  # node order: selected features ascending, then logits; only the selected feature columns
        cols = torch.cat([selected, torch.arange(n_active, n_cols + K)])
        edges = edges.index_select(1, cols)[torch.argsort(row_node)]
    trimmed = admitted.note(memory)
    return Graph(
        input_string=model.tokenizer.decode(tokens.tolist()),
        input_tokens=tokens.cpu(),
        active_features=feats.as_matrix().cpu(),
        activation_values=feats.values.detach().float().cpu(),
        selected_features=selected,
        logit_targets=tg.nodes,
        logit_probabilities=tg.weights.float(),
        rows=edges,
        n_layers=L,
        vocab_size=vocab,
        model_id=model.name,
        transcoder_id=model.transcoder.name,
        settings={**cfg.model_dump(), "seconds": round(time.perf_counter() - t0, 3), **({"trimmed": trimmed} if trimmed else {})},
        prompt_tokens=[model.tokenizer.decode([t]) for t in tokens.tolist()],
        special_positions=special_positions(model.tokenizer, tokens),
    )
