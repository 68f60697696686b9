"""Interventions and steering: direct-only ablations reproduce the graph's edges exactly, zero-change steering
is plain greedy generation, supernodes are sums of their members, and bad interventions fail clearly."""

from __future__ import annotations

import pytest
import torch

from attribute_ray import ReplacementModel
from attribute_ray.attribution import attribute
from attribute_ray.errors import AttributeRayError
from attribute_ray.interventions import (
    Intervention,
    InterventionError,
    Supernode,
    check_graph,
    generate_with_interventions,
    intervene,
    supernode_interventions,
)
from attribute_ray.tiny import tiny_model, transcoder_for
from attribute_ray.transcoders import Activation

TOKENS = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 12, 13])
CASES = {
    "plt": dict(kind="plt"),
    "clt-jumprelu": dict(kind="clt", n_features=24, activation=Activation("jumprelu")),
    "concat-gated-skip": dict(kind="concat", skip=True, gates=True),
}


def build(family: str, case: str, seed: int = 0) -> ReplacementModel:
    model, tok = tiny_model(family, seed)
    return ReplacementModel(model, tok, transcoder_for(model, **CASES[case]))


def effects(rm: ReplacementModel, graph, ivs, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ pre-activation of every selected feature, Δ demeaned logit of every logit target)."""
    res = intervene(rm, graph.input_tokens, ivs, read_features=graph.selected_nodes.tolist(), **kw)
    return res.pre_activations_after - res.pre_activations_before, res.demeaned_logit_change(rm, graph.logit_token_ids)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_direct_ablation_and_scaling_reproduce_graph_edges(family: str, case: str) -> None:
    rm = build(family, case)
    graph = attribute(TOKENS, rm, batch_size=64)
    A, n_sel = graph.adjacency, graph.n_selected
    tol = 1e-4 * float(A.abs().max())
    acts = graph.activation_values[graph.selected_features]
    reach = A[:, :n_sel].abs().amax(0)  # columns with a visible effect (a last-layer feature before T-1 has none)
    live = (reach > 100 * tol).nonzero()[:, 0]
    torch.manual_seed(0)
    cols = [int(reach.argmax()), *live[torch.randperm(len(live))[:3]].tolist()]
    gated = rm.transcoder.decoders[(0, 0)].offset is not None
    for col in cols:
        l, p, f = graph.selected_nodes[col].tolist()
        pred_feat, pred_logit = -A[:n_sel, col], -A[graph.logit_offset :, col]
        d_feat, d_logit = effects(rm, graph, [Intervention(l, f, "ablate", positions=[p])], direct_only=True)
        assert (d_feat - pred_feat).abs().max() <= tol
        assert (d_logit - pred_logit).abs().max() <= tol
        # later features are the downstream targets; nothing upstream or at the same layer moves
        upstream = graph.selected_nodes[:, 0] < l
        assert d_feat[upstream].abs().max() <= tol if upstream.any() else True
        r = check_graph(rm, graph, col)  # the library's own check agrees
        assert r["exact"] and r["max_abs_error"] <= tol and r["node"]["feature"] == f
        torch.testing.assert_close(torch.tensor(r["logits"]["predicted"]), pred_logit)

        s2_feat, s2_logit = effects(rm, graph, [Intervention(l, f, "scale", 2.0, positions=[p])], direct_only=True)
        if not gated:  # scale 2 adds the source vector once more: +A[t, col]
            assert (s2_feat + pred_feat).abs().max() <= tol and (s2_logit + pred_logit).abs().max() <= tol
            s3_feat, _ = effects(rm, graph, [Intervention(l, f, "set", 3 * float(acts[col]), positions=[p])], direct_only=True)
            assert (s3_feat + 2 * pred_feat).abs().max() <= 2 * tol
        else:  # gate offsets are not scaled: the change is linear in (c − 1) and scale 0 is an ablation
            s3_feat, s3_logit = effects(rm, graph, [Intervention(l, f, "scale", 3.0, positions=[p])], direct_only=True)
            assert (s3_feat - 2 * s2_feat).abs().max() <= 2 * tol and (s3_logit - 2 * s2_logit).abs().max() <= 2 * tol
            z_feat, _ = effects(rm, graph, [Intervention(l, f, "scale", 0.0, positions=[p])], direct_only=True)
            assert (z_feat - pred_feat).abs().max() <= tol
    # an error node: ablating it removes its vector, −A[:, col]
    err_col = graph.error_offset + 1 * graph.n_pos + 4
    r = check_graph(rm, graph, err_col)
    assert r["exact"] and r["node"] == dict(index=err_col, kind="error", layer=1, position=4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_no_interventions_after_equals_before_equals_plain_model(family: str) -> None:
    rm = build(family, "concat-gated-skip")
    with torch.no_grad():
        plain = rm.model(input_ids=TOKENS[None]).logits[0, -1]
    trace = rm.trace(TOKENS)
    reads = trace.features.as_matrix()[::7].tolist()
    for kw in ({}, dict(freeze_attention=True), dict(direct_only=True), dict(constrained_layers=range(1, 3))):
        res = intervene(rm, TOKENS, [], read_features=reads, **kw)
        torch.testing.assert_close(res.logits_before, plain, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.logits_after, res.logits_before, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.activations_after, res.activations_before, atol=1e-4, rtol=0)
        assert [t.token_id for t in res.top_after] == [t.token_id for t in res.top_before]
        assert len(res.top_before) == 10 and res.top_before[0].prob == pytest.approx(float(plain.softmax(-1).max()), abs=1e-5)
    torch.testing.assert_close(res.activations_before, trace.features.raw[::7])
    # zero-change ops in the responding model are no-ops too
    f = trace.features
    zero = [Intervention(int(f.layers[0]), int(f.indices[0]), "scale", 1.0), Intervention.on_error(2, "scale", 1.0)]
    torch.testing.assert_close(intervene(rm, TOKENS, zero).logits_after, plain, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_zero_change_steering_is_plain_greedy_generation(family: str) -> None:
    rm = build(family, "concat-gated-skip", seed=2)  # seed 2: a tiny Gemma-2 that does not repeat one token
    feats = rm.trace(TOKENS).features
    plain = rm.model.generate(TOKENS[None], do_sample=False, max_new_tokens=12)[0, len(TOKENS) :].tolist()
    assert len(set(plain)) >= 3
    zero = [
        Intervention(int(feats.layers[0]), int(feats.indices[0]), "scale", 1.0, "all"),
        Intervention(int(feats.layers[-1]), int(feats.indices[-1]), "add", 0.0, "all"),
        Intervention(2, 0, "add", 0.0, "generated"),
        Intervention.on_error(1, "scale", 1.0, "all"),
    ]
    for ivs in ([], zero):
        text, ids = generate_with_interventions(rm, TOKENS, ivs, max_new_tokens=12)
        assert ids == plain and text == rm.tokenizer.decode(plain)
    # the hooked forward itself is the plain model, not just its argmax
    from attribute_ray.interventions import InterventionEdit
    from attribute_ray.replacement import Replaced

    plan = InterventionEdit.build(rm, zero, prompt_len=len(TOKENS), n_zero=1, max_len=len(TOKENS), generating=True)
    with torch.no_grad(), rm.hooks(Replaced(None, edit=plan, live_errors=True)):
        hooked = rm.model(input_ids=TOKENS[None]).logits
    with torch.no_grad():
        torch.testing.assert_close(hooked, rm.model(input_ids=TOKENS[None]).logits, atol=1e-5, rtol=0)
    # sampling is seeded
    a = generate_with_interventions(rm, TOKENS, zero, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == generate_with_interventions(rm, TOKENS, zero, max_new_tokens=8, temperature=1.0, seed=3)
    # ... and a real change does steer
    steer = [Intervention(l, 3, "add", 30.0, "all") for l in range(rm.n_layers)]
    assert generate_with_interventions(rm, TOKENS, steer, max_new_tokens=12)[1] != plain


def test_steering_generated_positions_leaves_the_first_token() -> None:
    rm = build("llama", "plt")
    plain = generate_with_interventions(rm, TOKENS, [], max_new_tokens=10)[1]
    steer = [Intervention(layer, 3, "add", 20.0, "generated") for layer in range(rm.n_layers)]
    ids = generate_with_interventions(rm, TOKENS, steer, max_new_tokens=10)[1]
    assert ids[0] == plain[0]  # the first new token is predicted from prompt positions only
    assert ids != plain
    # position lists index the whole sequence: steering only the last generated position changes nothing visible
    late = [Intervention(0, 3, "add", 20.0, [len(TOKENS) + 9])]
    assert generate_with_interventions(rm, TOKENS, late, max_new_tokens=10)[1] == plain


def test_supernode_is_the_sum_of_its_members() -> None:
    rm = build("llama", "concat-gated-skip")
    graph = attribute(TOKENS, rm, batch_size=64)
    feats = graph.selected_nodes
    members = [tuple(feats[i, [0, 2]].tolist()) for i in (0, len(feats) // 3, len(feats) // 2)]
    node = Supernode("group", members)
    ivs = supernode_interventions(node, "ablate")
    assert ivs == node.interventions("ablate") == [Intervention(l, f, "ablate", 0.0, "all") for l, f in members]
    tol = 1e-4 * float(graph.adjacency.abs().max())
    for op, value in (("ablate", 0.0), ("scale", 2.5), ("add", 1.0)):
        together = effects(rm, graph, supernode_interventions(node, op, value), direct_only=True)
        one_by_one = [effects(rm, graph, [iv], direct_only=True) for iv in supernode_interventions(node, op, value)]
        for k in range(2):
            total = sum(e[k] for e in one_by_one)
            assert (together[k] - total).abs().max() <= tol
        assert together[1].abs().max() > 100 * tol


def test_features_respond_without_direct_only() -> None:
    rm = build("llama", "plt")
    graph = attribute(TOKENS, rm, batch_size=64)
    first = graph.active_features[:, 0] == 0  # a layer-0 feature: it has downstream layers to move
    i = int(torch.where(first, graph.activation_values.abs(), -1.0).argmax())
    l, p, f = graph.active_features[i].tolist()
    ablate = [Intervention(l, f, "ablate", positions=[p])]
    reads = graph.active_features.tolist()
    res = intervene(rm, TOKENS, ablate, read_features=reads)
    assert (res.probs_after - res.probs_before).abs().max() > 1e-3
    assert [t.prob for t in res.top_after] != [t.prob for t in res.top_before]
    assert res.activations_after[i] == 0 and res.activations_before[i] == graph.activation_values[i]
    later = graph.active_features[:, 0] > l
    assert (res.activations_after - res.activations_before)[later].abs().max() > 1e-3  # downstream features respond
    negative = intervene(rm, TOKENS, [Intervention(l, f, "ablate", positions=[p - len(TOKENS)])])  # counts from the end
    torch.testing.assert_close(negative.logits_after, res.logits_after, atol=0, rtol=0)
    # everything frozen by hand (patterns, norms, every layer constrained) is the direct-only model
    frozen = intervene(rm, TOKENS, ablate, freeze_attention=True, constrained_layers=range(rm.n_layers), read_features=reads)
    direct = intervene(rm, TOKENS, ablate, direct_only=True, read_features=reads)
    torch.testing.assert_close(frozen.logits_after, direct.logits_after, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frozen.pre_activations_after, direct.pre_activations_after, atol=1e-5, rtol=1e-5)
    # the total effect differs from the direct effect, and check_graph reports the gap as a number
    col = int((graph.selected_features == i).nonzero()[0, 0])
    r = check_graph(rm, graph, col, direct_only=False)
    assert r["total_effect_gap"] > 1e-4 and r["logits"]["correlation"] is not None


def test_bad_interventions_raise_typed_errors() -> None:
    rm = build("llama", "plt")
    bad = [
        (lambda: intervene(rm, TOKENS, [Intervention(7, 0)]), "layer 7 out of range"),
        (lambda: intervene(rm, TOKENS, [Intervention(1, 48)]), "feature 48 out of range"),
        (lambda: intervene(rm, TOKENS, [Intervention(1, 2, "set", 1.0, [10])]), "position 10 out of range"),
        (lambda: intervene(rm, TOKENS, [Intervention(1, 2, "set", 1.0, [0])]), "position 0 is a zero"),
        (lambda: intervene(rm, TOKENS, [Intervention(1, 2, "add", 1.0, "generated")]), "'generated' only applies"),
        (lambda: Intervention(1, 2, "multiply", 2.0), "unknown op 'multiply'"),
        (lambda: Intervention.on_error(1, "set", 1.0), "op 'set' is not allowed on the error node of layer 1"),
        (lambda: Intervention(1, 2, "add", float("nan")), "value must be finite"),
        (lambda: Intervention(1, 2, positions="some"), "unknown positions 'some'"),
        (lambda: supernode_interventions(Supernode("empty", []), "ablate"), "'empty' has no features"),
        (lambda: intervene(rm, TOKENS, [], read_features=[(0, 3, 99)]), "feature 99 out of range"),
        (lambda: intervene(rm, TOKENS, [], constrained_layers=[5]), "constrained layer 5 out of range"),
        (lambda: generate_with_interventions(rm, TOKENS, [Intervention(0, 1, "add", 1.0, [15])], max_new_tokens=5),
         "position 15 out of range"),
    ]
    for call, message in bad:
        with pytest.raises(InterventionError, match=message) as info:
            call()
        assert isinstance(info.value, AttributeRayError) and isinstance(info.value, ValueError)
    graph = attribute(TOKENS, rm, batch_size=64)
    with pytest.raises(InterventionError, match=f"node {graph.token_offset} is not a feature"):
        check_graph(rm, graph, graph.token_offset)


def test_inactive_features_warn_and_change_nothing() -> None:
    from attribute_ray.interventions import intervention_warnings

    rm = build("llama", "plt")
    trace = rm.trace(TOKENS)
    T = len(TOKENS)
    # clean activations computed here from the recorded input sites (BOS position carries no features)
    acts = {l: rm.transcoder.encode(l, trace.inputs[l]).detach()[1:] for l in range(rm.n_layers)}  # [T-1, F]
    layer = 1
    active_any = (acts[layer] != 0).any(0)
    dead = int((~active_any).nonzero()[0])  # inactive at every position
    partial = next(f for f in range(acts[layer].shape[1]) if 0 < int((acts[layer][:, f] != 0).sum()) < T - 1)
    on = int((acts[layer][:, partial] != 0).nonzero()[0]) + 1  # absolute positions
    off = int((acts[layer][:, partial] == 0).nonzero()[0]) + 1

    clean = intervene(rm, TOKENS, [])
    r = intervene(rm, TOKENS, [Intervention(layer, dead, "ablate"), Intervention(layer, dead, "scale", 3.0)])
    assert torch.equal(r.probs_after, clean.probs_after)  # nothing changed ...
    assert r.warnings == [  # ... and both say so
        f"feature {dead} of layer {layer} (ablate): inactive at every prompt position of the clean run, so it changes nothing there",
        f"feature {dead} of layer {layer} (scale): inactive at every prompt position of the clean run, so it changes nothing there",
    ]
    r = intervene(rm, TOKENS, [Intervention(layer, partial, "ablate", positions=[on, off - T])])  # negative: from the end
    assert r.warnings == [f"feature {partial} of layer {layer} (ablate): inactive at position {off} of the clean run, "
                          "so it changes nothing there"]
    assert not torch.equal(r.probs_after, clean.probs_after)
    # ops that change a zero activation, error nodes and active features: no warning
    assert intervene(rm, TOKENS, [Intervention(layer, dead, "set", 2.0), Intervention(layer, dead, "add", 1.0),
                                  Intervention.on_error(layer, "ablate"), Intervention(layer, partial, "ablate")]).warnings == []
    # generation: "generated" cannot be checked; "all" is checked on the prompt
    assert intervention_warnings(rm, TOKENS, [Intervention(layer, dead, "ablate", positions="generated")]) == []
    assert len(intervention_warnings(rm, TOKENS, [Intervention(layer, dead, "ablate")])) == 1


def test_node_addresses_are_layer_position_feature() -> None:
    rm = build("llama", "plt")
    graph = attribute(TOKENS, rm, batch_size=64)
    node = tuple(graph.selected_nodes[0].tolist())  # (layer, position, feature)
    iv = Intervention.at(node, "scale", 0.5)
    assert iv == Intervention(node[0], node[2], "scale", 0.5, (node[1],))
    r = intervene(rm, TOKENS, [Intervention.at(node)], read_features=[node])  # the same tuple reads it back
    assert float(r.activations_before[0]) == float(graph.activation_values[graph.selected_features[0]])
    assert float(r.activations_after[0]) == 0.0
    assert graph.top_features(1)[0] in {(n[0], n[2]) for n in graph.selected_nodes.tolist()}  # (layer, feature)
    with pytest.raises(InterventionError, match=r"a node is \(layer, position, feature\)"):
        Intervention.at((1, 2))
