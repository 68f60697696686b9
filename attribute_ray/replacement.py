"""The local replacement model (method.md §1–2): a Hugging Face causal LM with transcoders in place of its MLPs.

One `trace()` runs the real model on a prompt and records everything attribution needs: transcoder
inputs, MLP outputs, active features, reconstructions and errors, attention patterns and norm scales.
Three ways to run the model afterwards, all by temporary hooks on the unmodified HF modules:

- ``trace(tokens, linearise=True)``: the real forward, whose autograd graph is the *linearised* model:
  attention patterns and norm scales detached, MLP output = skip(x) + stopgrad(y − skip(x)), the
  token-embedding output the only leaf.
- ``run_replaced(trace)``: MLPs never run; each output site gets transcoder(x_live) + recorded error.
- ``run_frozen(trace)``: patterns and norm scales replayed from the trace, MLP output =
  skip(x_live) + recorded constant — exactly linear in additions at the embedding and output sites
  (``Additions``), which is how attributions are checked by intervention.
"""

from __future__ import annotations

import contextvars
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from attribute_ray.errors import HubUnavailableError, ShapeMismatchError
from attribute_ray.families import Family, family_for, norm_apply_gain, norm_normalized, norm_scale
from attribute_ray.transcoders import Transcoder, load_transcoder

ATTN_IMPLEMENTATION = "attribute_ray"
_ACTIVE: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("attribute_ray_run", default=None)


@dataclass
class ActiveFeatures:
    """Active transcoder features in (layer, pos, feature) order: each tensor is [n].

    `values` is the activation the decoder consumes at the feature's own layer (a'_{S,S}: for JumpReLU the
    full pre-activation); `raw` is the activation-function output a, from which every target's gated
    activation is derived."""

    layers: Tensor
    positions: Tensor
    indices: Tensor
    values: Tensor
    raw: Tensor

    def __len__(self) -> int:
        return self.layers.numel()

    def as_matrix(self) -> Tensor:
        """[n, 3] (layer, pos, feature), circuit-tracer's `active_features`."""
        return torch.stack([self.layers, self.positions, self.indices], dim=1)

    def of_layer(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        m = self.layers == layer
        return self.positions[m], self.indices[m], self.values[m]


@dataclass
class Trace:
    """One recorded forward of a single prompt (T positions, L layers, D = d_model)."""

    tokens: Tensor  # [T]
    logits: Tensor  # [T, vocab]
    inputs: list[Tensor]  # [T, D] input-site tensor of each layer
    mlp_outputs: list[Tensor]  # [T, D] real MLP output at each output site
    reconstructions: list[Tensor]  # [T, D] transcoder output ŷ at each output site
    errors: list[Tensor]  # [T, D] y − ŷ, zero at zero positions
    features: ActiveFeatures  # zero positions excluded
    patterns: list[Tensor]  # [1, H, T, T] post-softmax attention per layer
    norm_scales: dict[str, Tensor]  # name -> [1, T, 1] frozen norm factor (fp32)
    final_resid: Tensor  # [T, D] final-norm output (the unembedding input)
    n_zero: int  # leading positions whose features and errors are zeroed (BOS)
    graph: LinearGraph | None = None  # set when traced with linearise=True


@dataclass
class LinearGraph:
    """Tensors of the linearised autograd graph (batch dim 1): `embed` is the only leaf; gradients can be
    injected at `inputs[l]` (feature targets) or `final` (logit targets) and read at `outputs[l]`/`embed`."""

    embed: Tensor  # [1, T, D]
    inputs: list[Tensor]  # [1, T, D] input sites
    outputs: list[Tensor]  # [1, T, D] output sites (the replaced MLP outputs)
    final: Tensor  # [1, T, D] final-norm output


@dataclass
class Additions:
    """Vectors added during a frozen/replaced run: [B, T, D] or [T, D] at the embedding output and at
    the transcoder output site of given layers."""

    embed: Tensor | None = None
    mlp_out: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class RunOutput:
    logits: Tensor  # [B, T, vocab]
    inputs: list[Tensor]  # [B, T, D] input-site tensors
    final_resid: Tensor  # [B, T, D]


Mode = Literal["record", "replaced", "frozen", "capture"]


@dataclass
class _Run:
    mode: Mode
    linearise: bool = False
    with_errors: bool = True
    trace: Trace | None = None
    add: Additions = field(default_factory=Additions)
    inputs: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)
    mlp_real: dict[int, Tensor] = field(default_factory=dict)
    patterns: dict[int, Tensor] = field(default_factory=dict)
    scales: dict[str, Tensor] = field(default_factory=dict)
    embed_out: Tensor | None = None
    final_resid: Tensor | None = None


class ReplacementModel:
    """A causal LM plus a `Transcoder`, with the hooks that make the local replacement model."""

    def __init__(self, model: nn.Module, tokenizer, transcoder: Transcoder, *, n_zero_positions: int = 1, name: str = ""):
        self.family: Family = family_for(model.config)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or self.family.name
        self.layers = self.family.decoder_layers(model)
        n_layers, d_model = len(self.layers), model.config.hidden_size
        if transcoder.n_layers != n_layers:
            raise ShapeMismatchError(f"transcoder has {transcoder.n_layers} layers, model has {n_layers}")
        if transcoder.d_model != d_model:
            raise ShapeMismatchError(f"transcoder d_model={transcoder.d_model} but model d_model={d_model}")
        param = next(model.parameters())
        self.transcoder = transcoder.to(param.device, param.dtype)
        self.n_zero_positions = n_zero_positions
        _register_attention()
        model.config._attn_implementation = ATTN_IMPLEMENTATION

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        transcoder: str | os.PathLike | Transcoder,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        transcoder_revision: str | None = None,
        transcoder_subfolder: str | None = None,
        trust_remote_code: bool = False,
        **transcoder_kwargs,
    ) -> ReplacementModel:
        """`model`: hub id, local directory, or local ``.gguf`` file; `transcoder`: anything `load_transcoder` takes."""
        hf_model, tokenizer = load_model(model, device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
        tc = load_transcoder(transcoder, revision=transcoder_revision, subfolder=transcoder_subfolder, **transcoder_kwargs)
        return cls(hf_model, tokenizer, tc, name=str(model))

    # ----- facts ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def unembedding(self) -> Tensor:
        """W_U [d_model, vocab]."""
        return self.family.unembedding(self.model)

    @property
    def embedding(self) -> Tensor:
        """Token embedding matrix [vocab, d_model]: row t is token t's vector at the embedding output."""
        return self.family.get(self.model, self.family.embed).weight

    # ----- node vectors (method.md §2) ------------------------------------------------------------
    def encoder_vectors(self, feats: ActiveFeatures) -> Tensor:
        """[n, D] target vectors of features, read at their layer's input site: W_enc[f]·in_scale."""
        out = torch.empty(len(feats), self.d_model, dtype=self.transcoder.dtype, device=self.device)
        for l in feats.layers.unique().tolist():
            m = feats.layers == l
            enc = self.transcoder.encoders[l]
            out[m] = enc.W[feats.indices[m]] * enc.in_scale
        return out

    def decoder_vectors(self, feats: ActiveFeatures, target: int) -> tuple[Tensor, Tensor]:
        """Source vectors features write at the output site of layer `target`: (row ids into `feats` [m],
        activation-scaled decoder vectors [m, D]). A CLT feature has one per target layer it writes to."""
        rows, vecs = [], []
        for s in self.transcoder.sources(target):
            (r,) = (feats.layers == s).nonzero(as_tuple=True)
            rows.append(r)
            vecs.append(self.transcoder.decoder_vectors(s, target, feats.raw[r], feats.indices[r]))
        if not rows:
            return torch.empty(0, dtype=torch.long, device=self.device), torch.empty(0, self.d_model, device=self.device)
        return torch.cat(rows), torch.cat(vecs)

    def token_vectors(self, tokens: Tensor) -> Tensor:
        """[T, D] token-node vectors W_E[token] at the embedding output."""
        return self.embedding[tokens]

    def logit_vectors(self, token_ids: Tensor) -> Tensor:
        """[K, D] demeaned unembedding columns u_k = W_U[:, v_k] − mean_v W_U[:, v], read at the final-norm output."""
        W_U = self.unembedding
        return (W_U[:, token_ids] - W_U.mean(dim=1, keepdim=True)).T

    def tokenize(self, prompt: str | list[int] | Tensor) -> Tensor:
        """[T] token ids on the model's device (see `tokenize`)."""
        return tokenize(self.tokenizer, prompt).to(self.device)

    # ----- the three runs ------------------------------------------------------------------------
    def trace(self, tokens: Tensor, *, linearise: bool = False) -> Trace:
        """Run the real model once on `tokens` [T] and record everything (see `Trace`)."""
        run = _Run("record", linearise=linearise)
        with torch.set_grad_enabled(linearise), self._hooks(run):
            logits = self.model(input_ids=tokens[None]).logits
        L, T = self.n_layers, tokens.numel()
        z = min(self.n_zero_positions, T)
        tc = self.transcoder
        inputs = [run.inputs[l][0].detach() for l in range(L)]
        acts = [tc.encode_sparse(l, x) for l, x in enumerate(inputs)]
        acts = [a.select(a.rows >= z) for a in acts]  # no features at zero positions
        recons = [tc.decode(t, acts, inputs) for t in range(L)]
        mlp_out = [run.mlp_real[l][0] for l in range(L)]
        errors = [y - r for y, r in zip(mlp_out, recons)]
        for e in errors:
            e[:z] = 0
        features = ActiveFeatures(
            layers=torch.cat([torch.full_like(a.rows, l) for l, a in enumerate(acts)]),
            positions=torch.cat([a.rows for a in acts]),
            indices=torch.cat([a.features for a in acts]),
            values=torch.cat([tc.gated(l, l, a.values, a.features) for l, a in enumerate(acts)]),
            raw=torch.cat([a.values for a in acts]),
        )
        return Trace(
            tokens=tokens,
            logits=logits[0].detach(),
            inputs=inputs,
            mlp_outputs=mlp_out,
            reconstructions=recons,
            errors=errors,
            features=features,
            patterns=[run.patterns[l] for l in range(L)],
            norm_scales=run.scales,
            final_resid=run.final_resid[0].detach(),
            n_zero=z,
            graph=LinearGraph(run.embed_out, [run.inputs[l] for l in range(L)], [run.outputs[l] for l in range(L)], run.final_resid)
            if linearise
            else None,
        )

    @torch.no_grad()
    def input_activations(self, tokens: Tensor) -> list[Tensor]:
        """Input-site tensors [B, T, D] of every layer for a batch of token windows [B, T] (the real model,
        nothing frozen or replaced; the unembedding is skipped)."""
        run = _Run("capture")
        with self._hooks(run):
            self.model.base_model(input_ids=tokens.to(self.device))
        return [run.inputs[l] for l in range(self.n_layers)]

    @torch.no_grad()
    def run_replaced(self, trace: Trace, add: Additions | None = None, *, with_errors: bool = True) -> RunOutput:
        """Forward where transcoders replace every MLP (features respond to the live inputs) and the
        recorded errors are added back; attention and norms stay live."""
        return self._run(_Run("replaced", trace=trace, add=add or Additions(), with_errors=with_errors))

    @torch.no_grad()
    def run_frozen(self, trace: Trace, add: Additions | None = None) -> RunOutput:
        """Forward of the frozen (linear) replacement model: patterns, norm scales and transcoder
        outputs replayed from `trace`; only skip paths respond to the live inputs."""
        return self._run(_Run("frozen", trace=trace, add=add or Additions()))

    def _run(self, run: _Run) -> RunOutput:
        B = 1
        for t in [run.add.embed, *run.add.mlp_out.values()]:
            if t is not None and t.ndim == 3:
                B = max(B, t.shape[0])
        with self._hooks(run):
            logits = self.model(input_ids=run.trace.tokens[None].expand(B, -1)).logits
        return RunOutput(logits, [run.inputs[l] for l in range(self.n_layers)], run.final_resid)

    # ----- hooks ---------------------------------------------------------------------------------
    @contextmanager
    def _hooks(self, run: _Run) -> Iterator[None]:
        fam, handles = self.family, []
        try:
            emb = fam.get(self.model, fam.embed)
            handles.append(emb.register_forward_hook(lambda m, a, out: self._embed_hook(run, out)))
            for l, layer in enumerate(self.layers):
                for name in fam.block_norms:
                    norm = fam.get(layer, name)
                    handles.append(norm.register_forward_hook(self._norm_hook(run, f"{l}.{name}", l if name == fam.mlp_norm else None)))
                if self.transcoder.hookpoints.input == "mlp_in":
                    mlp = fam.get(layer, fam.mlp)
                    handles.append(mlp.register_forward_pre_hook(lambda m, args, l=l: self._input_site(run, l, args[0])))
                out_mod = fam.get(layer, fam.mlp)
                if self.transcoder.hookpoints.output == "mlp_out_normed" and fam.post_mlp_norm:
                    out_mod = fam.get(layer, fam.post_mlp_norm)  # hook order: its norm hook runs first
                handles.append(out_mod.register_forward_hook(lambda m, a, out, l=l: self._output_site(run, l, out)))
            final = fam.get(self.model, fam.final_norm)
            handles.append(final.register_forward_hook(self._norm_hook(run, "final", None, final=True)))
            token = _ACTIVE.set(run)
            try:
                yield
            finally:
                _ACTIVE.reset(token)
        finally:
            for h in handles:
                h.remove()

    def _embed_hook(self, run: _Run, out: Tensor) -> Tensor:
        if run.mode == "record":
            out = out.detach().requires_grad_(run.linearise)
            run.embed_out = out
        if run.add.embed is not None:
            out = out + run.add.embed
        return out

    def _norm_hook(self, run: _Run, key: str, mlp_layer: int | None, final: bool = False):
        kind = self.family.norm
        site = self.transcoder.hookpoints.input

        def hook(norm: nn.Module, args, out: Tensor) -> Tensor:
            x = args[0]
            if mlp_layer is not None and site == "resid_mid":
                self._input_site(run, mlp_layer, x)
            if run.mode == "frozen":
                scale = run.trace.norm_scales[key]
            else:
                scale = norm_scale(kind, norm, x)
                if run.mode == "record":
                    scale = scale.detach()
                    run.scales[key] = scale
            normalized = norm_normalized(kind, x, scale)
            if mlp_layer is not None and site == "mlp_in_normalized":
                normalized = self._input_site(run, mlp_layer, normalized)
            y = norm_apply_gain(kind, norm, normalized, x.dtype)
            if final:
                run.final_resid = y
            return y

        return hook

    def _input_site(self, run: _Run, layer: int, x: Tensor) -> Tensor:
        run.inputs[layer] = x
        return x

    def _output_site(self, run: _Run, layer: int, y: Tensor) -> Tensor:
        if run.mode == "capture":
            return y
        tc, trace = self.transcoder, run.trace
        skip = tc.skip(layer, {s: run.inputs[s] for s in tc.sources(layer) if (s, layer) in tc.skips})
        if run.mode == "record":
            run.mlp_real[layer] = y.detach()
            out = y.detach() if skip is None else skip + (y - skip).detach()
            if run.linearise and not out.requires_grad:  # still a node gradients can be read at
                out.requires_grad_(True)
        elif run.mode == "frozen":
            rec_skip = tc.skip(layer, trace.inputs)
            const = trace.mlp_outputs[layer] - (rec_skip if rec_skip is not None else 0)
            out = const if skip is None else skip + const
        else:  # replaced: transcoders computed on live inputs + recorded error (MLP output discarded)
            z = trace.n_zero
            inputs = {s: x.expand(y.shape[0], -1, -1) for s, x in run.inputs.items()}
            acts = {s: tc.encode(s, inputs[s]) for s in tc.sources(layer)}
            for a in acts.values():
                a[:, :z] = 0
            out = self._decode_batched(layer, acts, inputs)  # dense is fine: interventions use small batches
            # zero positions keep the real MLP output (they carry no features and no error node)
            out[..., :z, :] = trace.mlp_outputs[layer][:z]
            if run.with_errors:
                out = out + trace.errors[layer]
        if layer in run.add.mlp_out:
            out = out + run.add.mlp_out[layer]
        run.outputs[layer] = out
        return out

    def _decode_batched(self, target: int, acts: dict[int, Tensor], inputs: dict[int, Tensor]) -> Tensor:
        """`Transcoder.decode` over a leading batch dimension ([B, T, ·] tensors)."""
        B, T, D = inputs[target].shape

        def flat(d: dict[int, Tensor]) -> dict[int, Tensor]:
            return {k: v.reshape(B * T, v.shape[-1]) for k, v in d.items()}

        return self.transcoder.decode(target, flat(acts), flat(inputs)).view(B, T, D)


# ----- attention with a frozen pattern ------------------------------------------------------------

_REGISTERED = False


def _register_attention() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    _REGISTERED = True


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Eager attention whose pattern is detached (record) or replayed (frozen): out = pattern · V."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    run = _ACTIVE.get()
    if run is None or run.mode in ("replaced", "capture"):
        return eager(module, query, key, value, attention_mask, **kwargs)
    layer = module.layer_idx
    if run.mode == "frozen":
        pattern = run.trace.patterns[layer]
    else:
        _, pattern = eager(module, query.detach(), key.detach(), value.detach(), attention_mask, **kwargs)
        pattern = pattern.detach()
        run.patterns[layer] = pattern
    n_rep = query.shape[1] // value.shape[1]
    v = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    out = torch.matmul(pattern.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, pattern


# ----- tokens and model loading ------------------------------------------------------------------


def tokenize(tokenizer, prompt: str | list[int] | Tensor) -> Tensor:
    """[T] token ids; a special token is prepended unless the first token already is one (method.md §2).
    Unlike circuit-tracer, a BOS id of 0 counts (it picks the first *truthy* id)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).flatten().cpu()
    if ids.numel() == 0:
        raise ValueError("empty prompt")
    if int(ids[0]) not in set(tokenizer.all_special_ids):
        candidates = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
        bos = next((c for c in candidates if c is not None), None)
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
    return ids


def _hf_kwargs(ref: str | os.PathLike, revision: str | None, trust_remote_code: bool) -> tuple[str, dict]:
    """(path, from_pretrained kwargs): a local .gguf file loads from its folder with gguf_file=."""
    path = str(ref)
    if path.endswith(".gguf") and os.path.isfile(path):
        folder, fname = os.path.split(os.path.abspath(path))
        return folder, dict(gguf_file=fname, trust_remote_code=trust_remote_code)
    return path, dict(revision=revision, trust_remote_code=trust_remote_code)


def load_tokenizer(ref: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, kwargs = _hf_kwargs(ref, revision, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise
        raise HubUnavailableError(f"could not load the tokenizer of {ref!r} from the Hugging Face hub or its cache: {e}") from e


def load_model(
    ref: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a hub id, a local directory, or a local ``.gguf`` file (dequantised)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code)
    path, kwargs = _hf_kwargs(ref, revision, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise
        raise HubUnavailableError(f"could not load model {ref!r} from the Hugging Face hub or its cache: {e}") from e
    return model.to(device), tokenizer
