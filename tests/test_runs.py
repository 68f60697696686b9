"""Run strategies of the replacement model against independent references: capture equals plain HF hooks on
the MLP modules, ``Replaced(None)`` equals a hand-written "MLP output ← transcoder" forward, an edit moves each
target's output by exactly (gated(new) − gated(old))·W_dec, and a model without a transcoder only captures."""

from __future__ import annotations

import pytest
import torch

from attribute_ray.errors import NoTranscoderError
from attribute_ray.families import family_for
from attribute_ray.replacement import (
    Additions,
    Capture,
    Edit,
    Frozen,
    Record,
    Replaced,
    ReplacementModel,
)
from attribute_ray.tiny import FAMILIES, tiny_model, transcoder_for
from attribute_ray.transcoders import Activation, Hookpoints, Transcoder

TOKENS = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 12, 13])
BATCH = torch.stack([TOKENS, torch.flip(TOKENS, [0]), (TOKENS * 3) % 60])
MLP_SITES = Hookpoints("mlp_in", "mlp_out")


def reference_mlp_sites(model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's MLP module input and output, from forward hooks on the plain HF model."""
    fam = family_for(model.config)
    ins, outs, handles = {}, {}, []
    for l, layer in enumerate(fam.decoder_layers(model)):
        mlp = fam.get(layer, fam.mlp)
        handles.append(mlp.register_forward_pre_hook(lambda m, args, l=l: ins.__setitem__(l, args[0])))
        handles.append(mlp.register_forward_hook(lambda m, args, out, l=l: outs.__setitem__(l, out)))
    try:
        with torch.no_grad():
            model.base_model(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    return [ins[l] for l in sorted(ins)], [outs[l] for l in sorted(outs)]


def reference_replacement_logits(model, tc: Transcoder, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] with every MLP output replaced by the transcoder on the live MLP inputs; position 0
    keeps the real MLP output (it carries no features)."""
    fam = family_for(model.config)
    inputs, acts, handles = {}, {}, []

    def pre(l: int, x: torch.Tensor) -> None:
        inputs[l] = x.reshape(-1, x.shape[-1])
        acts[l] = tc.encode_sparse(l, inputs[l])

    def post(l: int, out: torch.Tensor) -> torch.Tensor:
        rec = tc.decode(l, acts, inputs).view(out.shape)
        rec[:, :1] = out[:, :1]
        return rec

    for l, layer in enumerate(fam.decoder_layers(model)):
        mlp = fam.get(layer, fam.mlp)
        handles.append(mlp.register_forward_pre_hook(lambda m, args, l=l: pre(l, args[0])))
        handles.append(mlp.register_forward_hook(lambda m, args, out, l=l: post(l, out)))
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_hooks_on_the_mlp_modules(family: str) -> None:
    reference, _ = tiny_model(family)  # an untouched copy: the ReplacementModel swaps the attention function
    ref_in, ref_out = reference_mlp_sites(reference, BATCH)
    model, tok = tiny_model(family)
    rm = ReplacementModel(model, tok, None, hookpoints=MLP_SITES)
    got = rm.capture(BATCH, outputs=True)
    assert len(got.inputs) == len(got.outputs) == rm.n_layers
    for l in range(rm.n_layers):
        assert got.inputs[l].shape == (*BATCH.shape, rm.d_model) and not got.inputs[l].requires_grad
        torch.testing.assert_close(got.inputs[l], ref_in[l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.outputs[l], ref_out[l], atol=1e-5, rtol=1e-5)
    inputs_only = rm.capture(BATCH, outputs=False)
    assert inputs_only.outputs is None
    for a, b in zip(inputs_only.inputs, rm.input_activations(BATCH)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_of_the_first_layers_stops_the_forward_after_them(family: str) -> None:
    model, tok = tiny_model(family)
    rm = ReplacementModel(model, tok, None, hookpoints=MLP_SITES)
    full = rm.capture(BATCH)
    ran: list[int] = []
    layers = family_for(model.config).decoder_layers(model)
    handles = [layer.register_forward_pre_hook(lambda m, a, l=l: ran.append(l)) for l, layer in enumerate(layers)]
    try:
        part = rm.capture(BATCH, n_layers=2)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]  # layer 2 never ran
    assert len(part.inputs) == len(part.outputs) == 2
    for l in range(2):
        torch.testing.assert_close(part.inputs[l], full.inputs[l], atol=0, rtol=0)
        torch.testing.assert_close(part.outputs[l], full.outputs[l], atol=0, rtol=0)
    again = rm.capture(BATCH)  # the stop is gone: the whole model runs again
    torch.testing.assert_close(again.outputs[-1], full.outputs[-1], atol=0, rtol=0)
    for bad in (0, rm.n_layers + 1):
        with pytest.raises(ValueError, match=f"n_layers must be in 1..{rm.n_layers}"):
            rm.capture(BATCH, n_layers=bad)


@pytest.mark.parametrize("tc_kind", ["plt", "clt"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_replaced_without_trace_equals_the_transcoder_in_place_of_the_mlp(family: str, tc_kind: str) -> None:
    reference, _ = tiny_model(family)
    tc = transcoder_for(reference, kind=tc_kind, activation=Activation("jumprelu") if tc_kind == "clt" else Activation("topk", k=6))
    ref = reference_replacement_logits(reference, tc, BATCH)
    model, tok = tiny_model(family)
    rm = ReplacementModel(model, tok, tc)
    out = rm.run(Replaced(None), BATCH)
    assert out.logits.shape == ref.shape and not out.logits.requires_grad
    torch.testing.assert_close(out.logits, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    with torch.no_grad():
        plain = model(input_ids=BATCH).logits
    assert (out.logits - plain).abs().max() > 1e-2  # the random transcoder really replaces the MLP
    # on one prompt it is the trace-based replaced run without its error term
    single = rm.run(Replaced(None), TOKENS).logits[0]
    torch.testing.assert_close(single, rm.run_replaced(rm.trace(TOKENS), with_errors=False).logits[0], atol=1e-5, rtol=0)


class ScaleFeature(Edit):
    """Multiplies feature `feature` of `layer` by `factor` at `position`; remembers what it was shown."""

    def __init__(self, layer: int, feature: int, position: int, factor: float):
        self.layer, self.feature, self.position, self.factor = layer, feature, position, factor
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def activations(self, layer: int, activations: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.seen[layer] = (activations.clone(), positions.clone())
        if layer == self.layer:
            activations[:, self.position, self.feature] *= self.factor
        return activations


def _expected_change(tc: Transcoder, source: int, target: int, feature: int, old: float, new: float) -> torch.Tensor:
    """(gated(new) − gated(old))·W_dec[source, target][f], the gate written out: (a + offset·1[a > 0])·scale·coef."""
    dec = tc.decoders[(source, target)]

    def gated(a: float) -> float:
        off = float(dec.offset[feature]) if dec.offset is not None else 0.0
        sc = float(dec.scale[feature]) if dec.scale is not None else 1.0
        return (a + off * (a > 0)) * sc * dec.coef

    return (gated(new) - gated(old)) * dec.W[feature]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_an_edit_changes_each_target_output_by_its_decoder_vector(family: str) -> None:
    model, tok = tiny_model(family)
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="concat", gates=True))  # CLT, gated, no skip
    tc, trace = rm.transcoder, rm.trace(TOKENS)
    f = trace.features
    i = int((f.layers == 0).nonzero()[0, 0])  # a layer-0 feature: it writes to every layer
    layer, pos, feat, a = int(f.layers[i]), int(f.positions[i]), int(f.indices[i]), float(f.raw[i])

    # frozen model: every target's output moves by exactly its Δ (nothing else responds)
    edit = ScaleFeature(layer, feat, pos, 3.0)
    base, edited = rm.run(Frozen(trace), TOKENS), rm.run(Frozen(trace, edit=edit), TOKENS)
    for t in range(rm.n_layers):
        change = torch.zeros(len(TOKENS), rm.d_model)
        change[pos] = _expected_change(tc, layer, t, feat, a, 3 * a)
        torch.testing.assert_close(edited.outputs[t][0] - base.outputs[t][0], change, atol=1e-5, rtol=0)
    # the frozen edit shows the recorded activations, zero at the BOS position
    shown, positions = edit.seen[layer]
    assert shown.shape == (1, len(TOKENS), tc.n_features(layer)) and float(shown[0, pos, feat]) == a
    assert positions.tolist() == list(range(len(TOKENS))) and shown[:, 0].abs().max() == 0
    # ... and it is the frozen model plus those vectors as additions
    add = Additions(mlp_out={t: edited.outputs[t][0] - base.outputs[t][0] for t in range(rm.n_layers)})
    torch.testing.assert_close(edited.logits, rm.run(Frozen(trace, add), TOKENS).logits, atol=1e-5, rtol=0)

    # replaced model: at the feature's own layer the inputs have not moved yet, so the change is exactly Δ
    edit = ScaleFeature(layer, feat, pos, 0.5)
    base, edited = rm.run(Replaced(trace), TOKENS), rm.run(Replaced(trace, edit=edit), TOKENS)
    change = torch.zeros(len(TOKENS), rm.d_model)
    change[pos] = _expected_change(tc, layer, layer, feat, a, 0.5 * a)
    torch.testing.assert_close(edited.outputs[layer][0] - base.outputs[layer][0], change, atol=1e-5, rtol=0)
    assert (edited.logits - base.logits).abs().max() > 1e-4
    # the replaced edit shows the live activations: the encoder on the live input, zero at the BOS position
    shown, _ = edit.seen[1]
    live = tc.encode(1, edited.inputs[1][0])
    live[0] = 0
    torch.testing.assert_close(shown[0], live, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_identity_edits_change_nothing(family: str) -> None:
    model, tok = tiny_model(family)
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="clt", skip=True, gates=True, activation=Activation("jumprelu")))
    trace = rm.trace(TOKENS)
    identity = ScaleFeature(1, 3, 4, 1.0)
    for edited, base in [
        (rm.run(Replaced(trace, edit=identity), TOKENS), rm.run_replaced(trace)),
        (rm.run(Replaced(trace, edit=Edit()), TOKENS), rm.run_replaced(trace)),
        (rm.run(Replaced(trace, with_errors=False, edit=Edit()), TOKENS), rm.run_replaced(trace, with_errors=False)),
        (rm.run(Frozen(trace, edit=identity), TOKENS), rm.run_frozen(trace)),
    ]:
        torch.testing.assert_close(edited.logits, base.logits, atol=0, rtol=0)
    # an error factor of 0 on every layer is the replaced model without errors
    class NoErrors(Edit):
        def error_factor(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(positions))

    no_err = rm.run(Replaced(trace, edit=NoErrors()), TOKENS).logits
    torch.testing.assert_close(no_err, rm.run_replaced(trace, with_errors=False).logits, atol=1e-5, rtol=0)


class PositionsSeen(Edit):
    """Changes nothing; records the positions each forward shows layer 0."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def activations(self, layer: int, activations: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            self.seen.append(positions.tolist())
        return activations


def test_live_errors_are_the_real_model_and_edits_see_kv_cache_positions() -> None:
    model, tok = tiny_model("llama", seed=2)
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="concat", skip=True, gates=True))
    with torch.no_grad():
        plain = model(input_ids=BATCH).logits
    torch.testing.assert_close(rm.run(Replaced(None, live_errors=True), BATCH).logits, plain, atol=1e-5, rtol=0)
    edit = PositionsSeen()
    with torch.no_grad(), rm.hooks(Replaced(None, edit=edit, live_errors=True)):
        hooked = model.generate(TOKENS[None], do_sample=False, max_new_tokens=3)
    T = len(TOKENS)
    assert edit.seen == [list(range(T)), [T], [T + 1]]  # one forward per step, each at its absolute position
    assert hooked.tolist() == model.generate(TOKENS[None], do_sample=False, max_new_tokens=3).tolist()


def test_record_is_the_real_model() -> None:
    model, tok = tiny_model("qwen3")
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="plt", skip=True))
    ref_in, ref_out = reference_mlp_sites(tiny_model("qwen3")[0], BATCH)
    out = rm.run(Record(), BATCH)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(input_ids=BATCH).logits, atol=1e-4, rtol=0)
    for l in range(rm.n_layers):
        torch.testing.assert_close(out.inputs[l], ref_in[l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.outputs[l], ref_out[l], atol=1e-5, rtol=1e-5)
    trace = rm.trace(TOKENS)
    torch.testing.assert_close(rm.run(Capture(), TOKENS).logits[0], trace.logits, atol=1e-5, rtol=0)


def test_without_a_transcoder_only_capture_runs() -> None:
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="needs hookpoints"):
        ReplacementModel(model, tok, None)
    rm = ReplacementModel(model, None, None, hookpoints=MLP_SITES)
    assert rm.transcoder is None and rm.hookpoints == MLP_SITES
    assert rm.run(Capture(outputs=False), BATCH).outputs == []
    for strategy in (Record(), Replaced(None)):
        with pytest.raises(NoTranscoderError, match=f"{type(strategy).__name__} runs need a transcoder.*transcoder=None"):
            rm.run(strategy, BATCH)
    with pytest.raises(NoTranscoderError, match="need a transcoder"):
        rm.trace(TOKENS)
    tc = transcoder_for(model)
    with pytest.raises(ValueError, match="hookpoints"):
        ReplacementModel(model, tok, tc, hookpoints=Hookpoints("resid_mid", "mlp_out"))
    trace = ReplacementModel(model, tok, tc).trace(TOKENS)
    with pytest.raises(ValueError, match="live_errors"):
        Replaced(trace, live_errors=True)
    with pytest.raises(ValueError, match="replay a trace"):
        Replaced(None, frozen_layers={1})
