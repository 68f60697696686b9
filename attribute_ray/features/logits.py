"""Direct logit effects of features: the tokens each feature's decoder directions push up and down."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from attribute_ray.features.partials import FeatureKey
from attribute_ray.replacement import ReplacementModel


def logit_effects(
    model: ReplacementModel,
    layer_features: Mapping[int, Sequence[int]] | None = None,
    k: int = 10,
    *,
    chunk_size: int | None = None,
    post_mlp_gain: bool = True,
) -> dict[FeatureKey, tuple[list[str], list[str]]]:
    """Top-k / bottom-k tokens of each feature's direct logit effect (strings from ``model.tokenizer``).

    For feature f of source layer S:
        v = Σ_{T ∈ targets(S)} coef_{S,T} · scale_{S,T}[f] · W_{S,T}[f]          [D] (scale 1 if absent; offsets ignored)
        v ← v − mean(v) for a LayerNorm family (LayerNorm centres its input)
        logits = (v ⊙ g_final) @ W_U                                           [vocab]
    with g_final the final norm's gain (rms: w; rms_gemma: 1 + w; layernorm: w). With `post_mlp_gain` and a
    transcoder writing at ``mlp_out`` of a family with a post-MLP norm (Gemma-2), each target's term is also
    multiplied by that layer's post-MLP norm gain (1 + w), the norm the write passes through before the
    residual. Data-dependent norm scales are ignored. Computed per source layer in feature chunks of
    [chunk, vocab] logits; `layer_features` None means every feature of every layer.
    """
    tc, fam = model.transcoder, model.family
    W_U = model.unembedding.detach()  # [D, V]
    D, V = W_U.shape
    k = min(k, V)
    chunk = chunk_size or max(1, min(4096, (1 << 24) // V))

    def gain(norm) -> torch.Tensor:
        w = norm.weight.detach().float()
        return 1.0 + w if fam.norm == "rms_gemma" else w

    g_final = gain(fam.get(model.model, fam.final_norm))
    post = {}
    if post_mlp_gain and fam.post_mlp_norm and tc.hookpoints.output == "mlp_out":
        layers = fam.decoder_layers(model.model)
        post = {t: gain(fam.get(layers[t], fam.post_mlp_norm)) for t in range(tc.n_layers)}
    mm_dtype = torch.float32 if W_U.device.type == "cpu" else W_U.dtype
    W = W_U.to(mm_dtype)

    if layer_features is None:
        layer_features = {s: range(tc.n_features(s)) for s in range(tc.n_layers)}
    top_ids, bot_ids, keys = [], [], []
    with torch.no_grad():
        for s, feats in layer_features.items():
            feats = torch.as_tensor(list(feats), dtype=torch.long)
            for c0 in range(0, len(feats), chunk):
                idx = feats[c0 : c0 + chunk]
                dev_idx = idx.to(tc.device)
                v = torch.zeros(len(idx), D, dtype=torch.float32, device=W_U.device)
                for t in tc.targets(s):
                    dec = tc.decoders[(s, t)]
                    w = dec.W[dev_idx].float() * dec.coef
                    if dec.scale is not None:
                        w = w * dec.scale[dev_idx].float()[:, None]
                    if t in post:
                        w = w * post[t]
                    v += w.to(v.device)
                if fam.norm == "layernorm":
                    v = v - v.mean(-1, keepdim=True)
                logits = (v * g_final.to(v.device)).to(mm_dtype) @ W
                top_ids.append(logits.topk(k, dim=-1).indices.cpu())
                bot_ids.append(logits.topk(k, dim=-1, largest=False).indices.cpu())
                keys.extend((int(s), int(f)) for f in idx.tolist())
    if not keys:
        return {}
    top = torch.cat(top_ids).numpy()
    bot = torch.cat(bot_ids).numpy()
    uniq = np.unique(np.concatenate([top.ravel(), bot.ravel()])).tolist()
    strings = dict(zip(uniq, model.tokenizer.batch_decode([[i] for i in uniq])))
    return {key: ([strings[i] for i in t], [strings[i] for i in b]) for key, t, b in zip(keys, top.tolist(), bot.tolist())}
