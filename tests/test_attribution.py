"""Attribution graphs: exact direct effects checked by intervention on the frozen model (docs/method.md §9.1),
targets, influence-ordered selection, serialisation and Neuronpedia JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import msgpack
import pytest
import torch

from attribute_ray import Additions, ReplacementModel
from attribute_ray.attribution import CustomTarget, attribute
from attribute_ray.graph import Graph
from attribute_ray.neuronpedia import cantor, cantor_inverse, write_graph_files
from attribute_ray.tiny import FAMILIES, tiny_model, transcoder_for
from attribute_ray.transcoders import Activation, Hookpoints
from attribute_ray.wire import WireFormatError

DATA = Path(__file__).parent / "data"
TOKENS = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 12, 13])
CASES = {
    "plt-topk": dict(kind="plt"),
    "skip-plt-jumprelu": dict(kind="plt", skip=True, activation=Activation("jumprelu")),
    "clt-relu": dict(kind="clt", n_features=24, activation=Activation("relu")),
    "skip-concat-topk-gated": dict(kind="concat", skip=True, gates=True),
}


def build(family: str, case: str) -> ReplacementModel:
    model, tok = tiny_model(family)
    return ReplacementModel(model, tok, transcoder_for(model, **CASES[case]))


def intervene(rm: ReplacementModel, graph: Graph, cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each source column's vector at its location in the frozen model (one batch row per column);
    return the changes of the selected features' pre-activations [B, n_sel] and of the logits [B, K]."""
    trace = rm.trace(graph.input_tokens)
    L, T, D, B = rm.n_layers, graph.n_pos, rm.d_model, len(cols)
    feats = trace.features
    assert torch.equal(feats.as_matrix(), graph.active_features)
    embed, mlp = torch.zeros(B, T, D), {l: torch.zeros(B, T, D) for l in range(L)}
    dec = [rm.decoder_vectors(feats, t) for t in range(L)]
    tokens_vec = rm.token_vectors(graph.input_tokens)
    for b, c in enumerate(cols):
        if c < graph.error_offset:  # feature: its activation-scaled decoder vector at every layer it writes to
            i = int(graph.selected_features[c])
            for t, (rows, vecs) in enumerate(dec):
                hit = (rows == i).nonzero()[:, 0]
                if hit.numel():
                    mlp[t][b, feats.positions[i]] += vecs[hit[0]]
        elif c < graph.token_offset:
            l, p = divmod(c - graph.error_offset, T)
            mlp[l][b, p] += trace.errors[l][p]
        else:
            p = c - graph.token_offset
            embed[b, p] += tokens_vec[p]
    base, out = rm.run_frozen(trace), rm.run_frozen(trace, Additions(embed=embed, mlp_out=mlp))
    sel = graph.selected_nodes
    enc = rm.encoder_vectors(feats)[graph.selected_features]
    read = lambda o: torch.stack([o.inputs[l][:, p] @ enc[j] for j, (l, p, _) in enumerate(sel.tolist())], 1)  # noqa: E731
    u = rm.logit_vectors(graph.logit_token_ids)
    logit = lambda o: o.final_resid[:, -1] @ u.T  # noqa: E731
    return read(out) - read(base), logit(out) - logit(base)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_direct_effects_equal_interventions(family: str, case: str) -> None:
    rm = build(family, case)
    graph = attribute(TOKENS, rm, batch_size=32)
    A = graph.adjacency
    n_err_tok = (rm.n_layers + 1) * graph.n_pos
    assert graph.n_selected >= 100, "need >= 100 feature columns"
    torch.manual_seed(0)
    feat_cols = torch.randperm(graph.n_selected)[:100].tolist()
    cols = feat_cols + list(range(graph.error_offset, graph.error_offset + n_err_tok))  # every error and token
    d_feat, d_logit = intervene(rm, graph, cols)
    scale = A.abs().max()
    cols_t = torch.tensor(cols)
    assert (d_feat - A[: graph.n_selected][:, cols_t].T).abs().max() <= 1e-4 * scale
    assert (d_logit - A[graph.logit_offset :][:, cols_t].T).abs().max() <= 1e-4 * scale
    assert A[graph.error_offset : graph.logit_offset].abs().sum() == 0  # error/token rows are empty
    assert torch.all(graph.active_features[:, 1] >= 1)  # no features at the BOS position


def test_targets_salient_ids_strings_custom() -> None:
    rm = build("llama", "plt-topk")
    probs = rm.trace(TOKENS).logits[-1].softmax(-1)
    g = attribute(TOKENS, rm, max_n_logits=5, desired_logit_prob=0.3)
    top_p, top_i = probs.topk(5)
    k = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(0.3))) + 1
    assert g.logit_token_ids.tolist() == top_i[:k].tolist()
    torch.testing.assert_close(g.logit_probabilities, top_p[:k])  # raw probabilities, not renormalised

    by_id = attribute(TOKENS, rm, targets=[7, 9])
    by_str = attribute(TOKENS, rm, targets=["of", "is"])
    assert by_str.logit_token_ids.tolist() == [rm.tokenizer.convert_tokens_to_ids(t) for t in ("of", "is")]
    torch.testing.assert_close(by_id.logit_probabilities, probs[[7, 9]])
    # a custom direction equal to token 7's demeaned unembedding gives token 7's row
    u7 = rm.logit_vectors(torch.tensor([7]))[0]
    custom = attribute(TOKENS, rm, targets=[CustomTarget("seven", 0.5, u7)])
    assert custom.logit_targets[0].index == rm.model.config.vocab_size  # virtual index vocab + i
    # (same columns up to the logit block, which differs in size: 1 custom node vs 2 token nodes)
    torch.testing.assert_close(custom.rows[-1, : custom.logit_offset], by_id.rows[-2, : by_id.logit_offset], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one token"):
        attribute(TOKENS, rm, targets=["the capital"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(TOKENS, rm, targets=[10_000])
    with pytest.raises(ValueError):
        attribute(TOKENS, rm, batch_size=0)


def test_capped_graph_is_a_submatrix_and_chunking_is_invisible() -> None:
    rm = build("gemma2", "clt-relu")
    full = attribute(TOKENS, rm, batch_size=64)
    capped = attribute(TOKENS, rm, max_feature_nodes=40, batch_size=8, update_interval=2)
    tiny_chunks = attribute(TOKENS, rm, batch_size=7, memory_budget_mb=16)
    torch.testing.assert_close(tiny_chunks.rows, full.rows, atol=1e-6, rtol=1e-6)
    assert capped.n_selected == 40
    keep = torch.cat([capped.selected_features, torch.arange(full.n_selected, full.n_nodes)])
    torch.testing.assert_close(capped.adjacency, full.adjacency[keep][:, keep], atol=1e-6, rtol=1e-6)
    # the cap keeps the most influential features: the first batches are chosen by logit-row influence
    from attribute_ray.pruning import partial_influence

    logit_rows = full.rows[full.n_selected :]
    infl = partial_influence(logit_rows, full.row_nodes[full.n_selected :], full.logit_probabilities)[: full.n_selected]
    first = set(torch.argsort(infl, descending=True, stable=True)[:16].tolist())
    assert first <= set(capped.selected_features.tolist())


def test_msgpack_round_trip_is_bit_exact() -> None:
    rm = build("qwen3", "skip-concat-topk-gated")
    for graph in (attribute(TOKENS, rm), attribute(TOKENS, rm, max_feature_nodes=12)):
        data = graph.to_msgpack()
        back = Graph.from_msgpack(data)
        for name in ("input_tokens", "active_features", "activation_values", "selected_features", "logit_probabilities", "rows"):
            a, b = getattr(graph, name), getattr(back, name)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a, b.view(torch.uint8) if b.is_floating_point() else b)
        assert back.logit_targets == graph.logit_targets and back.prompt_tokens == graph.prompt_tokens
        assert (back.model_id, back.transcoder_id, back.n_layers) == (graph.model_id, graph.transcoder_id, graph.n_layers)
        header = msgpack.unpackb(data)
        assert header["format"] == "attribute-ray.graph" and header["version"] == 1
        assert header["scores"]["replacement"] == pytest.approx(graph.scores()[0])
        # a wrong version / foreign bytes are rejected with a clear error
        header["version"] = 99
        with pytest.raises(WireFormatError, match="version 99"):
            Graph.from_msgpack(msgpack.packb(header, use_bin_type=True))
        with pytest.raises(WireFormatError):
            Graph.from_msgpack(b"\x93\x01\x02")
        header["version"] = 1
        header["arrays"]["rows"] = {"dtype": "|O", "shape": [1], "data": b"x"}
        with pytest.raises(WireFormatError, match="not allowed"):
            Graph.from_msgpack(msgpack.packb(header, use_bin_type=True))


def test_neuronpedia_json_validates_and_follows_conventions(tmp_path) -> None:
    rm = build("gpt2", "skip-plt-jumprelu")
    graph = attribute("the cat sat on the", rm)
    schema = json.loads((DATA / "graph-schema.json").read_text())
    path = write_graph_files(graph, tmp_path, "cat-sat", feature_json_base_url="http://127.0.0.1:8000/v1/features")
    data = json.loads(path.read_text())
    jsonschema.validate(data, schema)
    nodes = {n["node_id"]: n for n in data["nodes"]}
    L, T = rm.n_layers, graph.n_pos
    mask, edge_mask, cumulative = graph.prune(0.8, 0.98)
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, feat, pos = map(int, n["node_id"].split("_"))
            assert n["feature"] == cantor(layer, feat) and cantor_inverse(n["feature"]) == (layer, feat)
            assert n["jsNodeId"] == f"{layer}_{feat}-0" and n["ctx_idx"] == pos
        elif n["feature_type"] == "mlp reconstruction error":
            layer, minus_one, pos = n["node_id"].split("_")
            assert minus_one == "-1" and n["feature"] == -1  # the fixed, non-colliding error id
        elif n["feature_type"] == "logit":
            assert n["layer"] == str(L + 1) and n["ctx_idx"] == T - 1 and "(p=" in n["clerp"]
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == T  # embeddings always kept
    assert [n["is_target_logit"] for n in data["nodes"] if n["feature_type"] == "logit"][0]
    # links are exactly the kept edges between kept nodes, with weight = A[target, source]
    A = graph.adjacency
    assert len(data["links"]) == int(edge_mask[:, mask][mask[graph.row_nodes]].sum())
    for link in data["links"][:50]:
        assert link["source"] in nodes and link["target"] in nodes
    weights = sorted(abs(link["weight"]) for link in data["links"])
    kept = A[graph.row_nodes][edge_mask & mask[graph.row_nodes][:, None] & mask[None, :]].abs().sort().values
    torch.testing.assert_close(torch.tensor(weights), kept)
    # graph-metadata.json lists each slug once
    write_graph_files(graph, tmp_path, "cat-sat")
    write_graph_files(graph, tmp_path, "second")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["cat-sat", "second"]
    with pytest.raises(ValueError, match="slug"):
        graph.to_neuronpedia_json("bad slug!")


def test_long_prompt_memory_stays_within_the_row_block(tmp_path) -> None:
    """A 512-token prompt completes without an N×N allocation (peak RSS measured in a subprocess)."""
    script = tmp_path / "long.py"
    script.write_text(
        "import resource, torch, json\n"
        "from attribute_ray.tiny import tiny_model, transcoder_for\n"
        "from attribute_ray import ReplacementModel\n"
        "from attribute_ray.attribution import attribute\n"
        "from attribute_ray.transcoders import Activation\n"
        "torch.set_num_threads(2)\n"
        "m, tok = tiny_model('llama')\n"
        "rm = ReplacementModel(m, tok, transcoder_for(m, kind='plt', n_features=4096, activation=Activation('topk', k=16)))\n"
        "tokens = torch.randint(4, 64, (512,)); tokens[0] = 0\n"
        "rm.trace(tokens, linearise=True)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "g = attribute(tokens, rm, max_feature_nodes=64, batch_size=32)\n"
        "mask, edges, _ = g.prune()\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n_work = g.active_features.shape[0] + 4 * 512 + g.n_logits\n"
        "print(json.dumps(dict(grow_kb=after - before, n_work=n_work, n_nodes=g.n_nodes, rows=list(g.rows.shape))))\n"
    )
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["rows"] == [64 + (stats["n_nodes"] - 64 - 4 * 512), stats["n_nodes"]]
    dense_kb = stats["n_work"] ** 2 * 4 // 1024  # an N×N float32 over the working columns
    assert dense_kb > 2_000_000, "the test must be able to see an N×N allocation"
    assert stats["grow_kb"] < dense_kb // 3, stats


def test_cli_graph_writes_json_and_msgpack(tmp_path) -> None:
    from attribute_ray import save_sparsify
    from attribute_ray.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama")
    tc_dir = save_sparsify(transcoder_for(tiny_model("llama")[0], kind="concat", skip=True), tmp_path / "tc")
    for name in ("g.json", "g.msgpack"):
        out = subprocess.run(
            [sys.executable, "-m", "attribute_ray.cli", "graph", "the capital of france is", "--model", str(model_dir),
             "--transcoder", str(tc_dir), "--max-feature-nodes", "50", "--batch-size", "16", "-o", str(tmp_path / name)],
            capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert "replacement" in out.stdout and "completeness" in out.stdout
    jsonschema.validate(json.loads((tmp_path / "g.json").read_text()), json.loads((DATA / "graph-schema.json").read_text()))
    g = Graph.from_msgpack((tmp_path / "g.msgpack").read_bytes())
    assert g.n_selected == 50 and g.prompt_tokens[1:] == ["the", "capital", "of", "france", "is"]


def test_bfloat16_model_gives_float32_graph_close_to_fp32() -> None:
    model, tok = tiny_model("llama")
    tc = transcoder_for(model, kind="plt", skip=True)
    g32 = attribute(TOKENS, ReplacementModel(model, tok, tc))
    g16 = attribute(TOKENS, ReplacementModel(model.to(torch.bfloat16), tok, tc))
    assert g16.rows.dtype == torch.float32 and g16.logit_token_ids.tolist() == g32.logit_token_ids.tolist()
    tok32 = g32.rows[g32.n_selected :, g32.token_offset : g32.logit_offset]
    tok16 = g16.rows[g16.n_selected :, g16.token_offset : g16.logit_offset]
    assert (tok16 - tok32).abs().max() <= 0.05 * tok32.abs().max()  # bf16 is ~3 significant digits


def test_pruned_graph_keeps_exactly_the_kept_edges() -> None:
    rm = build("llama", "clt-relu")
    g = attribute(TOKENS, rm)
    node_mask, edge_mask, _ = g.prune(0.6, 0.9)
    p = g.pruned(0.6, 0.9)
    keep = node_mask[: g.n_selected]
    assert torch.equal(p.selected_nodes, g.selected_nodes[keep]) and p.n_selected < g.n_selected
    assert torch.equal(p.active_features, p.selected_nodes)  # only its own features remain
    cols = torch.cat([keep.nonzero()[:, 0], torch.arange(g.n_selected, g.n_nodes)])
    dense = g.adjacency * (torch.zeros_like(g.adjacency, dtype=torch.bool).index_put_((g.row_nodes,), edge_mask)
                           & node_mask[:, None] & node_mask[None, :])
    torch.testing.assert_close(p.adjacency, dense[cols][:, cols], atol=0, rtol=0)
    assert len(p.to_msgpack()) < len(g.to_msgpack()) / 2  # sparse rows travel as a bit mask + values
    assert p.settings["pruned"] == {"node_threshold": 0.6, "edge_threshold": 0.9}


def test_causal_truncation_runs_each_row_on_the_shortest_prefix(monkeypatch) -> None:
    """Each target is pulled back through a prefix that holds its position and is shorter than the prompt where
    its position allows; the rows equal those of full-length backwards (PREFIX_STEPS = 1: one prefix, the prompt)."""
    import attribute_ray.attribution as A

    rm = build("llama", "plt-topk")
    tokens = torch.cat([TOKENS, TOKENS[1:], TOKENS[1:]])  # 28 positions
    calls: list[tuple[int, int, int]] = []  # (prefix length, highest position, rows)
    call = A._RowComputer.__call__

    def record(self, n, sites, positions, vectors, edges, rows):
        calls.append((n, int(positions.max()), len(rows)))
        return call(self, n, sites, positions, vectors, edges, rows)

    monkeypatch.setattr(A._RowComputer, "__call__", record)
    monkeypatch.setattr(A, "RETRACE_ROWS", 0)  # every prefix pays for its forward
    for cap in (None, 30):
        calls.clear()
        truncated = attribute(tokens, rm, batch_size=16, max_feature_nodes=cap)
        assert all(p < n for n, p, _ in calls)
        T, step = len(tokens), -(-len(tokens) // A.PREFIX_STEPS)
        assert all(n == min(T, (p // step + 1) * step) for n, p, _ in calls[1:])  # features: the shortest prefix
        rows_at = sum(r * n for n, _, r in calls[1:]) / sum(r for _, _, r in calls[1:])
        assert rows_at < 0.8 * T, "features at early positions must run on short prefixes"
        monkeypatch.setattr(A, "PREFIX_STEPS", 1)
        full = attribute(tokens, rm, batch_size=16, max_feature_nodes=cap)
        monkeypatch.setattr(A, "PREFIX_STEPS", 16)
        assert torch.equal(truncated.selected_features, full.selected_features)
        assert (truncated.rows - full.rows).abs().max() <= 1e-6 * full.rows.abs().max()  # float rounding only


def _pull_back(sites: list[torch.Tensor], grads: list[torch.Tensor], graph, below: int) -> list[torch.Tensor]:
    """Batched gradients of `sites` (given `grads`) at the output sites under layer `below` and the embedding."""
    leaves = [*graph.outputs[:below], graph.embed]
    got = torch.autograd.grad(sites, leaves, grads, retain_graph=True, allow_unused=True, is_grads_batched=True)
    return [torch.zeros_like(grads[0]) if g is None else g for g in got]


@pytest.mark.parametrize("patterns", ["kept", "none"])
@pytest.mark.parametrize("family,site", [(f, "mlp_in") for f in FAMILIES] + [("gemma2", "resid_mid"), ("llama", "mlp_in_normalized")])
def test_first_step_below_attention_equals_autograd(family: str, site: str, patterns: str) -> None:
    """Attribution's hand-taken first step (the attention output projection at each target's own position only;
    with a kept pattern W_Vᵀ once per head, spread by the target's pattern row) gives the gradients autograd gives
    from the target's input site, at every layer: GQA, softcapping, sliding windows and GPT-2's fused Conv1D q, k, v
    included."""
    from attribute_ray.attribution import _below_attention

    model, tok = tiny_model(family)
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="plt", skip=True, hookpoints=Hookpoints(input=site)))
    tokens = torch.randint(3, 64, (12,), generator=torch.Generator().manual_seed(3))
    g = rm.trace(tokens, linearise=True, keep_patterns=patterns == "kept").graph
    assert all((a.pattern is not None) == (patterns == "kept") for a in g.attention)
    gen = torch.Generator().manual_seed(4)
    for layer in range(rm.n_layers):
        positions = torch.tensor([11, 4, 4, 0, 7])
        inj = torch.zeros(5, 1, 12, rm.d_model)
        inj[torch.arange(5), 0, positions] = torch.randn(5, rm.d_model, generator=gen)
        ref = _pull_back([g.inputs[layer]], [inj], g, layer)
        got = _pull_back(*_below_attention(g.attention[layer], g.inputs[layer], inj, positions), g, layer)
        for a, b in zip(got, ref):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (layer, (a - b).abs().max())
        assert float(ref[-1].abs().sum()) > 0


@pytest.mark.parametrize("patterns", ["kept", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_graph_replays_the_trace_without_running_the_mlps(family: str, patterns: str, monkeypatch) -> None:
    """The graph of a prefix built from a trace (`Prefix`: its patterns, norm scales and MLP outputs replayed; for a
    trace without patterns, attention in query blocks of 2 rows) pulls gradients back as a fresh linearised trace of
    the prefix alone does, and no MLP computes anything."""
    import attribute_ray.attribution as A
    import attribute_ray.replacement as replacement

    rm = build(family, "skip-plt-jumprelu")
    tokens = torch.randint(3, 64, (15,), generator=torch.Generator().manual_seed(5))
    n, calls = 9, []
    trace = rm.trace(tokens, linearise=True, keep_patterns=patterns == "kept")
    if patterns == "none":
        monkeypatch.setattr(A, "keeps_patterns", lambda shape, n_pos: False)
        monkeypatch.setattr(replacement, "PATTERN_BLOCK_BYTES", 2 * 4 * rm.model.config.num_attention_heads * n)
    handles = [m.register_forward_hook(lambda *a: calls.append(1))
               for layer in rm.layers for m in rm.family.get(layer, rm.family.mlp).children()]
    try:
        replayed = A.linear_graph(rm, trace, n)
    finally:
        for h in handles:
            h.remove()
    assert calls == [] and replayed.embed.shape[1] == n
    fresh = rm.trace(tokens[:n], linearise=True).graph
    gen = torch.Generator().manual_seed(6)
    inj = [torch.randn(4, 1, n, rm.d_model, generator=gen) for _ in range(2)]
    got = _pull_back([replayed.inputs[2], replayed.final], inj, replayed, 2)
    ref = _pull_back([fresh.inputs[2], fresh.final], inj, fresh, 2)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert all(float(b.abs().sum()) > 0 for b in ref)
