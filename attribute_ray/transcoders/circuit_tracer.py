"""circuit-tracer format (docs/formats.md §b): ``config.yaml`` + ``layer_{i}.safetensors`` (transcoder set) or
``W_enc_{i}.safetensors`` / ``W_dec_{i}.safetensors`` (cross-layer transcoder); GemmaScope ``params.npz``.

circuit-tracer TopK keeps the k largest pre-activations even when negative (`relu_before_topk=False`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from attribute_ray.errors import TranscoderFormatError
from attribute_ray.transcoders.transcoder import Activation, Decoder, Encoder, Hookpoints, Skip, Transcoder

INPUT_HOOKS = {"mlp.hook_in": "mlp_in", "hook_resid_mid": "resid_mid", "ln2.hook_normalized": "mlp_in_normalized"}
OUTPUT_HOOKS = {"mlp.hook_out": "mlp_out", "hook_mlp_out": "mlp_out_normed"}


def hookpoints_from_config(cfg: dict) -> Hookpoints:
    fin, fout = cfg.get("feature_input_hook"), cfg.get("feature_output_hook")
    if fin not in INPUT_HOOKS or fout not in OUTPUT_HOOKS:
        raise TranscoderFormatError(
            f"config.yaml hooks ({fin!r}, {fout!r}) are not understood; supported inputs {sorted(INPUT_HOOKS)}, "
            f"outputs {sorted(OUTPUT_HOOKS)}. Pass hookpoints=Hookpoints(...) to override."
        )
    return Hookpoints(INPUT_HOOKS[fin], OUTPUT_HOOKS[fout])


def read_config(root: Path) -> dict:
    cfg = yaml.safe_load((root / "config.yaml").read_text()) or {}
    if cfg.get("model_kind") not in ("transcoder_set", "cross_layer_transcoder"):
        raise TranscoderFormatError(f"{root}/config.yaml: model_kind must be transcoder_set or cross_layer_transcoder")
    return cfg


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:  # never unpickle
            return {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _need(t: dict[str, Tensor], key: str, where: Path) -> Tensor:
    if key not in t:
        raise TranscoderFormatError(f"{where}: missing tensor {key!r} (present: {sorted(t)})")
    return t[key]


def _activation(cfg: dict, has_threshold: bool, k: int | None) -> Activation:
    kind = cfg.get("activation")
    if kind in (None, "relu", "jump_relu", "jumprelu"):
        if k is not None and kind is None:
            return Activation("topk", k=k, relu_before_topk=False)
        return Activation("jumprelu" if has_threshold else "relu")
    if kind == "topk":
        k = cfg.get("k", k)
        if k is None:
            raise TranscoderFormatError("config.yaml: activation topk without k")
        return Activation("topk", k=int(k), relu_before_topk=False)
    return Activation(kind)  # raises UnknownActivationError


def layer_files(root: Path, cfg: dict, resolve_file) -> list[Path]:
    """Per-layer files of a transcoder set, in layer order (config `transcoders` list or layer_*.safetensors)."""
    if "transcoders" in cfg:
        entries = cfg["transcoders"]
        paths = []
        for e in entries:
            if isinstance(e, dict):  # legacy v0.1: {id, layer, filepath}
                e = e["filepath"]
            paths.append(resolve_file(str(e)))
        return paths
    found = {int(m.group(1)): p for p in root.glob("layer_*.safetensors") if (m := re.match(r"layer_(\d+)\.safetensors$", p.name))}
    if sorted(found) != list(range(len(found))) or not found:
        raise TranscoderFormatError(f"{root}: expected layer_0..layer_N.safetensors, found layers {sorted(found)}")
    return [found[i] for i in range(len(found))]


def load_transcoder_set(files: list[Path], cfg: dict, *, hookpoints: Hookpoints | None, name: str) -> Transcoder:
    """Per-layer transcoders, one file per layer (safetensors, or GemmaScope params.npz)."""
    encoders, biases, decoders, skips, thresholds, ks = [], [], {}, {}, [], set()
    for layer, path in enumerate(files):
        t = _read(path)
        if "log_thresholds" in t:
            raise TranscoderFormatError(f"{path}: log_thresholds is not supported (circuit-tracer rejects it too)")
        if path.suffix == ".npz":  # GemmaScope: W_enc is [D, F]
            W_enc = _need(t, "W_enc", path).T.contiguous()
            threshold = _need(t, "threshold", path)
        else:
            W_enc = _need(t, "W_enc", path)
            threshold = t.get("activation_function.threshold", t.get("threshold"))
        if "k" in t:
            ks.add(int(t["k"]))
        thresholds.append(threshold is not None)
        encoders.append(Encoder(W_enc, _need(t, "b_enc", path), threshold))
        decoders[(layer, layer)] = Decoder(_need(t, "W_dec", path))
        biases.append(_need(t, "b_dec", path))
        if "W_skip" in t:
            skips[(layer, layer)] = Skip(t["W_skip"])
        elif "affine_skip_connection" in t:  # GemmaScope-2 stores [in, out]
            skips[(layer, layer)] = Skip(t["affine_skip_connection"].T.contiguous())
    if len(set(thresholds)) > 1:
        raise TranscoderFormatError("some layers have a JumpReLU threshold and others do not")
    if len(ks) > 1:
        raise TranscoderFormatError(f"layers disagree on top-k k: {sorted(ks)}")
    return Transcoder(
        encoders=encoders,
        decoders=decoders,
        biases=biases,
        activation=_activation(cfg, thresholds[0], ks.pop() if ks else None),
        skips=skips,
        hookpoints=hookpoints or hookpoints_from_config(cfg),
        name=name,
        format="circuit-tracer",
    )


def load_clt(root: Path, cfg: dict, *, hookpoints: Hookpoints | None, name: str) -> Transcoder:
    """circuit-tracer CLT directory: W_enc_{i} (W_enc_i, b_enc_i, b_dec_i, threshold_i?) + W_dec_{i} [F, L-i, D]."""
    enc_files = {int(m.group(1)): p for p in root.glob("W_enc_*.safetensors") if (m := re.match(r"W_enc_(\d+)\.safetensors$", p.name))}
    L = len(enc_files)
    if L == 0 or sorted(enc_files) != list(range(L)):
        raise TranscoderFormatError(f"{root}: expected W_enc_0..W_enc_N.safetensors, found {sorted(enc_files)}")
    encoders, biases, decoders, has_thr = [], [], {}, []
    for i in range(L):
        e = _read(enc_files[i])
        thr = e.get(f"threshold_{i}")
        if thr is not None and thr.ndim == 2:
            thr = thr.squeeze(0)
        has_thr.append(thr is not None)
        encoders.append(Encoder(_need(e, f"W_enc_{i}", enc_files[i]), _need(e, f"b_enc_{i}", enc_files[i]), thr))
        biases.append(_need(e, f"b_dec_{i}", enc_files[i]))
        dpath = root / f"W_dec_{i}.safetensors"
        if not dpath.is_file():
            raise TranscoderFormatError(f"{root}: missing W_dec_{i}.safetensors")
        W = _need(_read(dpath), f"W_dec_{i}", dpath)
        if W.ndim != 3 or W.shape[1] != L - i:
            raise TranscoderFormatError(f"{dpath}: W_dec_{i} must be [F, {L - i}, D], got {list(W.shape)}")
        for j in range(L - i):
            decoders[(i, i + j)] = Decoder(W[:, j])
    if len(set(has_thr)) > 1:
        raise TranscoderFormatError(f"{root}: some layers have threshold_i and others do not")
    act = cfg.get("activation")
    if act not in (None, "relu", "jump_relu", "jumprelu"):
        raise TranscoderFormatError(f"{root}: circuit-tracer CLTs support relu/jump_relu only, not {act!r}")
    return Transcoder(
        encoders=encoders,
        decoders=decoders,
        biases=biases,
        activation=Activation("jumprelu" if has_thr[0] else "relu"),
        hookpoints=hookpoints or hookpoints_from_config(cfg),
        name=name,
        format="circuit-tracer",
    )


def load_gemmascope(files: list[Path], *, hookpoints: Hookpoints | None, name: str) -> Transcoder:
    """GemmaScope v1 ``params.npz`` per layer (JumpReLU). Reads TL ``ln2.hook_normalized`` (before the
    pre-feedforward norm's gain) and writes ``hook_mlp_out`` (after the post-feedforward norm)."""
    return load_transcoder_set(
        files, {}, hookpoints=hookpoints or Hookpoints("mlp_in_normalized", "mlp_out_normed"), name=name
    )


# ----- writer ----------------------------------------------------------------------------------

_SITE_TO_HOOK = {v: k for k, v in {**INPUT_HOOKS, **OUTPUT_HOOKS}.items()}


def save_circuit_tracer(tc: Transcoder, root: Path | str, *, model_name: str = "") -> Path:
    """Write `tc` in circuit-tracer's format (PLT set, or CLT directory). Fails for what the format
    cannot hold: post_enc gates, sparsify's ReLU-then-TopK, CLT skip connections."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    act = tc.activation
    if act.kind == "topk" and act.relu_before_topk:
        raise TranscoderFormatError("circuit-tracer TopK keeps negative pre-activations; TopK(ReLU) is not representable")
    if any(d.offset is not None or d.scale is not None for d in tc.decoders.values()):
        raise TranscoderFormatError("post_enc gates cannot be stored in circuit-tracer's format")
    cfg = {
        "model_name": model_name,
        "model_kind": "cross_layer_transcoder" if tc.is_cross_layer else "transcoder_set",
        "feature_input_hook": _SITE_TO_HOOK[tc.hookpoints.input],
        "feature_output_hook": _SITE_TO_HOOK[tc.hookpoints.output],
    }
    if act.kind == "topk":
        if act.per_layer:
            raise TranscoderFormatError(f"circuit-tracer's config.yaml holds one k; this one has per-layer k {act.k}")
        cfg.update(activation="topk", k=act.k)
    L = tc.n_layers
    for i, enc in enumerate(tc.encoders):
        W_enc = (enc.W * enc.in_scale).contiguous()
        if tc.is_cross_layer:
            if tc.targets(i) != list(range(i, L)):
                raise TranscoderFormatError(f"circuit-tracer CLTs write to every later layer; layer {i} writes to {tc.targets(i)}")
            if tc.skips:
                raise TranscoderFormatError("circuit-tracer's CLT files cannot store skip connections")
            e = {f"W_enc_{i}": W_enc, f"b_enc_{i}": enc.b, f"b_dec_{i}": tc.biases[i]}
            if enc.threshold is not None:
                e[f"threshold_{i}"] = enc.threshold
            W_dec = torch.stack([tc.decoders[(i, t)].W * tc.decoders[(i, t)].coef for t in range(i, L)], dim=1)
            save_file(_cpu(e), str(root / f"W_enc_{i}.safetensors"))
            save_file(_cpu({f"W_dec_{i}": W_dec}), str(root / f"W_dec_{i}.safetensors"))
        else:
            dec = tc.decoders[(i, i)]
            t = {"W_enc": W_enc, "b_enc": enc.b, "W_dec": dec.W * dec.coef, "b_dec": tc.biases[i]}
            if enc.threshold is not None:
                t["activation_function.threshold"] = enc.threshold
            if (i, i) in tc.skips:
                t["W_skip"] = tc.skips[(i, i)].W * tc.skips[(i, i)].coef
            save_file(_cpu(t), str(root / f"layer_{i}.safetensors"))
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def _cpu(t: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}
