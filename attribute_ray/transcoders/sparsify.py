"""sparsify / EleutherAI clt-training format: one folder per hookpoint with cfg.json + sae.safetensors.

Layout (docs/formats.md §a): ``{root}/layers.{i}.mlp/`` (Llama/Qwen/Gemma), ``h.{i}.mlp`` (GPT-2) or
``model.layers.{i}.mlp``. Supported modes: per-layer (with/without skip), untied CLT (``coalesce_topk="none"``,
optionally ``per_source_tied`` and ``divide_cross_layer``), per-target tied CLT (``"concat"``), per-layer
coalesced (``"per-layer"``); gated ``post_enc(s)``, ``post_enc_scale(s)``, ``normalize_io``.

Folding into the in-memory `Transcoder` (x̂_S = x_S·√D/in_norm_S, out scale o_T = out_norm_T/√D,
d_T = #live sources at T − 1 with divide_cross_layer, else 1):
  none:    coef_{S,T} = o_T·(1 if S == T else 1/d_T);  bias_T = o_T·(b_decs_T.0 + Σ_{S<T} b_decs_S.{T−S}/d_T);
           skip_{S,T} = W_skips_S.{T−S} with coef o_T·in_scale_S·(1 or 1/d_T)
  concat:  W_{S,T} = W_dec_T (shared), coef o_T; bias_T = o_T·b_dec_T; skip_{T,T} = W_skip_T
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from attribute_ray.errors import TranscoderFormatError, UnknownActivationError
from attribute_ray.transcoders.transcoder import Activation, Decoder, Encoder, Hookpoints, Skip, Transcoder

HOOKPOINT_RE = re.compile(r"^(?:model\.)?(?:layers|h|transformer\.h)\.(\d+)\.mlp$")
KNOWN_CFG = {
    "d_in", "num_latents", "expansion_factor", "k", "activation", "transcode", "skip_connection", "n_targets",
    "n_sources", "coalesce_topk", "topk_coalesced", "per_source_tied", "secondary_target_tied",
    "divide_cross_layer", "normalize_io", "post_encoder_scale", "train_post_encoder", "normalize_decoder",
    "multi_topk", "tp_output", "use_fp8", "dtype", "matryoshka", "matryoshka_expansion_factors",
    "matryoshka_k_values", "remove_first_token",
}


def find_hookpoints(root: Path) -> dict[int, Path]:
    """{layer: folder} for every ``*.mlp`` hookpoint folder holding cfg.json + sae.safetensors."""
    found: dict[int, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        m = HOOKPOINT_RE.match(folder.name)
        if m and (folder / "cfg.json").is_file():
            layer = int(m.group(1))
            if layer in found:
                raise TranscoderFormatError(f"two folders for layer {layer}: {found[layer].name}, {folder.name}")
            found[layer] = folder
    return found


def is_sparsify_dir(root: Path) -> bool:
    return root.is_dir() and bool(find_hookpoints(root))


def _read_layer(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    cfg = json.loads((folder / "cfg.json").read_text())
    path = folder / "sae.safetensors"
    if not path.is_file():
        raise TranscoderFormatError(f"{folder}: missing sae.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


# ----- the training run's root config.json --------------------------------------------------------

MODULE_RE = re.compile(r"^(?:model\.)?(?:layers|h|transformer\.h)\.(\d+)\.(.+)$")
# clt-training `hookpoints_in`: the transcoder reads the *input* of the named module (docs/formats.md §d).
INPUT_MODULES = {
    "mlp": "mlp_in",
    "post_attention_layernorm": "resid_mid",  # the MLP norm of Llama, Mistral, Qwen2/3
    "pre_feedforward_layernorm": "resid_mid",  # the MLP norm of Gemma-2
    "ln_2": "resid_mid",  # the MLP norm of GPT-2
}
# In Gemma-2/3 `post_attention_layernorm` normalises the attention output: its input is no site of ours.
NOT_AN_INPUT = {"post_attention_layernorm": re.compile(r"gemma-?[23]", re.IGNORECASE)}


def read_run_config(root: Path, L: int, *, input_site: bool = True) -> tuple[list[int] | None, str | None]:
    """(k of each layer 0..L-1, input site) from the run's root ``config.json`` (EleutherAI clt-training /
    sparsify `TrainConfig`), whose `per_layer_k` and `hookpoints_in` are indexed like its `hookpoints`.
    None for what it does not say; the site is not read when `input_site` is false (the caller overrides it)."""
    path = root / "config.json"
    if not path.is_file():
        return None, None
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TranscoderFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(run, dict) or not (run.get("per_layer_k") or (input_site and run.get("hookpoints_in"))):
        return None, None
    order = _layer_order(path, run.get("hookpoints"), L)
    return _per_layer_k(path, run.get("per_layer_k"), order, L), (_input_site(path, run, order) if input_site else None)


def _layer_order(path: Path, hookpoints, L: int) -> list[int]:
    """The layer of each position in the run's `hookpoints` (0..L-1 when the list is absent)."""
    if not hookpoints:
        return list(range(L))
    if not isinstance(hookpoints, list) or not all(isinstance(h, str) and HOOKPOINT_RE.match(h) for h in hookpoints):
        raise TranscoderFormatError(f"{path}: hookpoints {hookpoints!r} are not layers.N.mlp module names")
    return [int(HOOKPOINT_RE.match(h).group(1)) for h in hookpoints]


def _per_layer_k(path: Path, ks, order: list[int], L: int) -> list[int] | None:
    if not ks:
        return None
    if not isinstance(ks, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise TranscoderFormatError(f"{path}: per_layer_k must be a list of positive ints, got {ks!r}")
    if len(ks) != len(order) or sorted(order) != list(range(L)):
        raise TranscoderFormatError(
            f"{path}: per_layer_k has {len(ks)} entries for hookpoint layers {order}; need one per layer 0..{L - 1}"
        )
    by_layer = dict(zip(order, ks))
    return [by_layer[i] for i in range(L)]


def _input_site(path: Path, run: dict, order: list[int]) -> str | None:
    names = run.get("hookpoints_in")
    if not names:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TranscoderFormatError(f"{path}: hookpoints_in must be a list of module names, got {names!r}")
    if len(names) > len(order):
        raise TranscoderFormatError(f"{path}: {len(names)} hookpoints_in for {len(order)} hookpoints")
    sites = []
    for i, name in enumerate(names):
        m = MODULE_RE.match(name)
        module = m.group(2) if m else None
        unmapped = module not in INPUT_MODULES or (
            module in NOT_AN_INPUT and NOT_AN_INPUT[module].search(str(run.get("model", "")))
        )
        if unmapped:
            raise TranscoderFormatError(
                f"{path}: hookpoints_in entry {name!r} names no input site attribute-ray knows (the input of "
                f"{sorted(INPUT_MODULES)} in a decoder layer); pass hookpoints=Hookpoints(...) to override"
            )
        if int(m.group(1)) != order[i]:
            raise TranscoderFormatError(f"{path}: hookpoints_in entry {name!r} feeds the transcoder of layer {order[i]}")
        sites.append(INPUT_MODULES[module])
    # clt-training reads the hookpoint module's own input (mlp_in) for positions past the end of hookpoints_in.
    sites += ["mlp_in"] * (len(order) - len(names))
    if len(set(sites)) != 1:
        raise TranscoderFormatError(
            f"{path}: hookpoints_in gives layers different input sites {sites}; one site for all layers is supported"
        )
    return sites[0]


def load_sparsify(root: Path, *, hookpoints: Hookpoints | None = None, name: str = "") -> Transcoder:
    """Load every ``*.mlp`` folder of `root` (layers must be 0..L-1). A root ``config.json`` of the training
    run sets the per-layer k (`per_layer_k`) and the input site (`hookpoints_in`); `hookpoints` overrides the latter."""
    folders = find_hookpoints(root)
    if not folders:
        raise TranscoderFormatError(f"{root}: no sparsify hookpoint folders (layers.N.mlp/cfg.json) found")
    L = len(folders)
    if sorted(folders) != list(range(L)):
        raise TranscoderFormatError(f"{root}: hookpoint layers {sorted(folders)} are not 0..{L - 1}")
    layers = [_read_layer(folders[i]) for i in range(L)]
    cfgs = [c for c, _ in layers]
    mode = _check_cfgs(root, cfgs)
    run_k, run_site = read_run_config(root, L, input_site=hookpoints is None)

    n_targets = [max(1, int(c.get("n_targets", 0))) if c.get("transcode") else 1 for c in cfgs]
    live = {t: [s for s in range(L) if s <= t < s + n_targets[s]] for t in range(L)}
    for s, n in enumerate(n_targets):
        if s + n > L:
            raise TranscoderFormatError(f"layer {s}: n_targets={n} writes past the last layer {L - 1}")

    encoders, in_scale, out_scale = [], [], []
    for s, (cfg, t) in enumerate(layers):
        where = f"{folders[s].name}/sae.safetensors"
        W, b = _get(t, "encoder.weight", where), _get(t, "encoder.bias", where)
        D = cfg.get("d_in", W.shape[1])
        if cfg.get("normalize_io"):
            in_scale.append(math.sqrt(D) / float(_get(t, "in_norm", where)))
            out_scale.append(float(_get(t, "out_norm", where)) / math.sqrt(D))
        else:
            in_scale.append(1.0)
            out_scale.append(1.0)
        encoders.append(Encoder(W, b, None, in_scale[s]))

    decoders: dict[tuple[int, int], Decoder] = {}
    skips: dict[tuple[int, int], Skip] = {}
    biases: list[Tensor] = []
    for tgt in range(L):
        cfg_t, ten_t = layers[tgt]
        where_t = f"{folders[tgt].name}/sae.safetensors"
        D = encoders[tgt].W.shape[1]
        o = out_scale[tgt]
        divide = max(1, len(live[tgt]) - 1) if (mode == "none" and cfg_t.get("divide_cross_layer")) else 1
        bias = torch.zeros(D, dtype=encoders[tgt].W.dtype)
        for i, src in enumerate(live[tgt]):
            cfg_s, ten_s = layers[src]
            where_s = f"{folders[src].name}/sae.safetensors"
            j = tgt - src
            cross = 1.0 if src == tgt else 1.0 / divide
            offset, scale = _gate(ten_s, cfg_s, j, where_s)
            if mode == "none":
                W = _indexed(ten_s, "W_dec", j, where_s, tied=bool(cfg_s.get("per_source_tied")))
                b = _indexed(ten_s, "b_dec", j, where_s, tied=False, optional=True)
                if b is not None:
                    bias = bias + b * cross
                W_skip = _indexed(ten_s, "W_skip", j, where_s, tied=False) if cfg_s.get("skip_connection") else None
                if W_skip is not None and (W_skip.shape != (D, D) or torch.any(W_skip)):  # all-zero skips are dropped
                    skips[(src, tgt)] = Skip(W_skip, o * in_scale[src] * cross)
            elif mode == "concat":
                W = _get(ten_t, "W_dec", where_t)
            else:  # per-layer coalesced: row block i of the target's stacked decoder
                stacked = _get(ten_t, "W_dec", where_t)
                F = encoders[src].W.shape[0]
                if stacked.shape[0] < (i + 1) * F:
                    raise TranscoderFormatError(f"{where_t}: W_dec has {stacked.shape[0]} rows, need {(i + 1) * F}")
                W = stacked[i * F : (i + 1) * F]
            decoders[(src, tgt)] = Decoder(W, o * cross, offset, scale)
        if mode != "none":
            bias = _get(ten_t, "b_dec", where_t).clone()
            if cfg_t.get("skip_connection"):
                skips[(tgt, tgt)] = Skip(_get(ten_t, "W_skip", where_t), o * in_scale[tgt])
        biases.append(bias * o)

    _reject_unexpected(layers, folders, mode)
    ks = [int(c.get("k", 32)) for c in cfgs]
    if run_k is not None:
        wrong = [i for i in range(L) if "k" in cfgs[i] and ks[i] != run_k[i]]
        if wrong:  # the trainer sets every layer's k from per_layer_k at each step: that is what it trained with
            warnings.warn(f"{root}: cfg.json k of layers {wrong} differ from config.json per_layer_k; using per_layer_k",
                          stacklevel=3)
        ks = run_k
    return Transcoder(
        encoders=encoders,
        decoders=decoders,
        biases=biases,
        activation=Activation("topk", k=tuple(ks), relu_before_topk=True),
        skips=skips,
        hookpoints=hookpoints or Hookpoints(run_site or "mlp_in", "mlp_out"),
        name=name or str(root),
        format="sparsify",
    )


def _check_cfgs(root: Path, cfgs: list[dict]) -> str:
    modes = {c.get("coalesce_topk", "none") for c in cfgs}
    if len(modes) != 1:
        raise TranscoderFormatError(f"{root}: layers disagree on coalesce_topk: {sorted(modes)}")
    mode = modes.pop()
    for i, c in enumerate(cfgs):
        act = c.get("activation", "topk")
        if act != "topk":
            raise UnknownActivationError(
                f"layer {i}: sparsify activation {act!r} is not supported (topk only; batchtopk depends on the "
                "batch and groupmax is not implemented)"
            )
        if mode not in ("none", "concat", "per-layer"):
            raise TranscoderFormatError(f"layer {i}: coalesce_topk={mode!r} is not supported")
        if mode != "none" and c.get("topk_coalesced"):
            raise TranscoderFormatError(f"layer {i}: topk_coalesced=true (a second top-k across sources) is not supported")
        if c.get("secondary_target_tied"):
            raise TranscoderFormatError(f"layer {i}: secondary_target_tied is not supported")
        if not c.get("transcode", False):
            raise TranscoderFormatError(f"layer {i}: cfg.json has transcode=false: this is an SAE, not a transcoder")
        unknown = set(c) - KNOWN_CFG
        if unknown:
            # Unknown keys are ignored on load by sparsify itself; keep that, but make them visible.
            warnings.warn(f"layer {i}: ignoring unknown cfg.json keys {sorted(unknown)}", stacklevel=3)
    return mode


def _get(t: dict[str, Tensor], key: str, where: str) -> Tensor:
    if key not in t:
        raise TranscoderFormatError(f"{where}: missing tensor {key!r} (present: {sorted(t)})")
    return t[key]


def _indexed(t: dict[str, Tensor], base: str, j: int, where: str, *, tied: bool, optional: bool = False) -> Tensor | None:
    """`{base}s.{j}`, falling back to the alias `{base}` for j == 0 (or always when `tied`)."""
    key = f"{base}s.{j}"
    if not tied and key in t:
        return t[key]
    if (tied or j == 0) and base in t:
        return t[base]
    if optional:
        return None
    raise TranscoderFormatError(f"{where}: missing tensor {key!r} (present: {sorted(t)})")


def _gate(t: dict[str, Tensor], cfg: dict, j: int, where: str) -> tuple[Tensor | None, Tensor | None]:
    offset = t.get(f"post_encs.{j}", t.get("post_enc") if j == 0 else None)
    scale = t.get(f"post_enc_scales.{j}", t.get("post_enc_scale") if j == 0 else None)
    if cfg.get("post_encoder_scale") and scale is None:
        raise TranscoderFormatError(f"{where}: post_encoder_scale=true but no post_enc_scales.{j}")
    if offset is not None and not torch.any(offset):
        offset = None  # older files / untrained offsets: zeros are the same as no offset
    return offset, scale


_ALLOWED = re.compile(
    r"^(encoder\.weight|encoder\.bias|W_dec|b_dec|W_skip|post_enc|post_enc_scale|in_norm|out_norm|"
    r"W_decs\.\d+|b_decs\.\d+|W_skips\.\d+|post_encs\.\d+|post_enc_scales\.\d+)$"
)


def _reject_unexpected(layers: list[tuple[dict, dict[str, Tensor]]], folders: dict[int, Path], mode: str) -> None:
    for i, (_, t) in enumerate(layers):
        bad = sorted(k for k in t if not _ALLOWED.match(k))
        if bad:
            raise TranscoderFormatError(f"{folders[i].name}/sae.safetensors: unexpected tensors {bad}")


# ----- writer ----------------------------------------------------------------------------------


def save_sparsify(tc: Transcoder, root: Path | str, *, layer_prefix: str = "layers") -> Path:
    """Write `tc` as one ``{layer_prefix}.{i}.mlp`` folder per layer. Scalars are folded into the weights
    (normalize_io=false). Per-layer transcoders and untied CLTs are written with ``coalesce_topk="none"``,
    CLTs whose decoders are shared per target with ``"concat"``."""
    if tc.activation.kind != "topk" or not tc.activation.relu_before_topk:
        raise TranscoderFormatError(
            f"sparsify stores TopK(ReLU(.)) transcoders only; this one has activation {tc.activation}"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    L = tc.n_layers
    concat = _is_concat(tc)
    for s in range(L):
        targets = tc.targets(s)
        if targets != list(range(s, s + len(targets))):
            raise TranscoderFormatError(f"layer {s} writes to non-contiguous targets {targets}")
        enc = tc.encoders[s]
        t: dict[str, Tensor] = {"encoder.weight": enc.W * enc.in_scale, "encoder.bias": enc.b}
        for j, tgt in enumerate(targets):
            dec = tc.decoders[(s, tgt)]
            if dec.offset is not None:
                t[f"post_encs.{j}"] = dec.offset
            if dec.scale is not None:
                t[f"post_enc_scales.{j}"] = dec.scale
            if concat:
                continue
            t[f"W_decs.{j}"] = dec.W * dec.coef
            t[f"b_decs.{j}"] = tc.biases[tgt] if j == 0 else torch.zeros_like(tc.biases[tgt])
            if (s, tgt) in tc.skips:
                t[f"W_skips.{j}"] = tc.skips[(s, tgt)].W * tc.skips[(s, tgt)].coef
        if concat:
            t["W_dec"] = tc.decoders[(s, s)].W * tc.decoders[(s, s)].coef
            t["b_dec"] = tc.biases[s]
            if (s, s) in tc.skips:
                t["W_skip"] = tc.skips[(s, s)].W * tc.skips[(s, s)].coef
        if any(key.startswith("W_skips") for key in t):  # the format needs all or none: a missing skip is zero
            for j in range(len(targets)):
                t.setdefault(f"W_skips.{j}", torch.zeros(tc.d_model, tc.d_model, dtype=enc.W.dtype))
        has_scale = any(k.startswith("post_enc_scales") for k in t)
        if has_scale:  # the format needs all or none
            for j, tgt in enumerate(targets):
                t.setdefault(f"post_enc_scales.{j}", torch.ones_like(enc.b))
        cfg = {
            "d_in": tc.d_model,
            "num_latents": tc.n_features(s),
            "k": tc.activation.k_at(s),
            "activation": "topk",
            "transcode": True,
            "skip_connection": any(k.startswith("W_skip") for k in t),
            "n_targets": len(targets) if tc.is_cross_layer else 0,
            "n_sources": len(tc.sources(s)) if tc.is_cross_layer else 0,
            "coalesce_topk": "concat" if concat else "none",
            "topk_coalesced": False,
            "normalize_io": False,
            "post_encoder_scale": has_scale,
            "divide_cross_layer": False,
        }
        folder = root / f"{layer_prefix}.{s}.mlp"
        folder.mkdir(exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in t.items()}, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return root


def _is_concat(tc: Transcoder) -> bool:
    """True when each target's decoders are one shared tensor with one coefficient (per-target tied CLT)."""
    if not tc.is_cross_layer:
        return False
    for t in range(tc.n_layers):
        decs = [tc.decoders[(s, t)] for s in tc.sources(t)]
        if len({id(d.W) for d in decs}) != 1 or len({d.coef for d in decs}) != 1:
            return False
        if any(s != t for s, tt in tc.skips if tt == t):
            return False
    return True
