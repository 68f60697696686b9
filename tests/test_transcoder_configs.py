"""What a sparsify / clt-training run records beside the weights (docs/formats.md §a, §d): per-layer k (each
layer's cfg.json, or `per_layer_k` in the run's root config.json), the input site named by `hookpoints_in`,
and checkpoints that mix bf16 and fp32 tensors. Every expectation is computed here with plain torch.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attribute_ray.errors import TranscoderFormatError
from attribute_ray.replacement import ReplacementModel
from attribute_ray.tiny import tiny_model
from attribute_ray.transcoders import Activation, Hookpoints, load_transcoder, save_sparsify

D, F, N = 16, 40, 12
TOL = dict(atol=1e-5, rtol=1e-5)
TOKENS = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 12, 13])


def write_run(root: Path, layers: list[tuple[dict, dict[str, torch.Tensor]]], run: dict | None = None,
              prefix: str = "layers") -> Path:
    """`{prefix}.{i}.mlp/{cfg.json, sae.safetensors}` per layer, plus the run's root config.json when given."""
    for i, (cfg, tensors) in enumerate(layers):
        folder = root / f"{prefix}.{i}.mlp"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(cfg))
    if run is not None:
        (root / "config.json").write_text(json.dumps(run))
    return root


def plt_layers(ks: list[int], d: int = D, *, skip: bool = False, seed: int = 0) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """Per-layer transcoders as sparsify writes them; the encoder bias is shifted up so that more than k
    pre-activations are positive on every token (then TopK really cuts at k)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in ks:
        cfg = {"d_in": d, "num_latents": F, "k": k, "activation": "topk", "transcode": True, "skip_connection": skip}
        t = {
            "encoder.weight": torch.randn(F, d, generator=g) * d**-0.5,
            "encoder.bias": torch.randn(F, generator=g) * 0.3 + 1.5,
            "W_dec": torch.randn(F, d, generator=g) * 0.3,
            "b_dec": torch.randn(d, generator=g) * 0.1,
        }
        if skip:
            t["W_skip"] = torch.randn(d, d, generator=g) * 0.3 * d**-0.5
        out.append((cfg, t))
    return out


def run_config(L: int, **extra) -> dict:
    """The keys of clt-training's saved TrainConfig we care about (its Trainer expands `hookpoints`)."""
    return {"model": "HuggingFaceTB/SmolLM2-135M", "sae": {"k": 32, "transcode": True},
            "hookpoints": [f"layers.{i}.mlp" for i in range(L)], "hookpoints_in": [], "per_layer_k": [], **extra}


def topk_relu(x: torch.Tensor, t: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """sparsify's activation: ReLU, then keep the k largest per row (zeros elsewhere)."""
    z = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])
    a = torch.zeros_like(z)
    for n in range(z.shape[0]):
        order = sorted(range(z.shape[1]), key=lambda f: -float(z[n, f]))[:k]
        a[n, order] = z[n, order]
    return a


def plt_output(x: torch.Tensor, t: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    y = topk_relu(x, t, k) @ t["W_dec"] + t["b_dec"]
    return y + x @ t["W_skip"].T if "W_skip" in t else y


def inputs(L: int, d: int = D) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100)
    return [torch.randn(N, d, generator=g) for _ in range(L)]


def assert_layers_use_k(tc, layers, ks: list[int]) -> None:
    xs = inputs(len(ks))
    for s, ((_, t), k) in enumerate(zip(layers, ks)):
        want = topk_relu(xs[s], t, k)
        torch.testing.assert_close(tc.encode(s, xs[s]), want, **TOL)
        assert ((want != 0).sum(-1) == k).all()  # k features really fire on every token
        sparse = tc.encode_sparse(s, xs[s])
        dense = torch.zeros(N, F).index_put_((sparse.rows, sparse.features), sparse.values)
        torch.testing.assert_close(dense, want, **TOL)
        if k != ks[0]:  # layer 0's k would give other activations: the check can fail
            assert not torch.allclose(topk_relu(xs[s], t, ks[0]), want)
    for s, (y, (_, t)) in enumerate(zip(tc.forward(xs), layers)):
        torch.testing.assert_close(y, plt_output(xs[s], t, ks[s]), **TOL)


# ----- per-layer k --------------------------------------------------------------------------------


def test_each_layer_cfg_json_k_is_used(tmp_path):
    ks = [2, 5, 9]
    layers = plt_layers(ks)
    tc = load_transcoder(write_run(tmp_path, layers))
    assert tc.activation.k == (2, 5, 9) and [tc.activation.k_at(s) for s in range(3)] == ks
    assert_layers_use_k(tc, layers, ks)


def test_per_layer_k_round_trips_through_save_sparsify(tmp_path):
    ks = [3, 7, 4]
    layers = plt_layers(ks, skip=True)
    tc = load_transcoder(write_run(tmp_path / "a", layers))
    save_sparsify(tc, tmp_path / "b")
    assert [json.loads((tmp_path / "b" / f"layers.{s}.mlp" / "cfg.json").read_text())["k"] for s in range(3)] == ks
    assert_layers_use_k(load_transcoder(tmp_path / "b"), layers, ks)


def test_run_config_per_layer_k_overrides_cfg_json(tmp_path):
    """clt-training sets every layer's k from `per_layer_k` at each step: that is what the weights were trained with."""
    ks = [6, 2, 8]
    layers = plt_layers([4, 4, 4])  # the cfg.json files all say 4
    root = write_run(tmp_path, layers, run_config(3, per_layer_k=ks))
    with pytest.warns(UserWarning, match="per_layer_k"):
        tc = load_transcoder(root)
    assert tc.activation.k == tuple(ks)
    assert_layers_use_k(tc, layers, ks)


def test_run_config_per_layer_k_agreeing_with_cfg_json_is_silent(tmp_path):
    ks = [1, 3, 5]
    root = write_run(tmp_path, plt_layers(ks), run_config(3, per_layer_k=ks))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_transcoder(root).activation.k == tuple(ks)


def test_run_config_per_layer_k_follows_hookpoint_names(tmp_path):
    """`per_layer_k[i]` belongs to `hookpoints[i]`, whatever layer that names."""
    layers = plt_layers([2, 2, 2])
    run = run_config(3, hookpoints=["layers.2.mlp", "layers.0.mlp", "layers.1.mlp"], per_layer_k=[9, 3, 6])
    with pytest.warns(UserWarning):
        tc = load_transcoder(write_run(tmp_path, layers, run))
    assert tc.activation.k == (3, 6, 9)


def test_run_config_per_layer_k_with_a_clt(tmp_path):
    """An untied clt-training CLT: each source layer's activations use its own k before writing to every target."""
    L, ks = 3, [2, 7, 4]
    g = torch.Generator().manual_seed(5)
    layers = []
    for s in range(L):
        cfg = {"d_in": D, "num_latents": F, "k": 32, "activation": "topk", "transcode": True, "n_targets": L - s,
               "n_sources": s + 1, "coalesce_topk": "none"}
        t = {"encoder.weight": torch.randn(F, D, generator=g) * D**-0.5, "encoder.bias": torch.randn(F, generator=g) * 0.3 + 1.5}
        for j in range(L - s):
            t[f"W_decs.{j}"] = torch.randn(F, D, generator=g) * 0.3
            t[f"b_decs.{j}"] = torch.randn(D, generator=g) * 0.1
        layers.append((cfg, t))
    with pytest.warns(UserWarning):
        tc = load_transcoder(write_run(tmp_path, layers, run_config(L, per_layer_k=ks)))
    xs = inputs(L)
    acts = [topk_relu(xs[s], layers[s][1], ks[s]) for s in range(L)]
    for T, y in enumerate(tc.forward(xs)):
        want = sum(acts[s] @ layers[s][1][f"W_decs.{T - s}"] + layers[s][1][f"b_decs.{T - s}"] for s in range(T + 1))
        torch.testing.assert_close(y, want, **TOL)


@pytest.mark.parametrize("per_layer_k", [[4, 4], [4, 4, 4, 4], [4, 0, 4], "4"])
def test_bad_per_layer_k_is_refused(tmp_path, per_layer_k):
    root = write_run(tmp_path, plt_layers([4, 4, 4]), run_config(3, per_layer_k=per_layer_k))
    with pytest.raises(TranscoderFormatError, match="per_layer_k"):
        load_transcoder(root)


def test_activation_per_layer_k_values():
    assert Activation("topk", k=[3, 3, 3]) == Activation("topk", k=3)  # one k for all is stored as an int
    assert Activation("topk", k=[3, 4]).k == (3, 4) and Activation("topk", k=[3, 4]).per_layer
    with pytest.raises(TranscoderFormatError, match="k"):
        Activation("topk", k=(3, 0))


# ----- hookpoints_in: the input site --------------------------------------------------------------

# family -> (hookpoints_in module of layer i, where that module and the MLP sit in the HF model)
SITES = {
    "llama": ("layers.{i}.post_attention_layernorm", lambda m, i: (m.model.layers[i].post_attention_layernorm,
                                                                   m.model.layers[i].mlp)),
    "gemma2": ("layers.{i}.pre_feedforward_layernorm", lambda m, i: (m.model.layers[i].pre_feedforward_layernorm,
                                                                     m.model.layers[i].mlp)),
    "gpt2": ("h.{i}.ln_2", lambda m, i: (m.transformer.h[i].ln_2, m.transformer.h[i].mlp)),
}


@pytest.mark.parametrize("family", sorted(SITES))
def test_hookpoints_in_sets_resid_mid_and_errors_are_computed_there(tmp_path, family):
    """The transcoder reads the input of the MLP norm; the replacement model's errors equal the real MLP output
    minus the transcoder applied to that tensor, both captured here with hooks on the HF modules."""
    model, tok = tiny_model(family)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    layers = plt_layers([3, 6, 4], d, skip=True, seed=1)
    name, modules = SITES[family]
    prefix = "h" if family == "gpt2" else "layers"
    run = run_config(L, model=f"tiny-{family}", hookpoints=[f"{prefix}.{i}.mlp" for i in range(L)],
                     hookpoints_in=[name.format(i=i) for i in range(L)])
    tc = load_transcoder(write_run(tmp_path, layers, run, prefix=prefix))
    assert tc.hookpoints == Hookpoints("resid_mid", "mlp_out")

    seen: dict[str, list] = {"resid_mid": [], "mlp_in": [], "mlp_out": []}

    def on_norm(m, args) -> None:
        seen["resid_mid"].append(args[0][0].detach())

    def on_mlp(m, args, out) -> None:
        seen["mlp_in"].append(args[0][0].detach())
        seen["mlp_out"].append(out[0].detach())

    hooks = []
    for i in range(L):
        norm, mlp = modules(model, i)
        hooks += [norm.register_forward_pre_hook(on_norm), mlp.register_forward_hook(on_mlp)]
    with torch.no_grad():
        model(input_ids=TOKENS[None])
    for h in hooks:
        h.remove()

    trace = ReplacementModel(model, tok, tc).trace(TOKENS)
    z = trace.n_zero
    for i, (_, t) in enumerate(layers):
        x = seen["resid_mid"][i]
        torch.testing.assert_close(trace.inputs[i], x, atol=1e-5, rtol=1e-5)
        want_error = seen["mlp_out"][i] - plt_output(x, t, tc.activation.k_at(i))
        torch.testing.assert_close(trace.errors[i][z:], want_error[z:], atol=1e-4, rtol=1e-4)
        assert not trace.errors[i][:z].any()
        # reading the MLP's own input instead would give other errors: the site matters
        wrong = seen["mlp_out"][i] - plt_output(seen["mlp_in"][i], t, tc.activation.k_at(i))
        assert not torch.allclose(trace.errors[i][z:], wrong[z:], atol=1e-3)


def test_hookpoints_in_naming_the_mlp_is_mlp_in(tmp_path):
    run = run_config(3, hookpoints_in=[f"layers.{i}.mlp" for i in range(3)])
    assert load_transcoder(write_run(tmp_path, plt_layers([4, 4, 4]), run)).hookpoints.input == "mlp_in"


def test_run_config_without_hookpoints_in_keeps_mlp_in(tmp_path):
    tc = load_transcoder(write_run(tmp_path, plt_layers([4, 4, 4]), run_config(3)))
    assert tc.hookpoints == Hookpoints("mlp_in", "mlp_out") and tc.activation.k == 4


@pytest.mark.parametrize(
    "hookpoints_in,model,match",
    [
        (["layers.{i}.input_layernorm"], "meta-llama/Llama-3.2-1B", "'layers.0.input_layernorm'"),
        (["layers.{i}.self_attn"], "meta-llama/Llama-3.2-1B", "'layers.0.self_attn'"),
        (["embed_tokens"], "meta-llama/Llama-3.2-1B", "'embed_tokens'"),
        # in Gemma-2 this norm's input is the attention output, not the residual stream
        (["layers.{i}.post_attention_layernorm"], "google/gemma-2-2b", "'layers.0.post_attention_layernorm'"),
    ],
)
def test_unknown_hookpoints_in_is_refused_by_name(tmp_path, hookpoints_in, model, match):
    run = run_config(3, model=model, hookpoints_in=[h.format(i=i) for h in hookpoints_in for i in range(3)])
    root = write_run(tmp_path, plt_layers([4, 4, 4]), run)
    with pytest.raises(TranscoderFormatError, match=match):
        load_transcoder(root)
    # an explicit site overrides the run config
    assert load_transcoder(root, hookpoints=Hookpoints("mlp_in", "mlp_out")).hookpoints.input == "mlp_in"


def test_hookpoints_in_that_mix_sites_or_layers_are_refused(tmp_path):
    # clt-training reads the MLP's own input past the end of hookpoints_in: layer 2 would read another site
    partial = run_config(3, hookpoints_in=["layers.0.post_attention_layernorm", "layers.1.post_attention_layernorm"])
    with pytest.raises(TranscoderFormatError, match="different input sites"):
        load_transcoder(write_run(tmp_path / "a", plt_layers([4, 4, 4]), partial))
    shifted = run_config(3, hookpoints_in=[f"layers.{i + 1}.post_attention_layernorm" for i in range(3)])
    with pytest.raises(TranscoderFormatError, match="'layers.1.post_attention_layernorm'"):
        load_transcoder(write_run(tmp_path / "b", plt_layers([4, 4, 4]), shifted))


# ----- mixed dtypes ------------------------------------------------------------------------------


def mixed_layers(L: int) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """clt-training with dtype="bfloat16": bf16 weights beside fp32 norms and gates."""
    layers = []
    for s, (cfg, t) in enumerate(plt_layers([3, 5, 4][:L], skip=True, seed=2)):
        cfg = {**cfg, "normalize_io": True, "dtype": "bfloat16"}
        t = {k: v.to(torch.bfloat16) if k in ("encoder.weight", "W_dec", "W_skip") else v for k, v in t.items()}
        t["in_norm"] = torch.tensor([2.0 + s])
        t["out_norm"] = torch.tensor([1.5 + s])
        t["post_enc"] = torch.linspace(0.0, 0.5, F)
        layers.append((cfg, t))
    return layers


def mixed_reference(layers, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The forward with every tensor cast to fp32 first (docs/formats.md §a for normalize_io and post_enc)."""
    ys = []
    for x, (cfg, t) in zip(xs, layers):
        t = {k: v.float() for k, v in t.items()}
        xh = x * math.sqrt(D) / float(t["in_norm"])
        a = topk_relu(xh, t, cfg["k"])
        a = a + t["post_enc"] * (a > 0)
        ys.append(float(t["out_norm"]) / math.sqrt(D) * (a @ t["W_dec"] + t["b_dec"] + xh @ t["W_skip"].T))
    return ys


def test_mixed_bf16_fp32_checkpoint_loads_in_one_dtype(tmp_path):
    layers = mixed_layers(3)
    assert {v.dtype for _, t in layers for v in t.values()} == {torch.bfloat16, torch.float32}
    root = write_run(tmp_path, layers)
    tc = load_transcoder(root)
    assert {t.dtype for t in tc.tensors()} == {torch.float32} and tc.dtype == torch.float32
    xs = inputs(3)
    for y, want in zip(tc.forward(xs), mixed_reference(layers, xs)):
        torch.testing.assert_close(y, want, **TOL)
    # a requested dtype wins, for every tensor
    half = load_transcoder(root, dtype=torch.bfloat16)
    assert {t.dtype for t in half.tensors()} == {torch.bfloat16}
    ys = half.forward([x.to(torch.bfloat16) for x in xs])
    assert all(y.dtype == torch.bfloat16 and y.isfinite().all() for y in ys)


# ----- from the hub -------------------------------------------------------------------------------


def test_hub_fetches_the_run_config_with_the_layer_folders(tmp_path, monkeypatch):
    """Only metadata first, then the layer folders plus the root config.json (its per_layer_k is honoured)."""
    import huggingface_hub

    ks = [2, 6, 3]
    layers = plt_layers([4, 4, 4])  # only the run config knows the real k
    write_run(tmp_path, layers, run_config(3, per_layer_k=ks))
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append(list(allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.warns(UserWarning, match="per_layer_k"):
        tc = load_transcoder("user/run")
    assert "config.json" in calls[1] and "config.json" not in calls[0]
    assert_layers_use_k(tc, layers, ks)
