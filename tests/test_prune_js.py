"""deployments/ui/prune.js in real Chromium equals attribute_ray.pruning.prune (docs/method.md §7).

The module is loaded as an ES module from a 127.0.0.1 http.server (modules do not load from file://), fed the
bytes of `Graph.to_msgpack()` (decoded by the UI's vendored msgpack, rows turned into a CSR by `csrFromMasked`),
and its node masks, kept edges, influence and cumulative scores are compared with Python's.

Tolerance, and why: both sides make every threshold decision on float32 numbers the same way (float32 sorted
scores, cumulative sums accumulated in double and stored as float32, divided in float32, `>=` the value at the
crossing), but Python's scores come from float32 BLAS products and JS's from float64 loops, so they differ in
the last bits. That can only move a cut whose cumulative share lies within ~1e-7 of tau. At edge threshold 1.0
that is always the case: the reference cuts where its float32 running sum first equals its float32 total, or,
when rounding leaves the total one ulp above, keeps every entry. There we require identical node masks and
allow differing edges only among the smallest scores, those that together hold < 1e-6 of the total score. All
other (node, edge) thresholds, and every threshold of the exactly representable tie graph, must match exactly.
"""

from __future__ import annotations

import base64
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from attribute_ray import ReplacementModel
from attribute_ray.attribution import attribute
from attribute_ray.graph import Graph, LogitTarget
from attribute_ray.pruning import influence, logit_vector, normalize
from attribute_ray.tiny import tiny_model, transcoder_for
from attribute_ray.transcoders import Activation

UI = Path(__file__).parent.parent / "deployments" / "ui"
THRESHOLDS = [(n, e) for n in (0.5, 0.8, 0.95, 1.0) for e in (0.5, 0.8, 0.95, 0.98, 1.0)] + [(0.0, 0.0), (0.3, 0.9)]
HARNESS = b"""<!doctype html><meta charset="utf-8"><title>prune.js</title><link rel="icon" href="data:,">
<script src="/vendor/msgpack.min.js"></script>
<script type="module">
import { csrFromMasked, prune } from "/prune.js";
const view = (a, T) => { const d = a.data; return new T(d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength)); };
// msgpack bytes (base64) -> prune() of every (node, edge) threshold pair, with the CSR
window.__run = (b64, pairs) => {
  const g = MessagePack.decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)));
  const rows = g.arrays.rows, [R, N] = rows.shape;
  const csr = csrFromMasked(rows.mask, view(rows.values, Float32Array), R, N);
  const nSel = g.arrays.selected_features.shape[0], T = g.arrays.input_tokens.shape[0], L = g.n_layers;
  const logitOffset = nSel + (L + 1) * T;
  const rowNodes = Int32Array.from({ length: R }, (_, r) => (r < nSel ? r : logitOffset + r - nSel));
  const graph = { rowNodes, ...csr, nNodes: N, nFeatures: nSel, nErrors: L * T, nTokens: T,
                  logitWeights: view(g.arrays.logit_probabilities, Float32Array) };
  const results = pairs.map(([nt, et]) => {
    const r = prune(graph, nt, et);
    return { nodeMask: Array.from(r.nodeMask), influence: Array.from(r.influence), cumulative: Array.from(r.cumulative),
             src: Array.from(r.edges.src), dst: Array.from(r.edges.dst), weight: Array.from(r.edges.weight) };
  });
  return { indptr: Array.from(csr.indptr), cols: Array.from(csr.cols), vals: Array.from(csr.vals), results };
};
window.__ready = true;
</script>"""


class Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript"}

    def do_GET(self) -> None:
        if self.path == "/":
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(HARNESS)))
            self.end_headers()
            self.wfile.write(HARNESS)
        else:
            super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def page():
    """Chromium (Playwright, Debian's binary as tests/test_serve.py launches it) on the harness page."""
    from playwright.sync_api import sync_playwright

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(UI)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                              "--disable-component-update", "--disable-sync", "--no-first-run"])
            pg = browser.new_page()
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            pg.wait_for_function("window.__ready === true", timeout=30_000)
            yield pg
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert not errors, errors


def run_js(page, graph: Graph, pairs: list[tuple[float, float]]) -> dict:
    return page.evaluate("([b64, pairs]) => window.__run(b64, pairs)",
                         [base64.b64encode(graph.to_msgpack()).decode(), [list(p) for p in pairs]])


def tie_graph() -> Graph:
    """Nodes f0..f3 | e4 e5 (L=1, T=2) | t6 t7 | l8 l9, every value dyadic so float32 and float64 agree exactly.
    Influence: e5 = t7 = 1/4, f0..f3 = e4 = t6 = 1/8 (six-way tie), logits 0; total 5/4, so the cumulative shares
    are .2 .4 .5 .6 .7 .8 .9 1 1 1 and node tau 0.5 or 0.8 lands exactly on a tied node. Edge scores: the six logit
    edges 1/8, the eight feature edges 1/16 (total 5/4): edge tau 0.6 lands exactly on the last 1/8."""
    rows = torch.zeros(6, 10)
    rows[0, 6], rows[0, 4] = 1, 1
    rows[1, 6], rows[1, 4] = -1, 1
    rows[2, 7], rows[2, 5] = 1, 1
    rows[3, 7], rows[3, 5] = 1, -1
    rows[4, 0], rows[4, 1], rows[4, 5], rows[4, 7] = 1, -1, 1, 1
    rows[5, 2], rows[5, 3] = 2, 2
    return Graph("a b", torch.tensor([0, 5]), torch.tensor([[0, 0, 1], [0, 0, 2], [0, 1, 3], [0, 1, 4]]), torch.ones(4),
                 torch.arange(4), [LogitTarget("x", 10), LogitTarget("y", 11)], torch.tensor([0.5, 0.25]), rows, 1, 64)


@pytest.fixture(scope="module")
def graphs() -> dict[str, Graph]:
    """Graphs of tiny models: three families and transcoder kinds, one with a feature cap (selected subset)."""
    out = {}
    for name, family, kind, prompt, cap in [("llama-plt", "llama", "plt", "the capital of france is", None),
                                            ("gpt2-clt", "gpt2", "clt", "the cat sat on the red dog when", None),
                                            ("qwen2-concat", "qwen2", "concat", "Michael Jordan plays", None),
                                            ("gemma2-capped", "gemma2", "plt", "the big river is", 30)]:
        model, tok = tiny_model(family, seed=len(out))
        tc = transcoder_for(model, kind=kind, n_features=24 if kind == "clt" else 48, seed=len(out),
                            **({"activation": Activation("relu")} if kind == "clt" else {}))
        out[name] = attribute(prompt, ReplacementModel(model, tok, tc), max_feature_nodes=cap)
    return out


def python_edges(graph: Graph, node_mask: torch.Tensor, edge_mask: torch.Tensor) -> set[tuple[int, int]]:
    """(target, source) of the kept edges between kept nodes among the stored non-zeros (the CSR's entries)."""
    stored = graph.rows.view(torch.int32) != 0
    keep = edge_mask & stored & node_mask[graph.row_nodes][:, None] & node_mask[None, :]
    r, c = keep.nonzero(as_tuple=True)
    return set(zip(graph.row_nodes[r].tolist(), c.tolist()))


def edge_scores(graph: Graph, node_threshold: float) -> dict[tuple[int, int], float]:
    """Python's edge scores P ⊙ (influence(P, w) + w)[target] on the node-pruned graph (docs/method.md §7)."""
    w = logit_vector(graph.logit_probabilities, graph.n_nodes)
    infl = influence(normalize(graph.rows), graph.row_nodes, w)
    s = torch.sort(infl, descending=True).values
    cut = s[min(int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), node_threshold)), len(s) - 1)]
    kept = (infl >= cut) | (torch.arange(graph.n_nodes) >= graph.token_offset)  # tokens and logits always stay
    p = normalize(graph.rows * kept[None, :] * kept[graph.row_nodes][:, None])
    scores = p * (influence(p, graph.row_nodes, w) + w)[graph.row_nodes, None]
    r, c = scores.nonzero(as_tuple=True)
    return {(int(graph.row_nodes[i]), int(j)): float(scores[i, j]) for i, j in zip(r, c)}


def compare(graph: Graph, js: dict, pairs: list[tuple[float, float]], exact: bool) -> None:
    # the CSR is the stored rows' non-zeros, row-major
    stored = graph.rows.view(torch.int32) != 0
    assert js["indptr"] == [0, *stored.sum(1).cumsum(0).tolist()]
    assert js["cols"] == stored.nonzero()[:, 1].tolist()
    assert js["vals"] == graph.rows[stored].tolist()
    w = logit_vector(graph.logit_probabilities, graph.n_nodes)
    want_infl = influence(normalize(graph.rows), graph.row_nodes, w)
    unique = torch.tensor([int((want_infl == v).sum()) == 1 for v in want_infl])
    for (nt, et), got in zip(pairs, js["results"]):
        node_mask, edge_mask, cumulative = graph.prune(nt, et)
        where = f"node {nt}, edge {et}"
        assert got["nodeMask"] == node_mask.int().tolist(), where
        want, have = python_edges(graph, node_mask, edge_mask), set(zip(got["dst"], got["src"]))
        if exact or et < 1.0:
            assert have == want, (where, sorted(have ^ want)[:10])
        else:  # the reference's own float32 cut (module docstring): only the smallest scores may differ
            scores = edge_scores(graph, nt)
            total = sum(scores.values())
            if have != want:
                largest = max(scores.get(e, 0.0) for e in have ^ want)
                assert sum(s for s in scores.values() if s <= largest) < 1e-6 * total, (where, sorted(have ^ want))
        rows_at = {int(n): i for i, n in enumerate(graph.row_nodes.tolist())}
        assert got["weight"] == [float(graph.rows[rows_at[d], s]) for d, s in zip(got["dst"], got["src"])], where
        torch.testing.assert_close(torch.tensor(got["influence"]), want_infl, rtol=1e-5, atol=1e-7 * float(want_infl.max()))
        # cumulative share at each node's rank; tied nodes may take their ranks in either order (torch.sort is not
        # stable), so those compare as a multiset
        cum = torch.tensor(got["cumulative"])
        torch.testing.assert_close(cum[unique], cumulative[unique], rtol=0, atol=1e-6)
        torch.testing.assert_close(cum.sort().values, cumulative.sort().values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-plt", "gpt2-clt", "qwen2-concat", "gemma2-capped"])
def test_prune_js_equals_python_on_attribution_graphs(page, graphs, name: str) -> None:
    graph = graphs[name]
    js = run_js(page, graph, THRESHOLDS)
    compare(graph, js, THRESHOLDS, exact=False)
    kept = [sum(r["nodeMask"]) for r in js["results"]]
    assert min(kept) < graph.n_nodes and len(set(kept)) > 3  # the thresholds really prune, differently


def test_prune_js_exact_ties(page) -> None:
    graph = tie_graph()
    pairs = [(0.5, 0.6), (0.5, 0.61), (0.8, 0.6), (0.45, 0.59), (0.3, 0.8), (0.8, 0.95), (1.0, 1.0), (0.0, 0.0)]
    js = run_js(page, graph, pairs)
    compare(graph, js, pairs, exact=True)
    got = dict(zip(pairs, js["results"]))
    # by hand: node tau 0.5 and 0.8 cross exactly at the first of six tied nodes, and all six stay (>= the tie);
    # edge tau 0.6 crosses exactly at the last of the six logit edges: only they survive, so the features lose
    # their incoming edges and go, then their logit edges, then e4 (no outgoing edge left)
    for pair in [(0.5, 0.6), (0.8, 0.6), (0.45, 0.59)]:
        assert got[pair]["nodeMask"] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], pair
        assert sorted(zip(got[pair]["dst"], got[pair]["src"])) == [(8, 5), (8, 7)], pair
    # just past it, the 1/16 feature edges are needed too and every node and all 14 edges stay
    assert got[(0.5, 0.61)]["nodeMask"] == [1] * 10 and len(got[(0.5, 0.61)]["src"]) == 14
    assert got[(0.5, 0.6)]["influence"] == [0.125] * 5 + [0.25, 0.125, 0.25, 0.0, 0.0]
    assert sorted(got[(0.5, 0.6)]["cumulative"]) == pytest.approx([0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1, 1], abs=1e-7)


def test_csr_from_masked_rejects_inconsistent_input(page) -> None:
    msg = page.evaluate("""async () => {
        const { csrFromMasked, prune } = await import('/prune.js');
        const out = [];
        for (const f of [() => csrFromMasked(new Uint8Array([0b10100000]), new Float32Array([1]), 2, 4),
                         () => csrFromMasked(new Uint8Array([0b10000000]), new Float32Array([1, 2]), 2, 4),
                         () => csrFromMasked(new Uint8Array([]), new Float32Array([]), 2, 4),
                         () => prune({rowNodes: new Int32Array([0]), indptr: new Int32Array([0, 0]), cols: new Int32Array(0),
                                      vals: new Float32Array(0), nNodes: 3, nFeatures: 1, nErrors: 1, nTokens: 1,
                                      logitWeights: new Float32Array([1])}, 0.5, 0.5),
                         () => prune({rowNodes: new Int32Array(0), indptr: new Int32Array([0]), cols: new Int32Array(0),
                                      vals: new Float32Array(0), nNodes: 0, nFeatures: 0, nErrors: 0, nTokens: 0,
                                      logitWeights: new Float32Array(0)}, 1.5, 0.5)]) {
            try { f(); out.push('no error'); } catch (e) { out.push(e.message); }
        }
        // 2 rows x 4 columns, non-zeros at (0, 0), (0, 2), (1, 3): mask bits 1010 0001
        const csr = csrFromMasked(new Uint8Array([0b10100001]), new Float32Array([1, -2, 3]), 2, 4);
        out.push([Array.from(csr.indptr), Array.from(csr.cols), Array.from(csr.vals)]);
        return out;
    }""")
    assert "more set bits" in msg[0] and "2 values" in msg[1] and "expected 1" in msg[2]
    assert "expected nFeatures" in msg[3] and "between 0.0 and 1.0" in msg[4]
    assert msg[5] == [[0, 2, 3], [0, 2, 3], [1, -2, 3]]
