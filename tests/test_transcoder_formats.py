"""Transcoder file formats: loaders checked against the formulas of docs/formats.md written out here with plain
torch, writer round trips, GemmaScope npz, clear errors and hub resolution (with a fake snapshot_download).

Everything is CPU-only, offline and small (L=3..4, D=16, F=24, N=10 tokens).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from attribute_ray.errors import (
    HubUnavailableError,
    TranscoderFormatError,
    UnknownActivationError,
)
from attribute_ray.hub import HubRef
from attribute_ray.tiny import random_transcoder
from attribute_ray.transcoders import (
    Activation,
    Hookpoints,
    Transcoder,
    load_transcoder,
    save_circuit_tracer,
    save_sparsify,
)

D, F, N, K = 16, 24, 10, 5
TOL = dict(atol=1e-5, rtol=1e-5)


def rnd(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def make_inputs(L: int, seed: int = 100) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [rnd(g, N, D) for _ in range(L)]


def assert_outputs_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, t=t: f"layer {t}: {m}")


# =============================================================================================
# 1. sparsify / clt-training files written by hand vs the formula
# =============================================================================================


def write_sparsify(root: Path, layers: list[tuple[dict, dict[str, torch.Tensor]]], prefix: str = "layers") -> Path:
    for i, (cfg, tensors) in enumerate(layers):
        folder = root / f"{prefix}.{i}.mlp"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(cfg))
    return root


def sparsify_layers(
    L: int,
    mode: str,
    *,
    skip: bool = False,
    gates: bool = False,
    gate_scale: bool = False,
    normalize_io: bool = False,
    divide: bool = False,
    window: int | None = None,
    bias_shift: float = 0.2,
    seed: int = 0,
) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """Random (cfg, tensors) per layer, laid out like clt-training writes them.

    mode: "plt" | "none" | "tied" (per_source_tied) | "concat" | "per-layer". `window` caps n_targets;
    a negative `bias_shift` leaves fewer than k positive pre-activations on many tokens."""
    g = torch.Generator().manual_seed(seed)
    n_targets = [1 if mode == "plt" else min(window or L, L - s) for s in range(L)]
    n_sources = [sum(1 for s in range(L) if s <= t < s + n_targets[s]) for t in range(L)]
    out = []
    for s in range(L):
        cfg = {
            "d_in": D, "num_latents": F, "k": K, "activation": "topk", "transcode": True,
            "skip_connection": skip, "n_targets": 0 if mode == "plt" else n_targets[s],
            "n_sources": 0 if mode == "plt" else n_sources[s],
            "coalesce_topk": {"concat": "concat", "per-layer": "per-layer"}.get(mode, "none"),
            "topk_coalesced": False, "normalize_io": normalize_io, "post_encoder_scale": gate_scale,
            "divide_cross_layer": divide, "per_source_tied": mode == "tied",
        }
        t = {"encoder.weight": rnd(g, F, D, scale=D**-0.5), "encoder.bias": rnd(g, F, scale=0.3) + bias_shift}
        if normalize_io:
            t["in_norm"] = torch.tensor([2.0 + s])
            t["out_norm"] = torch.tensor([1.5 + 0.5 * s])
        if mode == "plt":
            t["W_dec"] = rnd(g, F, D, scale=0.3)
            t["b_dec"] = rnd(g, D, scale=0.1)
            if skip:
                t["W_skip"] = rnd(g, D, D, scale=0.3 * D**-0.5)
            if gates:
                t["post_enc"] = rnd(g, F).abs() * 0.3
            if gate_scale:
                t["post_enc_scale"] = 1.0 + rnd(g, F, scale=0.2)
        else:
            for j in range(n_targets[s]):
                if mode in ("none", "tied"):
                    if mode == "none":
                        t[f"W_decs.{j}"] = rnd(g, F, D, scale=0.3)
                    t[f"b_decs.{j}"] = rnd(g, D, scale=0.1)
                    if skip:
                        t[f"W_skips.{j}"] = rnd(g, D, D, scale=0.3 * D**-0.5)
                t[f"post_encs.{j}"] = rnd(g, F).abs() * 0.3 if gates else torch.zeros(F)
                if gate_scale:
                    t[f"post_enc_scales.{j}"] = 1.0 + rnd(g, F, scale=0.2)
            if mode == "none":
                t["W_dec"] = t["W_decs.0"].clone()  # the alias clt-training also stores
            elif mode == "tied":
                t["W_dec"] = rnd(g, F, D, scale=0.3)
            else:  # concat / per-layer: the target's own decoder
                rows = F * (n_sources[s] if mode == "per-layer" else 1)
                t["W_dec"] = rnd(g, rows, D, scale=0.3)
                t["b_dec"] = rnd(g, D, scale=0.1)
                if skip:
                    t["W_skip"] = rnd(g, D, D, scale=0.3 * D**-0.5)
        out.append((cfg, t))
    return out


def reference_sparsify(layers: list[tuple[dict, dict[str, torch.Tensor]]], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The clt-training forward, dense and written out independently of the library."""
    L = len(layers)
    cfg0 = layers[0][0]
    mode = cfg0["coalesce_topk"]
    plt = cfg0["n_targets"] == 0
    nt = [1 if plt else c["n_targets"] for c, _ in layers]
    live = [[s for s in range(L) if s <= t < s + nt[s]] for t in range(L)]

    def io(s):
        cfg, t = layers[s]
        if cfg["normalize_io"]:
            return math.sqrt(D) / t["in_norm"].item(), t["out_norm"].item() / math.sqrt(D)
        return 1.0, 1.0

    xh = [xs[s] * io(s)[0] for s in range(L)]
    acts = []
    for s, (cfg, t) in enumerate(layers):
        z = torch.relu(xh[s] @ t["encoder.weight"].T + t["encoder.bias"])
        vals, idx = z.topk(cfg["k"], dim=-1)
        a = torch.zeros_like(z)
        for n in range(z.shape[0]):
            a[n, idx[n]] = vals[n]
        acts.append(a)

    def gated(s, j):
        t = layers[s][1]
        a = acts[s]
        off = t.get("post_enc" if plt else f"post_encs.{j}")
        sc = t.get("post_enc_scale" if plt else f"post_enc_scales.{j}")
        if off is not None:
            a = a + off[None, :] * (a > 0).float()
        if sc is not None:
            a = a * sc[None, :]
        return a

    ys = []
    for T in range(L):
        cfg_T, t_T = layers[T]
        o = io(T)[1]
        if plt:
            y = gated(T, 0) @ t_T["W_dec"] + t_T["b_dec"]
            if cfg_T["skip_connection"]:
                y = y + xh[T] @ t_T["W_skip"].T
        elif mode == "none":

            def term(s, j):
                cfg_s, t_s = layers[s]
                W = t_s["W_dec"] if cfg_s["per_source_tied"] else t_s[f"W_decs.{j}"]
                r = gated(s, j) @ W + t_s[f"b_decs.{j}"]
                if cfg_s["skip_connection"]:
                    r = r + xh[s] @ t_s[f"W_skips.{j}"].T
                return r

            d = max(1, len(live[T]) - 1) if cfg_T["divide_cross_layer"] else 1
            cross = sum((term(s, T - s) for s in live[T] if s < T), torch.zeros(N, D))
            y = term(T, 0) + cross / d
        else:
            y = t_T["b_dec"].expand(N, D).clone()
            for i, s in enumerate(live[T]):
                W = t_T["W_dec"] if mode == "concat" else t_T["W_dec"][i * F : (i + 1) * F]
                y = y + gated(s, T - s) @ W
            if cfg_T["skip_connection"]:
                y = y + xh[T] @ t_T["W_skip"].T
        ys.append(o * y)
    return ys


SPARSIFY_CASES = {
    "plt": dict(L=3, mode="plt"),
    "plt_skip_gates": dict(L=3, mode="plt", skip=True, gates=True, gate_scale=True),
    "plt_skip_gates_normio": dict(L=3, mode="plt", skip=True, gates=True, gate_scale=True, normalize_io=True),
    "none_skip_gates_normio_divide": dict(L=4, mode="none", skip=True, gates=True, gate_scale=True, normalize_io=True, divide=True),
    "none_window_nodivide": dict(L=4, mode="none", skip=True, gates=True, window=2),
    "none_zero_post_encs": dict(L=3, mode="none"),
    # fewer than k positive pre-activations: TopK(ReLU(.)) must not keep negative ones
    "plt_mostly_negative": dict(L=3, mode="plt", gates=True, bias_shift=-1.0),
    "none_mostly_negative": dict(L=3, mode="none", skip=True, gates=True, bias_shift=-1.0),
    "per_source_tied": dict(L=3, mode="tied", skip=True, gates=True, gate_scale=True, divide=True),
    # the layout of the default SmolLM2 CLT
    "concat_smollm2": dict(L=3, mode="concat", skip=True, gates=True, gate_scale=True, normalize_io=True),
    "per_layer_coalesced": dict(L=4, mode="per-layer", skip=True, gates=True, gate_scale=True, window=3),
}


@pytest.mark.parametrize("case", sorted(SPARSIFY_CASES))
def test_sparsify_hand_written_matches_formula(tmp_path, case):
    kw = dict(SPARSIFY_CASES[case])
    L = kw.pop("L")
    layers = sparsify_layers(L, **kw)
    tc = load_transcoder(write_sparsify(tmp_path, layers))
    assert tc.n_layers == L and tc.format == "sparsify"
    assert tc.hookpoints == Hookpoints("mlp_in", "mlp_out")
    assert tc.activation == Activation("topk", k=K, relu_before_topk=True)
    xs = make_inputs(L)
    want = reference_sparsify(layers, xs)
    assert_outputs_close(tc.forward(xs), want)
    if kw.get("bias_shift", 0) < 0:  # the case must really have tokens with fewer than k active features
        assert ((tc.encode(0, xs[0]) != 0).sum(-1) < K).any()
    if kw.get("gates") or kw.get("skip"):  # the gates/skips must matter, or this check could not catch their loss
        assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(want, reference_sparsify(strip_gates_and_skips(layers), xs)))


def strip_gates_and_skips(layers):
    return [
        ({**cfg, "skip_connection": False, "post_encoder_scale": False}, {k: v for k, v in t.items() if "post_enc" not in k and "skip" not in k})
        for cfg, t in layers
    ]


def test_sparsify_smollm2_cfg_keys_and_tied_decoders(tmp_path):
    """The default SmolLM2 CLT layout: every source of target T decodes with T's single W_dec (one tensor)."""
    L = 3
    layers = sparsify_layers(L, "concat", skip=True, gates=True, gate_scale=True, normalize_io=True)
    for s, (cfg, t) in enumerate(layers):
        assert cfg["n_targets"] == L - s and cfg["coalesce_topk"] == "concat" and not cfg["topk_coalesced"]
        assert {f"post_encs.{j}" for j in range(L - s)} <= set(t)
    tc = load_transcoder(write_sparsify(tmp_path, layers))
    assert tc.sources(2) == [0, 1, 2] and tc.targets(0) == [0, 1, 2]
    assert tc.decoders[(0, 2)].W is tc.decoders[(1, 2)].W is tc.decoders[(2, 2)].W
    assert set(tc.skips) == {(0, 0), (1, 1), (2, 2)}


def test_sparsify_model_layers_prefix(tmp_path):
    layers = sparsify_layers(2, "plt", skip=True)
    tc = load_transcoder(write_sparsify(tmp_path, layers, prefix="model.layers"))
    xs = make_inputs(2)
    assert_outputs_close(tc.forward(xs), reference_sparsify(layers, xs))


# =============================================================================================
# 2. Writers: round trips
# =============================================================================================


def effective(tc: Transcoder) -> dict[str, torch.Tensor]:
    """Every number that determines the transcoder's function, with scalars folded in."""
    out: dict[str, torch.Tensor] = {}
    for s, e in enumerate(tc.encoders):
        out[f"enc{s}.W"] = e.W * e.in_scale
        out[f"enc{s}.b"] = e.b
        if e.threshold is not None:
            out[f"enc{s}.threshold"] = e.threshold
        out[f"bias{s}"] = tc.biases[s]
    for (s, t), d in tc.decoders.items():
        out[f"dec{s}->{t}.W"] = d.W * d.coef
        if d.offset is not None:
            out[f"dec{s}->{t}.offset"] = d.offset
        if d.scale is not None:
            out[f"dec{s}->{t}.scale"] = d.scale
    for (s, t) in tc.decoders:  # a missing skip is a zero skip
        sk = tc.skips.get((s, t))
        out[f"skip{s}->{t}"] = sk.W * sk.coef if sk is not None else torch.zeros(tc.d_model, tc.d_model)
    return out


def assert_same_transcoder(a: Transcoder, b: Transcoder, L: int) -> None:
    ea, eb = effective(a), effective(b)
    assert sorted(ea) == sorted(eb)
    for k in ea:
        torch.testing.assert_close(eb[k], ea[k], atol=1e-6, rtol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert a.activation == b.activation
    assert a.hookpoints == b.hookpoints
    xs = make_inputs(L, seed=7)
    assert_outputs_close(b.forward(xs), a.forward(xs))


SPARSIFY_ROUNDTRIP = [
    dict(kind="plt"),
    dict(kind="plt", skip=True, gates=True),
    dict(kind="clt"),
    dict(kind="clt", skip=True, gates=True),
    dict(kind="concat"),
    dict(kind="concat", skip=True, gates=True),
]


@pytest.mark.parametrize("kw", SPARSIFY_ROUNDTRIP, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_save_sparsify_roundtrip(tmp_path, kw):
    L = 3
    tc = random_transcoder(L, D, n_features=F, activation=Activation("topk", k=K), seed=3, **kw)
    save_sparsify(tc, tmp_path)
    back = load_transcoder(tmp_path)
    assert_same_transcoder(tc, back, L)
    if kw["kind"] == "concat":  # stays tied, stored as the concat layout
        assert back.decoders[(0, 2)].W is back.decoders[(2, 2)].W
        assert json.loads((tmp_path / "layers.1.mlp" / "cfg.json").read_text())["coalesce_topk"] == "concat"


@pytest.mark.parametrize("case", sorted(SPARSIFY_CASES))
def test_hand_written_sparsify_resaved_gives_same_outputs(tmp_path, case):
    kw = dict(SPARSIFY_CASES[case])
    L = kw.pop("L")
    layers = sparsify_layers(L, **kw)
    first = load_transcoder(write_sparsify(tmp_path / "a", layers))
    save_sparsify(first, tmp_path / "b")
    second = load_transcoder(tmp_path / "b")
    xs = make_inputs(L)
    assert_outputs_close(second.forward(xs), reference_sparsify(layers, xs))
    assert_outputs_close(second.forward(xs), first.forward(xs))


CT_ROUNDTRIP = [
    dict(kind="plt", activation=Activation("relu")),
    dict(kind="plt", activation=Activation("relu"), skip=True),
    dict(kind="plt", activation=Activation("jumprelu")),
    dict(kind="plt", activation=Activation("jumprelu"), skip=True),
    dict(kind="plt", activation=Activation("topk", k=K, relu_before_topk=False)),
    dict(kind="plt", activation=Activation("topk", k=K, relu_before_topk=False), skip=True),
    dict(kind="clt", activation=Activation("relu")),
    dict(kind="clt", activation=Activation("jumprelu")),
]


@pytest.mark.parametrize("kw", CT_ROUNDTRIP, ids=lambda kw: f"{kw['kind']}-{kw['activation'].kind}-skip={kw.get('skip', False)}")
def test_save_circuit_tracer_roundtrip(tmp_path, kw):
    L = 3
    hp = Hookpoints("resid_mid", "mlp_out_normed")
    tc = random_transcoder(L, D, n_features=F, hookpoints=hp, seed=5, **kw)
    save_circuit_tracer(tc, tmp_path, model_name="tiny")
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["feature_input_hook"] == "hook_resid_mid" and cfg["feature_output_hook"] == "hook_mlp_out"
    assert cfg["model_kind"] == ("cross_layer_transcoder" if kw["kind"] == "clt" else "transcoder_set")
    back = load_transcoder(tmp_path)
    assert back.format == "circuit-tracer"
    assert_same_transcoder(tc, back, L)


def test_circuit_tracer_topk_keeps_negative_preactivations(tmp_path):
    """circuit-tracer TopK is not TopK(ReLU): with all pre-activations negative, k features stay active."""
    tc = random_transcoder(1, D, n_features=F, activation=Activation("topk", k=K, relu_before_topk=False), seed=1)
    tc.encoders[0].b -= 100.0
    back = load_transcoder(save_circuit_tracer(tc, tmp_path))
    acts = back.encode(0, make_inputs(1)[0])
    assert ((acts < 0).sum(-1) == K).all()


def test_writers_refuse_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(TranscoderFormatError, match="post_enc"):
        save_circuit_tracer(random_transcoder(2, D, n_features=F, activation=Activation("relu"), gates=True), tmp_path / "a")
    with pytest.raises(TranscoderFormatError, match="TopK"):
        save_circuit_tracer(random_transcoder(2, D, n_features=F), tmp_path / "b")
    with pytest.raises(TranscoderFormatError, match="skip"):
        save_circuit_tracer(random_transcoder(2, D, n_features=F, kind="clt", activation=Activation("relu"), skip=True), tmp_path / "c")
    with pytest.raises(TranscoderFormatError, match="TopK"):
        save_sparsify(random_transcoder(2, D, n_features=F, activation=Activation("relu")), tmp_path / "d")


# =============================================================================================
# 3. circuit-tracer files written by hand
# =============================================================================================


def write_ct_config(root: Path, kind: str, fin: str = "mlp.hook_in", fout: str = "mlp.hook_out", **extra) -> None:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"model_name": "tiny", "model_kind": kind, "feature_input_hook": fin, "feature_output_hook": fout, **extra}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))


def write_ct_plt(root: Path, L: int, *, threshold: bool, skip: bool, seed: int = 0, **cfg) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    write_ct_config(root, "transcoder_set", **cfg)
    layers = []
    for i in range(L):
        t = {"W_enc": rnd(g, F, D, scale=D**-0.5), "b_enc": rnd(g, F, scale=0.3), "W_dec": rnd(g, F, D, scale=0.3),
             "b_dec": rnd(g, D, scale=0.1)}
        if threshold:
            t["activation_function.threshold"] = rnd(g, F).abs() * 0.3 + 0.05
        if skip:
            t["W_skip"] = rnd(g, D, D, scale=0.3 * D**-0.5)
        save_file(t, str(root / f"layer_{i}.safetensors"))
        layers.append(t)
    return layers


def jumprelu(pre: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    return torch.relu(pre) if theta is None else pre * (pre > theta).float()


@pytest.mark.parametrize("threshold,skip", [(False, False), (True, False), (True, True), (False, True)])
def test_circuit_tracer_plt_hand_written(tmp_path, threshold, skip):
    L = 3
    layers = write_ct_plt(tmp_path, L, threshold=threshold, skip=skip)
    tc = load_transcoder(tmp_path)
    assert tc.activation.kind == ("jumprelu" if threshold else "relu")
    xs = make_inputs(L)
    want = []
    for x, t in zip(xs, layers):
        a = jumprelu(x @ t["W_enc"].T + t["b_enc"], t.get("activation_function.threshold"))
        y = a @ t["W_dec"] + t["b_dec"]
        if skip:
            y = y + x @ t["W_skip"].T
        want.append(y)
    assert_outputs_close(tc.forward(xs), want)


@pytest.mark.parametrize("threshold", [False, True])
def test_circuit_tracer_clt_hand_written(tmp_path, threshold):
    L = 3
    g = torch.Generator().manual_seed(11)
    write_ct_config(tmp_path, "cross_layer_transcoder")
    enc, dec = [], []
    for i in range(L):
        e = {f"W_enc_{i}": rnd(g, F, D, scale=D**-0.5), f"b_enc_{i}": rnd(g, F, scale=0.3), f"b_dec_{i}": rnd(g, D, scale=0.1)}
        if threshold:
            e[f"threshold_{i}"] = rnd(g, F).abs() * 0.3 + 0.05
        d = {f"W_dec_{i}": rnd(g, F, L - i, D, scale=0.3)}
        save_file(e, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file(d, str(tmp_path / f"W_dec_{i}.safetensors"))
        enc.append(e)
        dec.append(d[f"W_dec_{i}"])
    tc = load_transcoder(tmp_path)
    assert tc.is_cross_layer and tc.activation.kind == ("jumprelu" if threshold else "relu")
    xs = make_inputs(L)
    acts = [jumprelu(xs[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"], enc[i].get(f"threshold_{i}")) for i in range(L)]
    want = [sum((acts[s] @ dec[s][:, T - s] for s in range(T + 1)), enc[T][f"b_dec_{T}"].expand(N, D)) for T in range(L)]
    assert_outputs_close(tc.forward(xs), want)


@pytest.mark.parametrize(
    "fin,fout,site_in,site_out",
    [
        ("mlp.hook_in", "mlp.hook_out", "mlp_in", "mlp_out"),
        ("hook_resid_mid", "hook_mlp_out", "resid_mid", "mlp_out_normed"),
        ("ln2.hook_normalized", "mlp.hook_out", "mlp_in_normalized", "mlp_out"),
    ],
)
def test_circuit_tracer_hookpoints(tmp_path, fin, fout, site_in, site_out):
    write_ct_plt(tmp_path, 2, threshold=False, skip=False, fin=fin, fout=fout)
    assert load_transcoder(tmp_path).hookpoints == Hookpoints(site_in, site_out)
    override = Hookpoints("resid_mid", "mlp_out")
    assert load_transcoder(tmp_path, hookpoints=override).hookpoints == override


def test_circuit_tracer_override_hookpoints_beats_unknown_hook(tmp_path):
    write_ct_plt(tmp_path, 2, threshold=False, skip=False, fin="blocks.0.hook_resid_pre")
    with pytest.raises(TranscoderFormatError, match="hook_resid_pre"):
        load_transcoder(tmp_path)
    hp = Hookpoints("mlp_in_normalized", "mlp_out_normed")
    assert load_transcoder(tmp_path, hookpoints=hp).hookpoints == hp


def test_circuit_tracer_config_topk(tmp_path):
    layers = write_ct_plt(tmp_path, 2, threshold=False, skip=False, activation="topk", k=3)
    tc = load_transcoder(tmp_path)
    assert tc.activation == Activation("topk", k=3, relu_before_topk=False)
    xs = make_inputs(2)
    want = []
    for x, t in zip(xs, layers):
        pre = x @ t["W_enc"].T + t["b_enc"]
        keep = pre >= pre.topk(3, dim=-1).values[:, -1:]
        want.append((pre * keep) @ t["W_dec"] + t["b_dec"])
    assert_outputs_close(tc.forward(xs), want)


# =============================================================================================
# 4. GemmaScope params.npz
# =============================================================================================


def write_gemmascope(root: Path, L: int, seed: int = 0, l0: int = 10) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    params = []
    for i in range(L):
        p = {
            "W_enc": (rng.standard_normal((D, F)) * D**-0.5).astype(np.float32),  # [D, F]: transposed
            "W_dec": (rng.standard_normal((F, D)) * 0.3).astype(np.float32),
            "b_enc": (rng.standard_normal(F) * 0.3).astype(np.float32),
            "b_dec": (rng.standard_normal(D) * 0.1).astype(np.float32),
            "threshold": (np.abs(rng.standard_normal(F)) * 0.3 + 0.05).astype(np.float32),
        }
        folder = root / f"layer_{i}" / "width_16k" / f"average_l0_{l0}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "params.npz", **p)
        params.append(p)
    return params


def test_gemmascope_npz(tmp_path):
    L = 3
    params = write_gemmascope(tmp_path, L)
    tc = load_transcoder(tmp_path)
    assert tc.hookpoints == Hookpoints("mlp_in_normalized", "mlp_out_normed")
    assert tc.activation.kind == "jumprelu"
    xs = make_inputs(L)
    want = []
    for x, p in zip(xs, params):
        P = {k: torch.from_numpy(v) for k, v in p.items()}
        pre = x @ P["W_enc"] + P["b_enc"]
        want.append((pre * (pre > P["threshold"]).float()) @ P["W_dec"] + P["b_dec"])
    assert_outputs_close(tc.forward(xs), want)


def test_gemmascope_ambiguous_layer(tmp_path):
    write_gemmascope(tmp_path, 2, l0=10)
    write_gemmascope(tmp_path, 1, l0=50)
    with pytest.raises(TranscoderFormatError, match="layer 0 has 2 params.npz"):
        load_transcoder(tmp_path)


_UNPICKLED: list[str] = []


def _evil(marker: str) -> str:  # would run if the loader ever unpickled
    _UNPICKLED.append(marker)
    Path(marker).write_text("pwned")
    return marker


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_evil, (self.marker,))


def test_gemmascope_object_array_is_refused(tmp_path):
    write_gemmascope(tmp_path, 1)
    marker = tmp_path / "marker"
    obj = np.empty(1, dtype=object)
    obj[0] = _Payload(str(marker))
    path = tmp_path / "layer_0" / "width_16k" / "average_l0_10" / "params.npz"
    with np.load(path) as z:
        p = {k: z[k] for k in z.files}
    p["threshold"] = obj
    np.savez(path, **p)  # object arrays are pickled inside the npz
    assert b"_evil" in pickle.dumps(obj)
    with pytest.raises(Exception):
        load_transcoder(tmp_path)
    assert not marker.exists() and not _UNPICKLED
    np.load(path, allow_pickle=True)["threshold"]  # positive control: unpickling this file *does* run _evil
    assert marker.exists() and _UNPICKLED == [str(marker)]


# =============================================================================================
# 5. Clear errors
# =============================================================================================


def mutate_and_load(root: Path, layers, mutate) -> None:
    mutate(layers)
    load_transcoder(write_sparsify(root, layers))


@pytest.mark.parametrize(
    "mutate,error,pattern",
    [
        (lambda ls: ls[1][1].pop("encoder.bias"), TranscoderFormatError, r"layers\.1\.mlp.*'encoder\.bias'"),
        (lambda ls: ls[0][1].pop("W_decs.1"), TranscoderFormatError, r"'W_decs\.1'"),
        (lambda ls: ls[2][1].update(stray=torch.zeros(3)), TranscoderFormatError, r"unexpected tensors \['stray'\]"),
        (lambda ls: ls[0][1].update({"encoder.bias": torch.zeros(F + 1)}), TranscoderFormatError, r"layer 0 encoder bias.*\[24\].*\[25\]"),
        (lambda ls: ls[1][1].update({"W_decs.1": torch.zeros(F, D + 1)}), TranscoderFormatError, r"decoder 1->2.*\[24, 17\]"),
        (lambda ls: ls[0][1].update({"W_skips.0": torch.zeros(D, D + 2)}), TranscoderFormatError, r"skip 0->0"),
        (lambda ls: ls[0][1].pop("post_enc_scales.1"), TranscoderFormatError, r"post_enc_scales\.1"),
        (lambda ls: ls[0][0].update(activation="groupmax"), UnknownActivationError, "groupmax"),
        (lambda ls: ls[2][0].update(activation="batchtopk"), UnknownActivationError, "batchtopk"),
        (lambda ls: ls[1][0].update(coalesce_topk="group"), TranscoderFormatError, "coalesce_topk"),
        (lambda ls: ls[0][0].update(transcode=False), TranscoderFormatError, "transcode=false"),
        (lambda ls: ls[0][0].update(n_targets=5), TranscoderFormatError, "n_targets=5"),
    ],
    ids=["missing-bias", "missing-W_decs", "unexpected", "shape-enc-bias", "shape-W_decs", "shape-skip",
         "missing-scale", "groupmax", "batchtopk", "coalesce-group", "sae", "n_targets-too-far"],
)
def test_sparsify_errors(tmp_path, mutate, error, pattern):
    layers = sparsify_layers(3, "none", skip=True, gates=True, gate_scale=True)
    with pytest.raises(error, match=pattern):
        mutate_and_load(tmp_path, layers, mutate)


def test_sparsify_topk_coalesced_refused(tmp_path):
    layers = sparsify_layers(3, "concat")
    layers[0][0]["topk_coalesced"] = True
    with pytest.raises(TranscoderFormatError, match="topk_coalesced"):
        load_transcoder(write_sparsify(tmp_path, layers))


def test_sparsify_layers_not_contiguous(tmp_path):
    layers = sparsify_layers(3, "plt")
    write_sparsify(tmp_path, layers)
    (tmp_path / "layers.1.mlp").rename(tmp_path / "layers.5.mlp")
    with pytest.raises(TranscoderFormatError, match=r"\[0, 2, 5\] are not 0\.\.2"):
        load_transcoder(tmp_path)


def test_sparsify_two_folders_for_one_layer(tmp_path):
    write_sparsify(tmp_path, sparsify_layers(2, "plt"))
    write_sparsify(tmp_path, sparsify_layers(1, "plt"), prefix="model.layers")
    with pytest.raises(TranscoderFormatError, match="two folders for layer 0"):
        load_transcoder(tmp_path)


def test_circuit_tracer_errors(tmp_path):
    write_ct_plt(tmp_path / "a", 2, threshold=False, skip=False, fout="hook_mlp_post")
    with pytest.raises(TranscoderFormatError, match="hook_mlp_post"):
        load_transcoder(tmp_path / "a")
    write_ct_plt(tmp_path / "b", 2, threshold=False, skip=False)
    (tmp_path / "b" / "layer_1.safetensors").rename(tmp_path / "b" / "layer_2.safetensors")
    with pytest.raises(TranscoderFormatError, match=r"found layers \[0, 2\]"):
        load_transcoder(tmp_path / "b")
    write_ct_plt(tmp_path / "c", 2, threshold=False, skip=False, activation="softplus")
    with pytest.raises(UnknownActivationError, match="softplus"):
        load_transcoder(tmp_path / "c")
    write_ct_config(tmp_path / "d", "sparse_autoencoder")
    with pytest.raises(TranscoderFormatError, match="model_kind"):
        load_transcoder(tmp_path / "d")
    write_ct_plt(tmp_path / "e", 1, threshold=False, skip=False)
    save_file({"W_enc": torch.zeros(F, D), "b_enc": torch.zeros(F), "b_dec": torch.zeros(D)}, str(tmp_path / "e" / "layer_0.safetensors"))
    with pytest.raises(TranscoderFormatError, match="'W_dec'"):
        load_transcoder(tmp_path / "e")


def test_activation_and_empty_dir_errors(tmp_path):
    with pytest.raises(UnknownActivationError, match="softplus"):
        Activation("softplus")
    with pytest.raises(TranscoderFormatError, match="k"):
        Activation("topk")
    with pytest.raises(TranscoderFormatError, match="no transcoder found"):
        load_transcoder(tmp_path)


# =============================================================================================
# 6. Hub references without network
# =============================================================================================


class FakeSnapshot:
    def __init__(self, root: Path | None = None, error: Exception | None = None):
        self.root, self.error, self.calls = root, error, []

    def __call__(self, repo_id, revision=None, allow_patterns=None, **kw):
        self.calls.append((repo_id, revision, list(allow_patterns) if allow_patterns is not None else None))
        if self.error is not None:
            raise self.error
        return str(self.root)


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    def install(fake: FakeSnapshot) -> FakeSnapshot:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
        return fake

    return install


def test_hub_sparsify_with_revision(tmp_path, fake_hub):
    layers = sparsify_layers(2, "plt")
    fake = fake_hub(FakeSnapshot(write_sparsify(tmp_path, layers)))
    tc = load_transcoder("user/repo@rev1")
    assert [c[:2] for c in fake.calls] == [("user/repo", "rev1")] * 2
    assert fake.calls[0][2] == ["config.yaml", "*cfg.json"]
    assert sorted(fake.calls[1][2]) == ["config.json", "layers.0.mlp/*", "layers.1.mlp/*"]  # the run's config too
    assert tc.name == "user/repo@rev1"
    xs = make_inputs(2)
    assert_outputs_close(tc.forward(xs), reference_sparsify(layers, xs))


def test_hub_sparsify_subfolder(tmp_path, fake_hub):
    layers = sparsify_layers(2, "plt")
    write_sparsify(tmp_path / "sub", layers)
    fake = fake_hub(FakeSnapshot(tmp_path))
    tc = load_transcoder("user/repo/sub")
    assert [c[:2] for c in fake.calls] == [("user/repo", None)] * 2
    assert fake.calls[0][2] == ["sub/config.yaml", "sub/*cfg.json"]
    assert sorted(fake.calls[1][2]) == ["sub/config.json", "sub/layers.0.mlp/*", "sub/layers.1.mlp/*"]
    assert tc.n_layers == 2


def test_hub_circuit_tracer_plt(tmp_path, fake_hub):
    write_ct_plt(tmp_path, 2, threshold=True, skip=False)
    fake = fake_hub(FakeSnapshot(tmp_path))
    tc = load_transcoder("hf://user/ct?revision=abc")
    assert [c[:2] for c in fake.calls] == [("user/ct", "abc")] * 2
    assert sorted(fake.calls[1][2]) == ["config.yaml", "layer_*.safetensors"]
    assert tc.n_layers == 2 and tc.activation.kind == "jumprelu"


def test_hub_unavailable(fake_hub):
    fake = fake_hub(FakeSnapshot(error=ConnectionError("offline")))
    with pytest.raises(HubUnavailableError, match="user/repo") as info:
        load_transcoder("user/repo")
    assert "offline" in str(info.value) and len(fake.calls) == 1


@pytest.mark.parametrize(
    "ref,kw,want",
    [
        ("hf://u/r/sub?revision=x", {}, HubRef("u/r", "sub", "x")),
        ("hf://u/r", {}, HubRef("u/r", None, None)),
        ("u/r@v", {}, HubRef("u/r", None, "v")),
        ("u/r/a/b@v", {}, HubRef("u/r", "a/b", "v")),
        ("u/r/a", dict(subfolder="b", revision="w"), HubRef("u/r", "a/b", "w")),
        ("u/r@v", dict(revision="w"), HubRef("u/r", None, "w")),  # an explicit revision= wins
    ],
)
def test_hubref_parse(ref, kw, want):
    assert HubRef.parse(ref, **kw) == want


@pytest.mark.parametrize("ref", ["justname", "u//r", "hf://justname"])
def test_hubref_parse_invalid(ref):
    with pytest.raises(ValueError, match="hub reference"):
        HubRef.parse(ref)


# =============================================================================================
# 7. dtype conversion keeps tied tensors shared
# =============================================================================================


def test_to_float64_keeps_tied_decoders_shared(tmp_path):
    tc = random_transcoder(3, D, n_features=F, kind="concat", skip=True, gates=True)
    assert tc.decoders[(0, 2)].W is tc.decoders[(1, 2)].W
    dbl = tc.to(dtype=torch.float64)
    assert dbl.dtype == torch.float64
    for t in range(3):
        Ws = [dbl.decoders[(s, t)].W for s in dbl.sources(t)]
        assert all(W is Ws[0] for W in Ws) and Ws[0].dtype == torch.float64
    assert dbl.decoders[(0, 1)].W is not dbl.decoders[(0, 2)].W
    xs = make_inputs(3)
    assert_outputs_close([y.float() for y in dbl.forward([x.double() for x in xs])], tc.forward(xs))
    # the same through load_transcoder(dtype=...) of a concat file
    loaded = load_transcoder(write_sparsify(tmp_path, sparsify_layers(3, "concat", skip=True)), dtype=torch.float64)
    assert loaded.decoders[(0, 2)].W is loaded.decoders[(1, 2)].W is loaded.decoders[(2, 2)].W
    assert loaded.decoders[(0, 2)].W.dtype == torch.float64
