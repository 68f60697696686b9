"""Transcoder training (attribute_ray/training, jobs/train_transcoder.py) on a tiny Llama and a small offline corpus.

One Ray session and one activation cache for the module; each test trains in its own output folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from attribute_ray.tiny import WORDS, save_tiny_model
from attribute_ray.training import (
    FAIL_AFTER_ENV,
    Checkpoints,
    TrainableTranscoder,
    TrainConfig,
    assemble,
    checkpoint_folder,
    load_trained,
    read_meta,
    replacement_logits,
    write_transcoder,
)
from attribute_ray.training import build_trainable as build_coder
from attribute_ray.training import pack_state as _pack
from attribute_ray.training import unpack_state as _unpack
from attribute_ray.transcoders import load_transcoder
from jobs.train_transcoder import TrainingFailed, main, parse_args, run

pytestmark = pytest.mark.timeout(300)
L = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    model = save_tiny_model(root / "model", "llama")
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))}) + "\n")
    return {"model": str(model), "corpus": str(corpus), "acts": str(root / "activations")}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
             namespace="train")
    yield
    ray.shutdown()


def config(data, out: Path, **kw) -> TrainConfig:
    base = dict(model=data["model"], dataset=data["corpus"], activations=data["acts"], out=str(out), n_tokens=6000,
                val_tokens=1000, ctx_len=32, k=8, batch_tokens=512, steps=200, checkpoint_every=100)
    return TrainConfig(**{**base, **kw})


def val_arrays(data, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    act = Path(data["acts"])
    return (torch.from_numpy(np.load(act / f"val_in_{layer}.npy").astype(np.float32)),
            torch.from_numpy(np.load(act / f"val_out_{layer}.npy").astype(np.float32)))


def affine_fvu(data, layer: int) -> float:
    """Held-out FVU of the best affine map x → y (fitted on the training tokens): what a skip alone can do."""
    act = Path(data["acts"])
    x, y = (np.load(act / f"train_{s}_{layer}.npy").astype(np.float64) for s in ("in", "out"))
    beta = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    xv, yv = (a.double().numpy() for a in val_arrays(data, layer))
    pred = np.c_[xv, np.ones(len(xv))] @ beta
    return float(((pred - yv) ** 2).sum() / ((yv - yv.mean(0)) ** 2).sum())


def assert_same_weights(cfg: TrainConfig, ref_cfg: TrainConfig, meta: dict, steps: int, layers: range | list[int] = range(L)) -> None:
    """Each of `layers` of the (resumed) run `cfg` ends at `steps` with the weights of the uninterrupted run `ref_cfg`."""
    for l in layers:
        resumed, _, _, st = load_trained(cfg, meta, [l])
        straight, _, _, _ = load_trained(ref_cfg, meta, [l])
        assert st["step"] == steps
        for (n, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_skip_plt_learns_reloads_and_reports(ray_session, data, tmp_path) -> None:
    cfg = config(data, tmp_path / "skip")
    report = run(cfg)
    meta = read_meta(Path(data["acts"]))
    assert meta["n_layers"] == L and meta["n_val"] == 1023 and meta["n_train"] >= 6000  # 31 text tokens per window
    # held-out FVU: the mean predictor scores 1.0, the best affine map 0.49–0.60 here; measured 0.17–0.21
    for r in report["layers"]:
        assert r["fvu"] < 0.35 and r["fvu"] < 0.6 * affine_fvu(data, r["layer"]), r
        assert 0 < r["l0"] <= cfg.k and 0 <= r["dead_frac"] <= 1 and 0 <= r["unused_val_frac"] <= 1
    assert report["kl"] >= 0 and 0 <= report["agreement"] <= 1 and report["n_eval_tokens"] == 1023
    assert json.loads((tmp_path / "skip" / "report.json").read_text()) == json.loads(json.dumps(report))
    # the saved transcoder reproduces the trainer's model in raw space
    tc = load_transcoder(str(tmp_path / "skip" / "transcoder"))
    assert tc.n_layers == L and tc.has_skip and not tc.is_cross_layer and tc.activation.k == cfg.k
    assert tc.dtype == torch.float32 and tc.n_features(0) == 8 * 32
    xs, ys = zip(*(val_arrays(data, l) for l in range(L)))
    saved = tc.forward(list(xs))
    for l in range(L):
        coder, s_in, s_out, state = load_trained(cfg, meta, [l])
        assert state["done"] and state["step"] == cfg.steps
        assert rel_err(saved[l], coder.forward_raw([xs[l]], s_in, s_out)[0]) < 1e-3
        fvu = float(((saved[l] - ys[l]) ** 2).sum() / ((ys[l] - ys[l].mean(0)) ** 2).sum())
        assert fvu == pytest.approx(report["layers"][l]["fvu"], rel=1e-3)
        assert report["training"][l]["val_fvu"] == pytest.approx(fvu, rel=1e-3)
    # --dtype float16: the same transcoder, stored in half precision
    half = assemble(cfg.model_copy(update={"dtype": "float16"}), meta)
    tc16 = load_transcoder(str(write_transcoder(half, tmp_path / "tc16", meta["model_type"])))
    assert tc16.dtype == torch.float16
    for got, want in zip(tc16.to(dtype=torch.float32).forward(list(xs)), saved):
        assert rel_err(got, want) < 2e-2
    # the replacement model used for KL is the library's (run_replaced without errors)
    from attribute_ray import ReplacementModel
    from attribute_ray.loading import load_model

    window = torch.from_numpy(np.load(Path(data["acts"]) / "windows.npy")[meta["n_train_windows"]].astype(np.int64))
    model, tok = load_model(data["model"])
    ours = replacement_logits(model, tc, window[None])[0]
    rm = ReplacementModel(load_model(data["model"])[0], tok, tc)
    lib = rm.run_replaced(rm.trace(window), with_errors=False).logits[0]
    torch.testing.assert_close(ours, lib, rtol=1e-4, atol=1e-4)
    # KL(model ‖ replacement) and next-token agreement recomputed here over every held-out window (text positions)
    held = torch.from_numpy(np.load(Path(data["acts"]) / "windows.npy")[meta["n_train_windows"]:].astype(np.int64))
    kl, agree, count = 0.0, 0, 0
    for w in held:
        p_log = model(input_ids=w[None]).logits[0, 1:].double().log_softmax(-1)
        q_log = rm.run_replaced(rm.trace(w), with_errors=False).logits[0, 1:].double().log_softmax(-1)
        kl += float((p_log.exp() * (p_log - q_log)).sum())
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += len(p_log)
    assert report["kl"] == pytest.approx(kl / count, rel=1e-3) and report["agreement"] == pytest.approx(agree / count)
    # L0, never-active and dense (> 10% of tokens) fractions from the dense activations [N, F] of each layer
    for l in range(L):
        active = (tc.encode(l, xs[l]) > 0).double()  # [N, F]
        freq = active.mean(0)
        r = report["layers"][l]
        assert r["l0"] == pytest.approx(float(active.sum(1).mean()), rel=1e-6)
        assert r["unused_val_frac"] == pytest.approx(float((freq == 0).double().mean()))
        assert r["dense_frac"] == pytest.approx(float((freq > 0.1).double().mean()))
    # the same command again is a no-op for training
    again = run(cfg)
    assert [r["fvu"] for r in again["layers"]] == pytest.approx([r["fvu"] for r in report["layers"]])


def test_plt_without_skip_decreases_fvu(ray_session, data, tmp_path, capsys) -> None:
    out = tmp_path / "plt"
    argv = ["--model", data["model"], "--dataset", data["corpus"], "--activations", data["acts"], "--out", str(out),
            "--kind", "plt", "--n-tokens", "6000", "--val-tokens", "1000", "--ctx-len", "32", "--k", "8",
            "--batch-tokens", "512", "--steps", "200", "--checkpoint-every", "100"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out
    assert "KL(model ‖ replacement)" in printed and "layer  0: 200 steps" in printed
    tc = load_transcoder(str(out / "transcoder"))
    assert not tc.has_skip and not tc.is_cross_layer
    # measured 0.21–0.28 after 200 steps (from ≈1.0 at step 0: b_dec = mean, decoder rows of norm 0.1)
    for r in report["layers"]:
        assert r["fvu"] < 0.45, r


def test_checkpoint_round_trip_is_exact(data, tmp_path) -> None:
    """Weights + Adam state + dead-latent counters through safetensors: same outputs, same next step."""
    cfg = config(data, tmp_path / "rt", kind="skip-plt")
    meta = {"d_model": 32}

    def make():
        coder = build_coder(cfg, meta, [1])
        return coder, torch.optim.Adam(coder.parameters(), lr=1e-2)

    def step(coder, opt, x):
        preds, _ = coder([x])
        loss = (preds[0] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    x = torch.randn(64, meta["d_model"])
    a, opt_a = make()
    for _ in range(3):
        step(a, opt_a, x)
    since = torch.arange(a.f, dtype=torch.int64)
    ck = Checkpoints(tmp_path / "ck")
    ck.save(3, _pack(a, opt_a, since), {"done": False})
    state, tensors = ck.load()
    assert state["step"] == 3 and not any(k.endswith(".pkl") for k in map(str, (tmp_path / "ck").iterdir()))
    b, opt_b = make()
    assert torch.equal(_unpack(b, opt_b, tensors), since)
    assert torch.equal(a([x])[0][0], b([x])[0][0])
    step(a, opt_a, x)
    step(b, opt_b, x)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_interrupted_run_resumes_to_the_same_weights(ray_session, data, tmp_path, monkeypatch) -> None:
    cfg = config(data, tmp_path / "resumed", steps=40, checkpoint_every=20)
    monkeypatch.setenv(FAIL_AFTER_ENV, "20")
    with pytest.raises(TrainingFailed, match="interrupted after step 20"):
        run(cfg)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    for l in range(L):
        st = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, l)).state()
        assert st["step"] == 20 and not st["done"]
    assert not (tmp_path / "resumed" / "transcoder").exists()
    report = run(cfg)
    assert [t["resumed_from"] for t in report["training"]] == [20] * L
    ref_cfg = config(data, tmp_path / "straight", steps=40, checkpoint_every=20)
    ref = run(ref_cfg)
    assert [t["resumed_from"] for t in ref["training"]] == [None] * L
    assert_same_weights(cfg, ref_cfg, read_meta(Path(data["acts"])), 40)
    assert [r["fvu"] for r in report["layers"]] == pytest.approx([r["fvu"] for r in ref["layers"]], rel=1e-4)


def test_online_training_resumes_to_the_same_weights_and_learns(ray_session, data, tmp_path, monkeypatch) -> None:
    """--stream: the model runs once per step and every layer trains on its activations; only the held-out windows
    and the initialisation sample are cached; an interrupted run resumes bit-for-bit."""
    cfg = config(data, tmp_path / "online", activations=None, stream=True, steps=120, checkpoint_every=60)
    monkeypatch.setenv(FAIL_AFTER_ENV, "60")
    with pytest.raises(TrainingFailed, match="interrupted after step 60"):
        run(cfg)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    assert [Checkpoints(checkpoint_folder(cfg.out, cfg.kind, l)).state()["step"] for l in range(L)] == [60] * L
    report = run(cfg)
    assert [t["resumed_from"] for t in report["training"]] == [60] * L
    ref_cfg = config(data, tmp_path / "online-straight", activations=None, stream=True, steps=120, checkpoint_every=60)
    ref = run(ref_cfg)
    assert [r["fvu"] for r in report["layers"]] == pytest.approx([r["fvu"] for r in ref["layers"]], rel=1e-4)
    meta = read_meta(cfg.activations_dir())
    # the cache holds the 32,768-token initialisation sample (all 194 training windows here), not the stream
    assert meta["n_train_windows"] == 194 and meta["n_train"] == 194 * 31 and meta["n_val"] == 1023
    assert_same_weights(cfg, ref_cfg, meta, 120)
    # the lowest layer alone: each forward stops after it (`capture(n_layers=1)`), and it trains to the same weights
    low_cfg = config(data, tmp_path / "online-low", activations=None, stream=True, steps=120, checkpoint_every=60, layers=[0])
    run(low_cfg)
    assert_same_weights(low_cfg, ref_cfg, meta, 120, layers=[0])
    # 120 steps × 16 windows: measured 0.18–0.24, the affine map alone 0.49–0.60
    for r in report["layers"]:
        assert r["fvu"] < 0.6 * affine_fvu(data, r["layer"]), r
    assert report["stream"] and report["training"][0]["tokens_per_s"] > 0


def test_auxk_loss_is_the_dead_latents_fit_of_the_residual_and_revives_them() -> None:
    """The auxiliary-k term written out: top d/2 ReLU pre-activations among the dead latents, decoded without bias,
    squared error to the residual, scaled by #dead / (d/2); it is what gives dead latents a gradient."""
    torch.manual_seed(0)
    d, f = 8, 32
    coder = TrainableTranscoder(1, d, f, 4, cross=False, skip=False)
    with torch.no_grad():
        coder.b_enc[0, :16] = -50.0  # latents 0–15 never fire
    x, y = torch.randn(64, d), torch.randn(64, d)
    preds, codes = coder([x])
    assert not (codes[0][1][codes[0][0] > 0] < 16).any()
    dead = torch.zeros(1, f, dtype=torch.bool)
    dead[0, :16] = True
    dead[0, 3] = False  # 15 dead latents; k_aux = 4 of them per token
    e = (y - preds[0]).detach()
    ids = dead[0].nonzero().squeeze(1)
    pre = (x @ coder.W_enc[0, ids].T + coder.b_enc[0, ids]).relu()
    v, j = pre.topk(4, dim=-1)
    e_hat = torch.stack([(v[b, :, None] * coder.W_dec["0_0"][ids[j[b]]]).sum(0) for b in range(64)])
    want = ((e_hat - e) ** 2).sum()  # scale min(15 / 4, 1) = 1
    got = coder.auxk_loss([x], [y - preds[0]], dead)
    torch.testing.assert_close(got, want)
    # fewer dead latents than k_aux: all of them, scaled by #dead / k_aux
    few = torch.zeros(1, f, dtype=torch.bool)
    few[0, [0, 1]] = True
    pre2 = (x @ coder.W_enc[0, :2].T + coder.b_enc[0, :2]).relu()
    e_hat2 = pre2 @ coder.W_dec["0_0"][:2]
    torch.testing.assert_close(coder.auxk_loss([x], [y - preds[0]], few), 2 / 4 * ((e_hat2 - e) ** 2).sum())
    # the main loss gives the dead latents' encoder rows no gradient; the auxiliary loss does
    ((preds[0] - y) ** 2).sum().backward(retain_graph=True)
    assert coder.W_enc.grad[0, ids].abs().sum() == 0
    coder.zero_grad()
    coder.b_enc.data[0, :16] = 0.5  # within reach of the top-k among the dead (pre-activations > 0)
    coder.auxk_loss([x], [y - coder([x])[0][0]], dead).backward()
    assert (coder.W_enc.grad[0, ids].abs().sum(1) > 0).all()
    assert coder.auxk_loss([x], [y], torch.zeros(1, f, dtype=torch.bool)) == 0


def test_clt_trains_and_loads_as_a_cross_layer_transcoder(ray_session, data, tmp_path) -> None:
    cfg = config(data, tmp_path / "clt", kind="clt", steps=150, checkpoint_every=50)
    report = run(cfg)
    # measured 0.18–0.23 after 150 steps
    assert all(r["fvu"] < 0.4 for r in report["layers"]), report["layers"]
    assert report["kl"] >= 0 and 0 <= report["agreement"] <= 1
    root = tmp_path / "clt" / "transcoder"
    cfg0 = json.loads((root / "layers.0.mlp" / "cfg.json").read_text())
    assert cfg0["coalesce_topk"] == "none" and cfg0["n_targets"] == L
    tc = load_transcoder(str(root))
    assert tc.is_cross_layer and sorted(tc.decoders) == [(s, t) for s in range(L) for t in range(s, L)]
    meta = read_meta(Path(data["acts"]))
    coder, s_in, s_out, _ = load_trained(cfg, meta, list(range(L)))
    xs = [val_arrays(data, l)[0] for l in range(L)]
    for got, want in zip(tc.forward(xs), coder.forward_raw(xs, s_in, s_out)):
        assert rel_err(got, want) < 1e-3


def test_layers_split_across_invocations(ray_session, data, tmp_path) -> None:
    cfg = config(data, tmp_path / "split", kind="plt", steps=20, checkpoint_every=20, layers=[0])
    first = run(cfg)
    assert first["missing_layers"] == [1, 2] and [t["layer"] for t in first["training"]] == [0]
    assert not (tmp_path / "split" / "transcoder").exists()
    second = run(cfg.model_copy(update={"layers": [1, 2]}))
    assert [r["layer"] for r in second["layers"]] == [0, 1, 2] and "missing_layers" not in second
    assert load_transcoder(str(tmp_path / "split" / "transcoder")).n_layers == L


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_other_families(ray_session, data, tmp_path, family) -> None:
    """GPT-2 (``h.N.mlp`` folders) and Gemma-2 (MLP output before its post-norm; soft-capped attention, which
    needs eager attention to be the true model)."""
    from attribute_ray import ReplacementModel
    from attribute_ray.loading import load_model

    model_dir = save_tiny_model(tmp_path / "model", family)
    cfg = TrainConfig(model=str(model_dir), dataset=data["corpus"], out=str(tmp_path / "out"), n_tokens=2000,
                      val_tokens=300, ctx_len=32, k=8, batch_tokens=512, steps=60)
    report = run(cfg)
    assert all(r["fvu"] < 0.6 for r in report["layers"]), report["layers"]
    prefix = "h" if family == "gpt2" else "layers"
    assert sorted(p.name for p in (tmp_path / "out" / "transcoder").iterdir()) == [f"{prefix}.{l}.mlp" for l in range(L)]
    tc = load_transcoder(str(tmp_path / "out" / "transcoder"))
    meta = read_meta(cfg.activations_dir())
    window = torch.from_numpy(np.load(cfg.activations_dir() / "windows.npy")[meta["n_train_windows"]].astype(np.int64))
    model, tok = load_model(str(model_dir))
    model.config._attn_implementation = "eager"
    rm = ReplacementModel(load_model(str(model_dir))[0], tok, tc)
    trace = rm.trace(window)
    torch.testing.assert_close(model(input_ids=window[None]).logits[0], trace.logits, rtol=1e-4, atol=1e-4)
    lib = rm.run_replaced(trace, with_errors=False).logits[0]
    torch.testing.assert_close(replacement_logits(model, tc, window[None])[0], lib, rtol=1e-4, atol=1e-4)


def test_config_and_cli_errors(data, tmp_path, capsys) -> None:
    cfg = parse_args(["--model", "m", "--dataset", "d", "--out", "o", "--layers", "0,2-4", "--n-tokens", "1_000"])
    assert cfg.layers == [0, 2, 3, 4] and cfg.n_tokens == 1000 and cfg.kind == "skip-plt"
    assert cfg.n_features(576) == 4608 and cfg.learning_rate(576) == pytest.approx(1e-3 / np.sqrt(4608 / 2**14))
    assert cfg.lr_at(0, 576) < cfg.lr_at(500, 576) and cfg.lr_at(999, 576) < cfg.lr_at(500, 576) / 100
    with pytest.raises(ValueError, match="does not apply to --kind clt"):
        parse_args(["--model", "m", "--dataset", "d", "--out", "o", "--kind", "clt", "--layers", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--dataset", "d", "--out", "o", "--features", "8", "--expansion", "2"])
    out = tmp_path / "x"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"identity": TrainConfig(model=data["model"], dataset=data["corpus"],
                                                                         out=str(out), k=4).train_identity()}))
    capsys.readouterr()
    assert main(["--model", data["model"], "--dataset", data["corpus"], "--out", str(out), "--k", "8"]) == 2
    assert "different settings (k: 4 → 8)" in capsys.readouterr().err
    # a bad dataset fails before any Ray work and does not pin the output folder to its settings
    bad = tmp_path / "bad"
    assert main(["--model", data["model"], "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(bad)]) == 2
    assert "cannot read dataset" in capsys.readouterr().err and not (bad / "config.json").exists()


def test_every_flag_of_the_command_line_reaches_the_config() -> None:
    """The command line is generated from TrainConfig: every field is described, and every flag keeps its spelling."""
    assert all(f.description for f in TrainConfig.model_fields.values())
    argv = ["--model", "m", "--dataset", "d", "--out", "o", "--split", "s", "--text-column", "t", "--kind", "plt",
            "--activations", "a", "--n-tokens", "2_000", "--val-tokens", "300", "--ctx-len", "16", "--no-bos",
            "--filter-bos", "--features", "64", "--k", "4", "--lr", "0.01", "--warmup-steps", "3", "--lr-decay", "0.5",
            "--batch-tokens", "256", "--steps", "10", "--checkpoint-every", "5", "--skip-init", "zeros",
            "--normalize-decoder", "--dead-tokens", "100", "--auxk-alpha", "0.1", "--stream", "--layers", "1-2,5", "--num-workers", "2", "--device", "cpu",
            "--model-dtype", "bfloat16", "--dtype", "float16", "--batch-size", "4", "--seed", "7"]
    expected = dict(model="m", dataset="d", out="o", split="s", text_column="t", kind="plt", activations="a",
                    n_tokens=2000, val_tokens=300, ctx_len=16, bos=False, filter_bos=True, features=64, expansion=8, k=4,
                    lr=0.01, warmup_steps=3, lr_decay=0.5, batch_tokens=256, steps=10, checkpoint_every=5,
                    skip_init="zeros", normalize_decoder=True, dead_tokens=100, auxk_alpha=0.1, stream=True, layers=[1, 2, 5], num_workers=2,
                    device="cpu", model_dtype="bfloat16", dtype="float16", batch_size=4, seed=7)
    assert parse_args(argv).model_dump() == expected
    assert parse_args(["--model", "m", "--dataset", "d", "--out", "o", "--expansion", "4"]).n_features(32) == 4 * 32
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "d", "--out", "o"])
