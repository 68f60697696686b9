"""Pruning and graph scores of attribution graphs (docs/method.md §5–§8), on a row block.

Matches circuit-tracer 0.5.0 (graph.py: ``normalize_matrix``, ``compute_influence``, ``find_threshold``,
``prune_graph``, ``compute_graph_scores``, ``compute_partial_influences``) without ever building the N×N
adjacency or sorting N² scores.

Node order (N nodes): [features n_f | errors L·T | tokens T | logits K]. Only feature and logit nodes have
incoming edges, so the adjacency A[target, source] is stored as its non-zero rows:

    rows      [R, N] float   the stored rows of A
    row_nodes [R]    long    the node of each stored row (distinct; usually the n_f features, then the K logits)

Dense A would be ``zeros(N, N)`` with ``A[row_nodes] = rows``. Scores are non-negative throughout.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor

from attribute_ray.memory import INFLUENCE_BLOCK
from attribute_ray.settings import PruneSettings

PRUNE = PruneSettings()  # the default thresholds
NORM_EPS = 1e-10  # graph.normalize_matrix: |M| / rowsum(|M|).clamp(min=1e-10)
PARTIAL_NORM_EPS = 1e-8  # compute_partial_influences clamps with 1e-8, not 1e-10


def _normalize_(m: Tensor, eps: float = NORM_EPS) -> Tensor:
    """In place: m [R, N] (already non-negative) divided by max(rowsum, eps)."""
    return m.div_(m.sum(dim=1, keepdim=True).clamp(min=eps))


def normalize(rows: Tensor, eps: float = NORM_EPS) -> Tensor:
    """|M| / max(rowsum|M|, eps) per row. rows [R, N] -> [R, N]."""
    return _normalize_(rows.abs(), eps)


def logit_vector(logit_weights: Tensor, n_nodes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """w [N]: the logit weights [K] on the last K nodes, 0 elsewhere."""
    w = torch.zeros(n_nodes, dtype=dtype, device=logit_weights.device)
    w[n_nodes - logit_weights.numel() :] = logit_weights
    return w


def influence(rows_norm: Tensor, row_nodes: Tensor, w: Tensor, max_iter: int = 1000) -> Tensor:
    """Σ_{k≥1} w·Âᵏ for the row block Â = (rows_norm [R, N], row_nodes [R]) and w [N] -> [N].

    Stops at the first term that is exactly zero (the graph is a DAG). As in circuit-tracer's counting,
    at most max_iter terms may be non-zero: if term max_iter + 1 is not zero, RuntimeError."""
    x = w[row_nodes] @ rows_norm
    total = x.clone()
    for _ in range(max_iter):
        if not x.any():
            return total
        x = x[row_nodes] @ rows_norm
        total += x
    if x.any():
        raise RuntimeError(f"influence still non-zero after {max_iter} terms: the graph is not a DAG")
    return total


def partial_influence(rows: Tensor, row_nodes: Tensor, logit_weights: Tensor, max_iter: int = 128) -> Tensor:
    """Influence used to rank features during attribution (docs/method.md §6; compute_partial_influences).

    rows [R', N]: the rows computed so far, in any order, row_nodes [R'] their nodes; logit_weights [K]
    sit on the last K of the N columns. Normalisation clamps with 1e-8. Returns Σ_{k≥1} w·Âᵏ [N]; raises
    RuntimeError if max_iter products are all non-zero (so at most max_iter − 1 non-zero terms).

    Â is never materialised: each product x·Â = Σ_r (x_r / rowsum_r)·|rows_r| runs over blocks of at most
    INFLUENCE_BLOCK elements, so the extra memory is one block, not a copy of `rows`."""
    R, N = rows.shape
    step = max(1, INFLUENCE_BLOCK // max(N, 1))
    blocks = [slice(i, i + step) for i in range(0, R, step)]
    single = [rows.abs()] if len(blocks) == 1 else None  # one block: |rows| once, not once per product
    absolute = (lambda k: single[0]) if single else (lambda k: rows[blocks[k]].abs())  # noqa: E731
    inv_sum = torch.cat([absolute(k).sum(1) for k in range(len(blocks))]) if R else rows.new_zeros(0)
    inv_sum = inv_sum.clamp(min=PARTIAL_NORM_EPS).reciprocal()
    x = logit_vector(logit_weights, N, rows.dtype)
    total = torch.zeros_like(x)
    for _ in range(max_iter):
        coef = x[row_nodes] * inv_sum  # [R']
        x = torch.zeros_like(total)
        for k, b in enumerate(blocks):
            x.addmv_(absolute(k).T, coef[b])
        if not x.any():
            return total
        total += x
    raise RuntimeError(f"partial influence did not vanish within {max_iter} iterations")


_EXPONENT_BITS = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52)}


def find_threshold(scores: Tensor, tau: float, n_zeros: int = 0, rel_tol: float = 1e-4) -> Tensor:
    """circuit-tracer's threshold of `scores` (any shape, ≥ 0) plus `n_zeros` implicit zeros, without a full sort.

    Reference: s = sort(x, descending); c = cumsum(s) / sum(s); return s[min(searchsorted(c, tau), n − 1)].
    Only the top scores {x ≥ 2^b} are sorted: b is the highest binary octave whose cumulative mass (a
    histogram of the float exponents) reaches tau·total·(1 + rel_tol); should the sorted set fall short, it is
    widened until the crossing of tau lies inside it even if the total were rel_tol larger. A sorted top set is a
    prefix of the full sort, and its cumsum the prefix of the full cumsum (a sequential scan on CPU), so the
    index rule sees the same numbers. The one difference is the total: upstream sums the *sorted* vector in
    float32; here it is the float32 sum in storage order, unless the top set is the whole vector (tau ≈ 1),
    which is summed exactly like upstream (bit-identical when n_zeros == 0). The totals differ by ~1e-7
    relative, as much as upstream's own total changes with the thread count; only the tail index can move."""
    flat = scores.flatten()
    n = flat.numel()
    if n + n_zeros == 0:
        raise ValueError("find_threshold of an empty vector")
    if n and bool(flat.min() < 0):
        raise ValueError("find_threshold expects non-negative scores")
    total = flat.sum()
    x = flat if flat.dtype in _EXPONENT_BITS else flat.float()
    int_type, shift = _EXPONENT_BITS[x.dtype]
    octave = x.view(int_type) >> shift  # biased exponent: x in [2^(b − bias), 2^(b − bias + 1)); 0 holds 0
    mass_from_top = torch.bincount(octave, weights=x).flip(0).cumsum(0)
    b = len(mass_from_top) - 1 - int(torch.searchsorted(mass_from_top, tau * float(total) * (1 + rel_tol)))
    for widen in itertools.count():
        edge = torch.tensor(max(b, 0) << shift, dtype=int_type).view(x.dtype).to(flat.device)  # 2^(b − bias)
        top = torch.sort(flat[flat >= edge], descending=True).values
        m, cum = len(top), top.cumsum(0)
        if m == n:
            total = top.sum()
            break
        if int(torch.searchsorted(cum / (total * (1 + rel_tol)), tau)) < m:
            break
        lower = octave[flat < edge]  # too few (rare): widen by 1, 2, 4, ... octaves, skipping empty ones
        b = min(int(lower.max()), b - (1 << widen)) if len(lower) else -1
    idx = int(torch.searchsorted(cum / total, tau))
    if idx < m:
        return top[idx]
    # tau never reached (or total == 0): upstream clamps to the last, smallest element.
    return top[-1] if n_zeros == 0 else flat.new_zeros(())


class PruneResult(NamedTuple):
    node_mask: Tensor  # [N] bool
    edge_mask: Tensor  # [R, N] bool: rows of row_nodes (upstream's other rows are all False, see prune)
    cumulative_scores: Tensor  # [N] cumulative fraction of node influence at each node's rank


def prune(
    rows: Tensor,
    row_nodes: Tensor,
    logit_weights: Tensor,
    n_features: int,
    n_errors: int,
    n_tokens: int,
    node_threshold: float = PRUNE.node_threshold,
    edge_threshold: float = PRUNE.edge_threshold,
) -> PruneResult:
    """prune_graph (docs/method.md §7) on the row block rows [R, N], row_nodes [R]; logit_weights [K].

    Never allocates N×N: the largest tensors are [R, N]. Upstream's rows of unstored nodes have zero
    scores, so they are False in its edge mask unless the edge threshold is 0 (tau ≈ 1 with zero scores),
    in which case upstream marks every entry, stored or not, as a kept edge."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0")
    n_rows, n = rows.shape
    n_droppable = n_features + n_errors  # tokens and logits are always kept
    if n != n_droppable + n_tokens + logit_weights.numel():
        raise ValueError(f"rows have {n} columns, expected n_features + n_errors + n_tokens + K")
    w = logit_vector(logit_weights, n, rows.dtype)

    # 1. node influence and the node threshold: N scores, fully sorted exactly as upstream (also step 4)
    node_infl = influence(normalize(rows), row_nodes, w)
    sorted_infl, order = torch.sort(node_infl, descending=True)
    node_cum = torch.cumsum(sorted_infl, dim=0) / torch.sum(sorted_infl)
    node_mask = node_infl >= sorted_infl[min(int(torch.searchsorted(node_cum, node_threshold)), n - 1)]
    node_mask[n_droppable:] = True

    # 2. edge scores on the graph restricted to kept nodes: P ⊙ (influence(P, w) + w)[target]
    p = rows.abs().masked_fill_(~node_mask, 0).masked_fill_(~node_mask[row_nodes, None], 0)
    p = _normalize_(p)
    scores = p.mul_((influence(p, row_nodes, w) + w)[row_nodes, None])
    threshold = find_threshold(scores, edge_threshold, n_zeros=(n - n_rows) * n)
    edge_mask = scores >= threshold
    del p, scores

    # 3. drop feature/error nodes without kept outgoing edges and features without kept incoming edges,
    #    until stable. Unstored rows are all zero: they hold kept "edges" only when threshold <= 0, and
    #    then every stored entry is kept too, so columns need no correction; unstored feature rows do.
    zero_kept = bool(threshold <= 0)

    def drop_unconnected() -> None:
        incoming = torch.full((n,), zero_kept, dtype=torch.bool, device=rows.device)
        incoming[row_nodes] = edge_mask.any(1)
        node_mask[:n_droppable] &= edge_mask.any(0)[:n_droppable]
        node_mask[:n_features] &= incoming[:n_features]

    previous = node_mask.clone()
    drop_unconnected()
    while not torch.equal(node_mask, previous):
        previous.copy_(node_mask)
        edge_mask.masked_fill_(~node_mask[row_nodes, None], False)
        edge_mask.masked_fill_(~node_mask, False)
        drop_unconnected()

    # 4. cumulative share of node influence at each node's rank
    cumulative = torch.zeros_like(node_infl)
    cumulative[order] = node_cum
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(
    rows: Tensor, row_nodes: Tensor, logit_weights: Tensor, n_features: int, n_errors: int, n_tokens: int
) -> tuple[float, float]:
    """(replacement, completeness) of compute_graph_scores (docs/method.md §8) on rows [R, N], row_nodes [R].

    replacement = Σ_tokens infl / (Σ_tokens infl + Σ_errors infl);
    completeness = Σ_i (1 − Σ_{j∈errors} Â[i,j])·(infl_i + w_i) / Σ_i (infl_i + w_i)."""
    n = rows.shape[1]
    err0, err1, tok1 = n_features, n_features + n_errors, n_features + n_errors + n_tokens
    w = logit_vector(logit_weights, n, rows.dtype)
    a = normalize(rows)
    infl = influence(a, row_nodes, w)
    token_infl, error_infl = infl[err1:tok1].sum(), infl[err0:err1].sum()
    replacement = token_infl / (token_infl + error_infl)
    non_error = torch.ones_like(infl)  # unstored rows are zero: 1 − 0
    non_error[row_nodes] = 1 - a[:, err0:err1].sum(dim=-1)
    out_infl = infl + w
    completeness = (non_error * out_infl).sum() / out_infl.sum()
    return replacement.item(), completeness.item()
