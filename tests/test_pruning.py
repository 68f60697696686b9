"""Pruning and graph scores (attribute_ray.pruning) against hand-computed values and a dense N×N reference
that follows docs/method.md §7–§8 / circuit-tracer 0.5.0 graph.py line by line."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from attribute_ray import pruning
from attribute_ray.pruning import (
    find_threshold,
    graph_scores,
    influence,
    logit_vector,
    normalize,
    partial_influence,
    prune,
)

# ---------------------------------------------------------------- dense reference (full N×N, full sorts)


def ref_normalize(a: Tensor) -> Tensor:
    m = a.abs()
    return m / m.sum(dim=1, keepdim=True).clamp(min=1e-10)


def ref_influence(a: Tensor, w: Tensor, max_iter: int = 1000) -> Tensor:
    x = w @ a
    total = x.clone()
    it = 0
    while x.any():
        if it >= max_iter:
            raise RuntimeError("no convergence")
        x = x @ a
        total += x
        it += 1
    return total


def ref_cumfrac(x: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sort(x, descending=True).values
    return s, torch.cumsum(s, dim=0) / torch.sum(s)


def ref_threshold(x: Tensor, tau: float) -> Tensor:
    s, c = ref_cumfrac(x)
    return s[min(int(torch.searchsorted(c, tau)), len(s) - 1)]


def ref_prune(a: Tensor, w: Tensor, n_f: int, n_e: int, node_tau: float, edge_tau: float):
    n_drop = n_f + n_e
    infl = ref_influence(ref_normalize(a), w)
    node_mask = infl >= ref_threshold(infl, node_tau)
    node_mask[n_drop:] = True
    pruned = a.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    p = ref_normalize(pruned)
    scores = p * (ref_influence(p, w) + w)[:, None]
    edge_mask = scores >= ref_threshold(scores.flatten(), edge_tau)

    def step() -> None:
        node_mask[:n_drop] &= edge_mask[:, :n_drop].any(0)
        node_mask[:n_f] &= edge_mask[:n_f].any(1)

    old = node_mask.clone()
    step()
    while not torch.equal(node_mask, old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        step()
    s, order = torch.sort(infl, descending=True)
    cum = torch.zeros_like(infl)
    cum[order] = torch.cumsum(s, 0) / torch.sum(s)
    return node_mask, edge_mask, cum


def ref_graph_scores(a: Tensor, w: Tensor, n_f: int, n_e: int, n_t: int) -> tuple[float, float]:
    an = ref_normalize(a)
    infl = ref_influence(an, w)
    tok, err = infl[n_f + n_e : n_f + n_e + n_t].sum(), infl[n_f : n_f + n_e].sum()
    non_error = 1 - an[:, n_f : n_f + n_e].sum(-1)
    out = infl + w
    return (tok / (tok + err)).item(), ((non_error * out).sum() / out.sum()).item()


def random_dag(g: torch.Generator, n_f: int, L: int, T: int, K: int, density: float, ties: bool = False):
    """Dense A [N, N] of the attribution shape: feature i reads features j > i (acyclic), errors and tokens;
    logits read features, errors and tokens; error and token rows are zero. Returns A, row_nodes, probs."""
    n = n_f + L * T + T + K
    vals = torch.randn(n, n, generator=g)
    if ties:
        vals = torch.round(vals * 2) / 2
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:n_f, :n_f] = torch.ones(n_f, n_f, dtype=torch.bool).triu(1)
    allowed[:n_f, n_f : n - K] = True
    allowed[n - K :, : n - K] = True
    a = torch.where(allowed & (torch.rand(n, n, generator=g) < density), vals, torch.zeros(()))
    row_nodes = torch.cat([torch.arange(n_f), torch.arange(n - K, n)])
    probs = torch.softmax(2 * torch.randn(K, generator=g), 0).sort(descending=True).values * 0.9
    return a, row_nodes, probs


# ---------------------------------------------------------------- a graph small enough to do by hand
# nodes: f0 f1 f2 | e0 e1 (L=1, T=2) | t0 t1 | l0 l1     (N = 9)
F0, F1, F2, E0, E1, T0, T1, L0, L1 = range(9)
HAND_W = [0.5, 0.25]  # logit probabilities, not renormalised


def hand_graph() -> tuple[Tensor, Tensor, Tensor]:
    a = torch.zeros(9, 9)
    a[L0, F0], a[L0, F1], a[L0, E1] = 2.0, 1.0, 1.0  # Â: .5 .25 .25
    a[L1, F1], a[L1, T1] = 3.0, -1.0  # Â: .75 .25
    a[F0, F2], a[F0, T0], a[F0, E0] = 1.0, 1.0, 2.0  # Â: .25 .25 .5
    a[F1, T0] = -4.0  # Â: 1
    a[F2, T1] = 1.0  # Â: 1
    row_nodes = torch.tensor([F0, F1, F2, L0, L1])
    return a[row_nodes], row_nodes, torch.tensor(HAND_W)


def test_hand_influence_threshold_and_scores() -> None:
    rows, row_nodes, probs = hand_graph()
    w = logit_vector(probs, 9)
    # term 1 = w·Â:  f0 = .5·.5; f1 = .5·.25 + .25·.75; e1 = .5·.25; t1 = .25·.25
    # term 2 = term1·Â: f2 = .25·.25; e0 = .25·.5; t0 = .25·.25 + .3125·1
    # term 3: t1 += f2·1 = .0625;  term 4 = 0 (tokens and errors have no rows)
    expected = torch.tensor([0.25, 0.3125, 0.0625, 0.125, 0.125, 0.375, 0.0625 + 0.0625, 0.0, 0.0])
    infl = influence(normalize(rows), row_nodes, w)
    assert torch.equal(infl, expected)

    # sorted .375 .3125 .25 .125 .125 .125 .0625 0 0, total 1.375:
    # cum/total = .2727 .5 .6818 .7727 .8636 ... -> tau .8 crosses at index 4 -> .125
    assert find_threshold(infl, 0.8).item() == 0.125
    assert find_threshold(infl, 0.5).item() == 0.3125  # .6875/1.375 is exactly .5: searchsorted is left-sided
    assert find_threshold(infl, 0.0).item() == 0.375
    assert find_threshold(infl, 1.0).item() == 0.0625  # cum reaches 1.0 exactly at the last positive

    # replacement = tokens / (tokens + errors) = (.375 + .125) / (.5 + .25) = 2/3
    # completeness: non-error fraction 1 except l0 (1 − .25) and f0 (1 − .5); out = infl + w, Σ out = 2.125
    # Σ frac·out = .5·.25 + .3125 + .0625 + .125 + .125 + .375 + .125 + .75·.5 + .25 = 1.875 -> 15/17
    replacement, completeness = graph_scores(rows, row_nodes, probs, 3, 2, 2)
    assert replacement == pytest.approx(2 / 3, rel=1e-6)
    assert completeness == pytest.approx(15 / 17, rel=1e-6)


def test_hand_prune() -> None:
    rows, row_nodes, probs = hand_graph()
    # node threshold .8 -> .125: only f2 (.0625) is dropped. Without f2, f0 reads e0: 2/3 and t0: 1/3.
    # pruned influence: f0 .25, f1 .3125, e0 .25·2/3, t0 .25/3 + .3125, e1 .125, t1 .0625
    # edge score = P[t, s]·(infl + w)[t]:
    #   f1←t0 .3125 | l0←f0 .25 | l1←f1 .1875 | f0←e0 1/6 |
    #   l0←f1 .125 | l0←e1 .125 | f0←t0 1/12 | l1←t1 .0625
    # total 1.3125, cum/total = .238 .429 .571 .698 .794 .889 .952 1
    res = prune(rows, row_nodes, probs, 3, 2, 2, node_threshold=0.8, edge_threshold=0.98)
    assert res.node_mask.tolist() == [True, True, False, True, True, True, True, True, True]
    kept = {(int(row_nodes[r]), int(s)) for r, s in res.edge_mask.nonzero().tolist()}
    all_edges = {(L0, F0), (L0, F1), (L0, E1), (L1, F1), (L1, T1), (F0, E0), (F0, T0), (F1, T0)}
    assert kept == all_edges  # .98 crosses at the last positive edge; f2's edges are gone

    # edge tau .5 crosses at index 2 -> .1875: keep f1←t0, l0←f0, l1←f1. Then e0, e1 have no outgoing
    # edge and f0 no incoming edge: all dropped; the second pass removes l0←f0.
    res = prune(rows, row_nodes, probs, 3, 2, 2, node_threshold=0.8, edge_threshold=0.5)
    assert res.node_mask.tolist() == [False, True, False, False, False, True, True, True, True]
    kept = {(int(row_nodes[r]), int(s)) for r, s in res.edge_mask.nonzero().tolist()}
    assert kept == {(F1, T0), (L1, F1)}

    # cumulative fraction at each node's rank: t0 .375/1.375, f1 .6875/1.375, f0 .9375/1.375,
    # the tied e0, e1, t1 take 1.0625, 1.1875, 1.3125 (/1.375) in some order, f2 and the logits 1.
    c = res.cumulative_scores * 1.375
    assert c[[T0, F1, F0, F2, L0, L1]].tolist() == pytest.approx([0.375, 0.6875, 0.9375, 1.375, 1.375, 1.375])
    assert sorted(c[[E0, E1, T1]].tolist()) == pytest.approx([1.0625, 1.1875, 1.3125])


def test_partial_influence_hand_and_clamp() -> None:
    rows, row_nodes, probs = hand_graph()
    # rows so far, in attribution order: the logits, then f1 only (f0's row not computed yet)
    order = torch.tensor([3, 4, 1])
    got = partial_influence(rows[order], row_nodes[order], probs)
    # term 1 as before; term 2 only through f1's row: t0 = .3125; nothing through f0
    assert got.tolist() == [0.25, 0.3125, 0.0, 0.0, 0.125, 0.3125, 0.0625, 0.0, 0.0]

    # normalisation clamps: 1e-10 for pruning, 1e-8 for partial influence (row sum 2e-9)
    tiny = torch.tensor([[1e-9, 1e-9, 0.0]])
    assert normalize(tiny)[0, :2].tolist() == pytest.approx([0.5, 0.5])
    got = partial_influence(tiny, torch.tensor([2]), torch.tensor([1.0]))
    assert got[:2].tolist() == pytest.approx([0.1, 0.1])


def chain(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """l ← f0 ← f1 ← … ← f_{n−1}: exactly n non-zero influence terms."""
    rows = torch.zeros(n + 1, n + 1)
    rows[0, 0] = 1.0  # logit row (node n) reads f0
    for i in range(n - 1):
        rows[i + 1, i + 1] = 1.0  # f_i reads f_{i+1}
    row_nodes = torch.cat([torch.tensor([n]), torch.arange(n)])
    return rows, row_nodes, torch.tensor([1.0])


def test_iteration_limits() -> None:
    rows, row_nodes, probs = chain(5)
    w = logit_vector(probs, 6)
    assert influence(rows, row_nodes, w, max_iter=5).tolist() == [1.0] * 5 + [0.0]  # 5 non-zero terms
    with pytest.raises(RuntimeError, match="DAG"):
        influence(rows, row_nodes, w, max_iter=4)
    assert partial_influence(*chain(127)).sum().item() == 127  # 127 products, the 128th is zero
    with pytest.raises(RuntimeError):
        partial_influence(*chain(128))
    cyc = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # f0 ↔ f1, logit reads f0
    with pytest.raises(RuntimeError):
        influence(cyc, torch.tensor([0, 1, 2]), logit_vector(torch.tensor([1.0]), 3))
    with pytest.raises(ValueError):
        prune(*hand_graph(), 3, 2, 2, node_threshold=1.5)


# ---------------------------------------------------------------- threshold without a full sort


@pytest.mark.parametrize("mass_bias", [1.0, 4.0, 0.25])
def test_find_threshold_matches_full_sort(mass_bias: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact, except where upstream's sorted-order float32 total decides the crossing (|c − tau| ≲ 1e-7).

    mass_bias skews the octave histogram that picks the top set: 4 makes it too small, so the widening
    path runs; 0.25 makes it too large. Neither may change the result."""
    bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda e, weights: bincount(e, weights=weights * mass_bias))
    g = torch.Generator().manual_seed(0)
    cases = noise = 0
    for trial in range(300 if mass_bias == 1.0 else 60):
        n = int(torch.randint(1, 12000, (1,), generator=g))
        x = torch.rand(n, generator=g) ** 6
        kind = trial % 4
        if kind == 1:
            x = torch.round(x * 8) / 8  # heavy ties and zeros
        elif kind == 2:
            x = x * (torch.rand(n, generator=g) < 0.3)  # mostly zeros
        elif kind == 3:
            x = torch.randint(0, 4, (n,), generator=g).float()  # integer: every total is exact
        n_zeros = int(torch.randint(0, 3000, (1,), generator=g)) if trial % 3 == 0 else 0
        full = torch.cat([x, torch.zeros(n_zeros)])
        s, c = ref_cumfrac(full)
        for tau in (0.0, 0.5, 0.8, 0.98, 1.0):
            expected = ref_threshold(full, tau)
            cases += 1
            got = find_threshold(x, tau, n_zeros=n_zeros)
            if torch.equal(got, expected):
                continue
            i = int(torch.searchsorted(c, tau))
            near = c[max(i - 1, 0) : i + 1]
            assert kind != 3 and (tau < 1.0 or n_zeros > 0), (trial, tau)  # exact totals
            assert bool(((near - tau).abs() < 1e-6).any()), (trial, tau, got, expected)
            noise += 1
    assert noise <= cases // 500, noise
    # shapes and degenerate inputs
    assert find_threshold(torch.zeros(7), 0.8).item() == 0.0  # 0/0 total: upstream returns the last element
    assert find_threshold(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), 0.5).item() == 3.0  # c = .5 .83 1 1
    assert find_threshold(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), 0.6).item() == 2.0
    with pytest.raises(ValueError):
        find_threshold(torch.tensor([1.0, -1.0]), 0.5)


# ---------------------------------------------------------------- row block == dense reference


@pytest.mark.parametrize("seed", range(12))
def test_prune_and_scores_match_dense_reference(seed: int, monkeypatch) -> None:
    g = torch.Generator().manual_seed(seed)
    n_f = [3, 40, 400][seed % 3]
    L, T, K = 1 + seed % 3, 2 + seed % 5, 1 + seed % 4
    a, row_nodes, probs = random_dag(g, n_f, L, T, K, density=[0.05, 0.3, 0.8][seed % 4 % 3], ties=seed % 4 == 3)
    n = a.shape[0]
    w = logit_vector(probs, n)
    rows = a[row_nodes].clone()
    for node_tau, edge_tau in ((0.8, 0.98), (0.5, 0.9), (1.0, 1.0), (0.0, 0.0)):
        node_mask, edge_mask, cum = ref_prune(a, w, n_f, L * T, node_tau, edge_tau)
        res = prune(rows, row_nodes, probs, n_f, L * T, T, node_tau, edge_tau)
        assert torch.equal(res.node_mask, node_mask)
        assert torch.equal(res.edge_mask, edge_mask[row_nodes])
        unstored = torch.ones(n, dtype=torch.bool)
        unstored[row_nodes] = False
        # nothing is lost by storing rows only, except in upstream's degenerate zero threshold (tau ≈ 1),
        # where every entry of its N×N mask, edge or not, is True
        assert not edge_mask[unstored].any() or (edge_mask.all() and res.edge_mask.all())
        torch.testing.assert_close(res.cumulative_scores, cum, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(rows, a[row_nodes])  # inputs untouched
    assert graph_scores(rows, row_nodes, probs, n_f, L * T, T) == ref_graph_scores(a, w, n_f, L * T, T)
    partial_norm = a.abs() / a.abs().sum(1, keepdim=True).clamp(min=1e-8)  # 1e-8 here, not 1e-10
    torch.testing.assert_close(partial_influence(rows, row_nodes, probs), ref_influence(partial_norm, w))
    with monkeypatch.context() as m:  # blocks of two rows: the same influence without a normalised copy
        m.setattr(pruning, "INFLUENCE_BLOCK", 2 * n)
        torch.testing.assert_close(partial_influence(rows, row_nodes, probs), ref_influence(partial_norm, w))


# ---------------------------------------------------------------- never N×N


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op reads or produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_prune_never_builds_n_by_n() -> None:
    g = torch.Generator().manual_seed(0)
    n_f, L, T, K = 290, 9, 1970, 10
    n = n_f + (L + 1) * T + K
    assert n == 20000
    row_nodes = torch.cat([torch.arange(n_f), torch.arange(n - K, n)])
    rows = torch.randn(len(row_nodes), n, generator=g) * (torch.rand(len(row_nodes), n, generator=g) < 0.1)
    rows[:, n - K :] = 0
    layer = torch.arange(n_f) * 6 // n_f  # feature i reads features of higher "layer" only: shallow DAG
    rows[:n_f, :n_f] *= layer[:, None] < layer[None, :]
    probs = torch.tensor([0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.02, 0.02, 0.01])
    with LargestTensor() as seen:
        res = prune(rows, row_nodes, probs, n_f, L * T, T)
        graph_scores(rows, row_nodes, probs, n_f, L * T, T)
        partial_influence(rows, row_nodes, probs)
    assert seen.numel == rows.numel() < n * n  # the mode saw the [R, N] input, and nothing larger
    assert 0 < res.edge_mask.sum() < rows.numel() and res.edge_mask.shape == rows.shape
    assert res.node_mask[n - K - T :].all() and not res.node_mask[: n - K - T].all()
