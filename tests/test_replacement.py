"""The local replacement model: exact reproduction, correct sites, and exact linearity of the frozen model."""

from __future__ import annotations

import pytest
import torch

from attribute_ray.errors import ShapeMismatchError, UnsupportedModelError
from attribute_ray.replacement import Additions, ReplacementModel
from attribute_ray.tiny import FAMILIES, save_tiny_model, tiny_model, tiny_tokenizer, transcoder_for
from attribute_ray.transcoders import Activation, Hookpoints, load_transcoder, save_sparsify

TOKENS = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 12, 13])  # <bos> + 9 words; 0 is BOS
TRANSCODERS = {
    "plt": dict(kind="plt"),
    "skip-plt": dict(kind="plt", skip=True),
    "clt": dict(kind="clt", activation=Activation("jumprelu")),
    "skip-concat-gated": dict(kind="concat", skip=True, gates=True),
}


def build(family: str, tc: str = "plt", hookpoints: Hookpoints = Hookpoints(), **kw) -> ReplacementModel:
    model, tok = tiny_model(family)
    return ReplacementModel(model, tok, transcoder_for(model, hookpoints=hookpoints, **TRANSCODERS[tc], **kw))


def plain_logits(rm: ReplacementModel, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return rm.model(input_ids=tokens[None]).logits[0]


@pytest.mark.parametrize("tc", list(TRANSCODERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_replacement_forward_reproduces_model(family: str, tc: str) -> None:
    rm = build(family, tc)
    ref = plain_logits(rm)
    trace = rm.trace(TOKENS)
    assert (trace.logits - ref).abs().max() <= 1e-4
    # MLPs never run here: every MLP output is the transcoder on the live input plus the recorded error.
    replaced = rm.run_replaced(trace).logits[0]
    assert (replaced - ref).abs().max() <= 1e-4
    # ... and the error term is what makes it exact (the transcoders are random, so it matters a lot).
    assert (rm.run_replaced(trace, with_errors=False).logits[0] - ref).abs().max() > 1e-2
    # Frozen replay (recorded patterns, norm scales and MLP outputs) is the same function at this point.
    assert (rm.run_frozen(trace).logits[0] - ref).abs().max() <= 1e-4


def _independent_sites(rm: ReplacementModel, site_in: str, site_out: str) -> tuple[list, list]:
    """Capture input/output site tensors with our own hooks on the HF modules (docs/formats.md §d)."""
    fam, ins, outs, hooks = rm.family, [], [], []
    for layer in rm.layers:
        norm, mlp = fam.get(layer, fam.mlp_norm), fam.get(layer, fam.mlp)

        def on_norm(m, args, out, norm=norm):
            x = args[0]
            if site_in == "resid_mid":
                ins.append(x[0])
            elif site_in == "mlp_in_normalized":
                if fam.norm == "layernorm":
                    ins.append(((out - m.bias) / m.weight)[0])
                elif fam.norm == "rms_gemma":
                    ins.append((out / (1 + m.weight))[0])
                else:
                    ins.append((out / m.weight)[0])

        hooks.append(norm.register_forward_hook(on_norm))
        if site_in == "mlp_in":
            hooks.append(mlp.register_forward_pre_hook(lambda m, a: ins.append(a[0][0])))
        post = fam.get(layer, fam.post_mlp_norm) if (fam.post_mlp_norm and site_out == "mlp_out_normed") else mlp
        hooks.append(post.register_forward_hook(lambda m, a, out: outs.append(out[0])))
    try:
        plain_logits(rm)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


@pytest.mark.parametrize("site_in", ["mlp_in", "resid_mid", "mlp_in_normalized"])
@pytest.mark.parametrize("site_out", ["mlp_out", "mlp_out_normed"])
@pytest.mark.parametrize("family", ["gemma2", "llama", "gpt2"])
def test_hookpoint_sites(family: str, site_in: str, site_out: str) -> None:
    rm = build(family, "skip-plt", Hookpoints(site_in, site_out))
    trace = rm.trace(TOKENS)
    ins, outs = _independent_sites(rm, site_in, site_out)
    for l in range(rm.n_layers):
        torch.testing.assert_close(trace.inputs[l], ins[l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.mlp_outputs[l], outs[l], atol=1e-5, rtol=1e-5)
        # y = ŷ + e away from the zero (BOS) position; at BOS the error node is zeroed.
        torch.testing.assert_close(trace.reconstructions[l][1:] + trace.errors[l][1:], outs[l][1:], atol=1e-5, rtol=1e-5)
        assert torch.all(trace.errors[l][0] == 0)
    assert (trace.logits - plain_logits(rm)).abs().max() <= 1e-4
    if family == "gemma2":  # the two output sites really differ for Gemma-2
        other = _independent_sites(rm, site_in, "mlp_out" if site_out == "mlp_out_normed" else "mlp_out_normed")[1]
        assert (other[0] - outs[0]).abs().max() > 1e-2


@pytest.mark.parametrize("tc", ["skip-plt", "clt", "skip-concat-gated"])
def test_node_vectors_recompose_the_trace(tc: str) -> None:
    """Exposed feature vectors recompose the recorded pre-activations and reconstructions."""
    rm = build("llama", tc)
    trace = rm.trace(TOKENS)
    feats, tcd = trace.features, rm.transcoder
    assert len(feats) > 0 and torch.all(feats.positions >= trace.n_zero)
    order = feats.layers * 10**8 + feats.positions * 10**4 + feats.indices
    assert torch.all(order[1:] > order[:-1]), "features must be in (layer, pos, feature) order"
    enc = rm.encoder_vectors(feats)
    pre = (enc * torch.stack([trace.inputs[l][p] for l, p in zip(feats.layers.tolist(), feats.positions.tolist())])).sum(1)
    b = torch.stack([tcd.encoders[l].b[f] for l, f in zip(feats.layers.tolist(), feats.indices.tolist())])
    dense_pre = [tcd.pre_activation(l, trace.inputs[l]) for l in range(rm.n_layers)]
    expect = torch.stack([dense_pre[l][p, f] for l, p, f in feats.as_matrix().tolist()])
    torch.testing.assert_close(pre + b, expect, atol=1e-5, rtol=1e-5)
    for t in range(rm.n_layers):
        rows, vecs = rm.decoder_vectors(feats, t)
        recon = tcd.biases[t].expand(len(TOKENS), -1).clone()
        recon.index_add_(0, feats.positions[rows], vecs)
        skip = tcd.skip(t, trace.inputs)
        if skip is not None:
            recon += skip
        recon[: trace.n_zero] = trace.reconstructions[t][: trace.n_zero]
        torch.testing.assert_close(recon, trace.reconstructions[t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.token_vectors(TOKENS), rm.embedding[TOKENS])
    u = rm.logit_vectors(torch.tensor([3, 7]))
    W_U = rm.model.lm_head.weight  # [vocab, D]
    torch.testing.assert_close(u[1], W_U[7] - W_U.mean(0))


def _demeaned_logit(rm: ReplacementModel, final_resid: torch.Tensor, token: int) -> torch.Tensor:
    return final_resid[..., -1, :] @ rm.logit_vectors(torch.tensor([token]))[0]


@pytest.mark.parametrize("tc", ["plt", "skip-plt", "clt", "skip-concat-gated"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_model_is_linear_and_matches_gradient(family: str, tc: str) -> None:
    rm = build(family, tc)
    trace = rm.trace(TOKENS, linearise=True)
    g = trace.graph
    token = int(trace.logits[-1].argmax())
    target = _demeaned_logit(rm, g.final[0], token)
    grad_embed, grad_mid = torch.autograd.grad(target, [g.embed, g.outputs[1]])

    torch.manual_seed(1)
    d = torch.randn(3, len(TOKENS), rm.d_model)
    base = _demeaned_logit(rm, rm.run_frozen(trace).final_resid, token)

    def delta(add: Additions) -> torch.Tensor:
        return _demeaned_logit(rm, rm.run_frozen(trace, add).final_resid, token) - base

    for add, grad in [(lambda v: Additions(embed=v), grad_embed), (lambda v: Additions(mlp_out={1: v}), grad_mid)]:
        change = delta(add(d))
        # gradient of the linearised graph == finite difference of the frozen model
        torch.testing.assert_close(change, (grad[0] * d).sum((1, 2)), atol=1e-4, rtol=1e-4)
        # exactly linear: twice the vector, twice the change (logit and every feature input site)
        torch.testing.assert_close(delta(add(2 * d)), 2 * change, atol=1e-4, rtol=1e-4)
    one, two = rm.run_frozen(trace, Additions(embed=d)), rm.run_frozen(trace, Additions(embed=2 * d))
    base_inputs = rm.run_frozen(trace).inputs
    for l in range(rm.n_layers):
        torch.testing.assert_close(two.inputs[l] - base_inputs[l], 2 * (one.inputs[l] - base_inputs[l]), atol=1e-4, rtol=1e-4)


def test_unfrozen_model_is_not_linear() -> None:
    """Control for the linearity test: without freezing, doubling a perturbation does not double its effect."""
    rm = build("llama", "skip-plt")
    trace = rm.trace(TOKENS)
    d = torch.randn(1, len(TOKENS), rm.d_model)
    base = rm.run_replaced(trace).logits
    one = rm.run_replaced(trace, Additions(embed=d)).logits - base
    two = rm.run_replaced(trace, Additions(embed=2 * d)).logits - base
    assert (two - 2 * one).abs().max() > 1e-2


def test_tokenize_prepends_special_token() -> None:
    rm = build("llama")
    ids = rm.tokenize("the capital of france is")
    assert ids[0] == 0 and ids.tolist()[1:] == rm.tokenizer("the capital of france is", add_special_tokens=False).input_ids
    assert rm.tokenize([0, 5, 6]).tolist() == [0, 5, 6]  # already special (BOS id 0 is a real BOS)
    assert rm.tokenize([5, 6]).tolist() == [0, 5, 6]
    with pytest.raises(ValueError, match="empty"):
        rm.tokenize("")


def test_shape_mismatches_name_both_numbers() -> None:
    model, tok = tiny_model("llama")
    with pytest.raises(ShapeMismatchError, match="d_model=16.*d_model=32"):
        ReplacementModel(model, tok, _tc(3, 16))
    with pytest.raises(ShapeMismatchError, match="2 layers.*3"):
        ReplacementModel(model, tok, _tc(2, 32))


def _tc(n_layers: int, d_model: int):
    from attribute_ray.tiny import random_transcoder

    return random_transcoder(n_layers, d_model)


def test_unsupported_family() -> None:
    from transformers import AutoModelForCausalLM, OPTConfig

    model = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(UnsupportedModelError, match="opt"):
        ReplacementModel(model, tiny_tokenizer(), _tc(2, 32))


def test_from_pretrained_local_directories(tmp_path) -> None:
    model_dir = save_tiny_model(tmp_path / "model", "qwen3", seed=3)
    model, _ = tiny_model("qwen3", seed=3)
    tc_dir = save_sparsify(transcoder_for(model, kind="concat", skip=True, gates=True), tmp_path / "tc")
    rm = ReplacementModel.from_pretrained(str(model_dir), str(tc_dir))
    assert rm.transcoder.format == "sparsify" and rm.transcoder.is_cross_layer
    trace = rm.trace(rm.tokenize("the capital of france is"))
    torch.testing.assert_close(trace.logits, plain_logits(rm, trace.tokens), atol=1e-4, rtol=1e-4)
    # the same weights loaded twice give the same reconstruction
    again = ReplacementModel(model, tiny_tokenizer(), load_transcoder(tc_dir)).trace(trace.tokens)
    torch.testing.assert_close(again.reconstructions[2], trace.reconstructions[2], atol=1e-5, rtol=1e-5)


def test_input_activations_match_trace_for_a_batch() -> None:
    rm = build("gemma2", "skip-plt", Hookpoints("mlp_in_normalized", "mlp_out_normed"))
    batch = torch.stack([TOKENS, torch.flip(TOKENS, [0])])
    inputs = rm.input_activations(batch)
    for b in range(2):
        trace = rm.trace(batch[b])
        for l in range(rm.n_layers):
            torch.testing.assert_close(inputs[l][b], trace.inputs[l], atol=1e-5, rtol=1e-5)


# ----- attention without stored patterns (long prompts: docs/memory.md) ---------------------------


def _batched_grads(rm: ReplacementModel, tokens: torch.Tensor, keep_patterns: bool) -> tuple:
    """(trace, gradients at every output site and the embedding) for 3 random targets injected at layer 2's input
    site and 2 at the final-norm output, pulled back together as in attribution (is_grads_batched)."""
    trace = rm.trace(tokens, linearise=True, keep_patterns=keep_patterns)
    g, gen = trace.graph, torch.Generator().manual_seed(1)
    at_input = torch.randn(5, 1, len(tokens), rm.d_model, generator=gen)
    at_final = torch.randn(5, 1, len(tokens), rm.d_model, generator=gen)
    at_input[3:], at_final[:3] = 0, 0
    grads = torch.autograd.grad([g.inputs[2], g.final], [*g.outputs, g.embed], [at_input, at_final],
                                is_grads_batched=True, allow_unused=True)
    return trace, [x if x is not None else torch.zeros(5, 1, len(tokens), rm.d_model) for x in grads]


@pytest.mark.parametrize("family", FAMILIES)
def test_block_attention_gradients_match_stored_patterns(family: str, monkeypatch) -> None:
    """Without stored patterns (query blocks of 3 rows here, recomputed in the backward), the linearised graph's
    batched gradients are the stored-pattern graph's to float rounding, in every family (GQA, softcap, sliding
    window, GPT-2's own causal mask)."""
    import attribute_ray.replacement as replacement

    rm = build(family, "skip-plt")
    tokens = torch.randint(3, 64, (23,), generator=torch.Generator().manual_seed(2))
    ref_trace, ref = _batched_grads(rm, tokens, keep_patterns=True)
    monkeypatch.setattr(replacement, "PATTERN_BLOCK_BYTES", 3 * 4 * rm.model.config.num_attention_heads * len(tokens))
    assert [b[:2] for b in replacement._query_blocks(torch.ones(1, 1, 23, 23).tril().log(), 4, 23)][-2:] == [(18, 21), (21, 23)]
    trace, got = _batched_grads(rm, tokens, keep_patterns=False)
    assert trace.patterns == [] and len(ref_trace.patterns) == rm.n_layers
    torch.testing.assert_close(trace.logits, ref_trace.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
    assert sum(float(b.abs().sum()) for b in ref[:-1]) > 0  # the gradients are not trivially zero


def test_query_blocks_follow_the_mask(monkeypatch) -> None:
    import attribute_ray.replacement as replacement

    monkeypatch.setattr(replacement, "PATTERN_BLOCK_BYTES", 2 * 4 * 10)  # 2 query rows of 1 head × 10 keys
    causal = torch.full((10, 10), torch.finfo(torch.float32).min).triu(1)[None, None]
    blocks = replacement._query_blocks(causal, 1, 10)
    assert blocks == [(0, 2, 2), (2, 4, 4), (4, 6, 6), (6, 8, 8), (8, 10, 10)]  # each block: keys up to its end
    window = causal.masked_fill(torch.ones(10, 10, dtype=torch.bool).tril(-3), torch.finfo(torch.float32).min)
    assert replacement._query_blocks(window, 1, 10) == blocks  # a sliding window is causal too
    ahead = causal.clone()
    ahead[..., 3, 7] = 0  # query 3 sees key 7: one block of every row, the plain eager call
    assert replacement._query_blocks(ahead, 1, 10) == [(0, 10, 10)]
    assert replacement._query_blocks(None, 1, 10) == [(0, 10, 10)]
    assert replacement._query_blocks(torch.ones(1, 1, 10, 10, dtype=torch.bool).tril(), 1, 10) == blocks


def test_trace_without_patterns_cannot_be_replayed() -> None:
    rm = build("llama")
    trace = rm.trace(TOKENS, keep_patterns=False)
    torch.testing.assert_close(trace.logits, plain_logits(rm), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="keep_patterns=False"):
        rm.run_frozen(trace)
    rm.run_replaced(trace)  # live attention needs no pattern


def test_attribution_without_stored_patterns_is_the_same_graph(monkeypatch) -> None:
    """The call attribution makes for long prompts (trace(linearise=True, keep_patterns=False)) gives the graph of
    the stored-pattern trace."""
    from attribute_ray.attribution import attribute

    rm = build("qwen2", "clt")
    ref = attribute(TOKENS, rm, max_feature_nodes=20)
    trace = ReplacementModel.trace
    monkeypatch.setattr(ReplacementModel, "trace", lambda self, tokens, linearise=False, keep_patterns=True:
                        trace(self, tokens, linearise=linearise, keep_patterns=keep_patterns and not linearise))
    got = attribute(TOKENS, rm, max_feature_nodes=20)
    assert torch.equal(got.selected_features, ref.selected_features)
    assert (got.rows - ref.rows).abs().max() <= 1e-5 * ref.rows.abs().max()
