"""The local replacement model (docs/method.md §1–2): a Hugging Face causal LM with transcoders in place of its MLPs.

Every run is the unmodified HF forward with temporary hooks on its modules: the token embedding, the norms,
attention (a registered attention function), and each layer's transcoder input and output sites
(`Hookpoints`). A *run strategy*, a small dataclass, decides what those hooks do:

- `Record(linearise)`: the real forward, recording transcoder inputs, MLP outputs, attention patterns and
  norm scales; `trace()` turns them into a `Trace`. With ``linearise=True`` its autograd graph is the
  *linearised* model: patterns and norm scales detached, MLP output = skip(x) + stopgrad(y − skip(x)),
  the token-embedding output the only leaf. With ``keep_patterns=False`` no pattern is kept: attention runs in
  query blocks whose backward recomputes the pattern (`_BlockAttention`; long prompts, docs/memory.md).
- `Prefix(trace)`: the linearised graph of the trace's first tokens, its patterns, norm scales and MLP
  outputs replayed, its MLPs not run (attribution's causal truncation).
- `Frozen(trace)`: patterns, norm scales and transcoder outputs replayed from the trace; only skip paths
  respond to the live inputs. Exactly linear in `Additions` at the embedding and output sites, which is
  how attributions are checked by intervention.
- `Replaced(trace)`: each output site gets transcoder(live inputs) + the trace's recorded error; attention
  and norms stay live. `Replaced(None)` has no trace and no error term (what transcoder training
  evaluates); its options freeze some layers or the attention, or use the live error (generation).
- `Capture(outputs)`: the real forward, keeping the input-site tensors (and the real output-site
  tensors). The only strategy that needs no transcoder (`capture()`: training data, activation caches).

`Frozen` and `Replaced` take an `Edit`: a per-layer hook that receives each source layer's activations
right after encoding and returns the activations every target layer decodes, so target T's output moves by
Σ_S (gated(S, T, a_new) − gated(S, T, a_old))·W_dec[S, T] — plus, optionally, a factor on each error node.
Interventions and steering (`attribute_ray.interventions`) are edits.

`run(strategy, tokens)` is one forward; `hooks(strategy)` is the same hooks around any code that calls the
HF model (a KV-cached ``generate()``).
"""

from __future__ import annotations

import contextvars
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribute_ray.errors import NoTranscoderError, ShapeMismatchError
from attribute_ray.families import Family, family_for, norm_apply_gain, norm_normalized, norm_scale
from attribute_ray.loading import load_model, tokenize
from attribute_ray.memory import PATTERN_BLOCK_BYTES
from attribute_ray.presets import display_name
from attribute_ray.transcoders import Hookpoints, Transcoder, load_transcoder
from attribute_ray.transcoders.transcoder import SparseActs

ATTN_IMPLEMENTATION = "attribute_ray"


# ----- what runs record and return ----------------------------------------------------------------


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

    def dense(self, layer: int, n_pos: int, n_features: int) -> Tensor:
        """[n_pos, n_features] activations a of `layer` (zero where inactive)."""
        m = self.layers == layer
        out = torch.zeros(n_pos, n_features, dtype=self.raw.dtype, device=self.raw.device)
        out[self.positions[m], self.indices[m]] = self.raw[m]
        return out


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
    patterns: list[Tensor]  # [1, H, T, T] post-softmax attention per layer ([] when traced with keep_patterns=False)
    norm_scales: dict[str, Tensor]  # name -> [1, T, 1] frozen norm factor (fp32)
    final_resid: Tensor  # [T, D] final-norm output (the unembedding input)
    n_zero: int  # leading positions whose features and errors are zeroed (BOS)
    graph: LinearGraph | None = None  # set when traced with linearise=True


@dataclass
class AttentionSites:
    """One decoder layer's tensors around its attention in the linearised graph (batch dim 1), where attribution
    takes a feature target's first step by hand (`attribution._RowComputer`): resid_mid = resid_pre +
    branch(proj(proj_in)), the branch acting position by position (`Family.out_proj`)."""

    resid_pre: Tensor  # [1, T, D] the layer's input (the attention norm's input)
    attn_in: Tensor  # [1, T, D] the attention's input (the attention norm's output), which V projects
    resid_mid: Tensor  # [1, T, D] the residual stream after attention (the MLP norm's input)
    proj_in: Tensor  # [1, T, H·dh] the attention output projection's input
    proj_out: Tensor  # [1, T, D] its output
    proj: nn.Module  # the output projection
    value_weight: Tensor  # [KV·dh, D] W_V (`Family.value_weight`)
    pattern: Tensor | None = None  # [1, H, T, T] when the graph keeps its patterns


@dataclass
class LinearGraph:
    """Tensors of the linearised autograd graph (batch dim 1): `embed` is the only leaf; gradients can be
    injected at `inputs[l]` (feature targets) or `final` (logit targets), or below a layer's attention
    (`attention[l]`), and read at `outputs[l]`/`embed`."""

    embed: Tensor  # [1, T, D]
    inputs: list[Tensor]  # [1, T, D] input sites
    outputs: list[Tensor]  # [1, T, D] output sites (the replaced MLP outputs)
    final: Tensor  # [1, T, D] final-norm output
    attention: list[AttentionSites]

    @classmethod
    def of(cls, run: RunState, n_layers: int) -> LinearGraph:
        """The graph a `Record(linearise=True)` run left in its state."""
        L = range(n_layers)
        attention = [AttentionSites(**run.attention[l], pattern=run.patterns.get(l)) for l in L]
        return cls(run.embed, [run.inputs[l] for l in L], [run.outputs[l] for l in L], run.final, attention)


@dataclass
class Additions:
    """Vectors added during a frozen/replaced run: [B, T, D] or [T, D] at the embedding output and at
    the transcoder output site of given layers."""

    embed: Tensor | None = None
    mlp_out: dict[int, Tensor] = field(default_factory=dict)

    def batch(self) -> int:
        """The batch size the additions ask for (1 unless one of them is [B, T, D])."""
        return max([1] + [t.shape[0] for t in [self.embed, *self.mlp_out.values()] if t is not None and t.ndim == 3])


@dataclass
class RunOutput:
    """What one `ReplacementModel.run` returns (B sequences, T positions)."""

    logits: Tensor  # [B, T, vocab]
    inputs: list[Tensor]  # [B, T, D] input-site tensor of each layer
    outputs: list[Tensor]  # [B, T, D] output-site tensor each layer wrote ([] for Capture(outputs=False))
    final_resid: Tensor  # [B, T, D] final-norm output


@dataclass
class Captured:
    """`ReplacementModel.capture` of token windows [B, T]: the real model, nothing replaced."""

    inputs: list[Tensor]  # [B, T, D] transcoder input-site tensor of each layer
    outputs: list[Tensor] | None  # [B, T, D] real MLP output at each output site; None unless asked for


# ----- edits and run strategies -------------------------------------------------------------------


class Edit:
    """A per-layer change to the replacement model, applied by `Frozen` and `Replaced` runs.

    The base class changes nothing; override either method. Activations are the activation-function
    output a (an edit bypasses the activation function); each target layer T receives
    Σ_S (gated(S, T, a_new) − gated(S, T, a_old))·W_dec[S, T] (`Transcoder.gated`)."""

    def activations(self, layer: int, activations: Tensor, positions: Tensor) -> Tensor:
        """`activations` [B, T, F]: source layer `layer`'s activations right after encoding (zero positions are
        zero; a copy the edit may change in place). `positions` [T]: the absolute token positions this forward
        covers (one per step of a KV-cached generate()). Returns what every target layer decodes."""
        return activations

    def error_factor(self, layer: int, positions: Tensor) -> Tensor | None:
        """[T] factor on layer `layer`'s error term at `positions` (1 = unchanged), or None for all ones."""
        return None


AttentionAndNorms = Literal["live", "record", "replay"]


@dataclass(frozen=True)
class Record:
    """The real forward, recorded for a `Trace` (`ReplacementModel.trace`)."""

    linearise: bool = False  # also build the linearised autograd graph (`LinearGraph`)
    # keep every layer's pattern in the trace (L·H·T² floats; `Frozen` replays need them). False: attention is
    # computed in query blocks and its backward recomputes each block's pattern from q, k (`_BlockAttention`)
    keep_patterns: bool = True
    attention_and_norms: ClassVar[AttentionAndNorms] = "record"  # patterns and norm scales kept, detached


@dataclass(frozen=True)
class Prefix(Record):
    """The linearised graph of the first tokens of `trace`, itself traced with ``linearise=True`` (attribution's
    causal truncation). By causality the prefix's patterns, norm scales and MLP outputs are the trace's own first
    rows: they are replayed, and the MLPs are not run (their outputs are replaced anyway). A trace without patterns
    has the prefix's computed from q and k, kept or not as `keep_patterns` says."""

    trace: Trace | None = None
    linearise: bool = True
    attention_and_norms: ClassVar[AttentionAndNorms] = "replay"


@dataclass(frozen=True)
class Frozen:
    """The frozen replacement model of a trace: patterns, norm scales and transcoder outputs replayed from
    it, skip paths live. Linear in `add` and in the edit's change."""

    trace: Trace  # the clean run to replay
    add: Additions = field(default_factory=Additions)  # vectors added at the embedding and output sites
    edit: Edit | None = None  # applied to the trace's (recorded) activations
    attention_and_norms: ClassVar[AttentionAndNorms] = "replay"

    def frozen(self, layer: int) -> bool:
        return True


@dataclass(frozen=True)
class Replaced:
    """Transcoders replace the MLPs: each output site gets transcoder(live inputs), the features responding to
    the live residual stream, plus an error term. Zero positions keep the MLP output (the trace's, or without
    a trace the live one): they carry no features and no error node."""

    trace: Trace | None = None  # the clean run whose recorded errors are added; None: no error term
    add: Additions = field(default_factory=Additions)  # vectors added at the embedding and output sites
    with_errors: bool = True  # add the trace's recorded errors
    edit: Edit | None = None  # applied to every source layer's live activations
    # layers as in `Frozen`: features keep the trace's activations, outputs are the recorded ones (skip paths
    # live) plus the edit's change
    frozen_layers: frozenset[int] = frozenset()
    freeze_attention: bool = False  # replay the trace's attention patterns and norm scales
    # no trace: the error of this same forward (real MLP output − reconstruction), so an unedited run is the
    # real model (generation, where no trace covers the new tokens)
    live_errors: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen_layers", frozenset(self.frozen_layers))
        if self.trace is None and (self.frozen_layers or self.freeze_attention):
            raise ValueError("Replaced: frozen_layers and freeze_attention replay a trace; pass one")
        if self.trace is not None and self.live_errors:
            raise ValueError("Replaced: live_errors replaces the trace's recorded errors; pass trace=None")

    @property
    def attention_and_norms(self) -> AttentionAndNorms:
        return "replay" if self.freeze_attention else "live"

    def frozen(self, layer: int) -> bool:
        return layer in self.frozen_layers


@dataclass(frozen=True)
class Capture:
    """The real forward, keeping the input-site tensors (`ReplacementModel.capture`). Needs no transcoder."""

    outputs: bool = True  # also keep the real output-site tensors
    attention_and_norms: ClassVar[AttentionAndNorms] = "live"


Strategy = Record | Prefix | Frozen | Replaced | Capture


@dataclass
class RunState:
    """What the hooks of one run keep. Each forward (one per step of a KV-cached generate()) starts afresh,
    except `seen`; tensors are [B, T, ·] for the current forward."""

    strategy: Strategy
    seen: int = 0  # tokens covered by earlier forwards of this run (the KV cache)
    positions: Tensor | None = None  # [T] absolute positions of the current forward
    embed: Tensor | None = None  # embedding output (Record: the linearised graph's leaf)
    inputs: dict[int, Tensor] = field(default_factory=dict)  # layer -> input-site tensor
    outputs: dict[int, Tensor] = field(default_factory=dict)  # layer -> output-site tensor as the run left it
    mlp: dict[int, Tensor] = field(default_factory=dict)  # layer -> real MLP output (Record)
    patterns: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, H, T, T] (Record)
    scales: dict[str, Tensor] = field(default_factory=dict)  # norm name -> [B, T, 1] (Record)
    final: Tensor | None = None  # final-norm output
    attention: dict[int, dict] = field(default_factory=dict)  # layer -> `AttentionSites` fields (Record, linearised)
    acts: dict[int, tuple] = field(default_factory=dict)  # source -> (activations, edited or None) (Frozen, Replaced)

    def start_forward(self, n_pos: int, device: torch.device) -> None:
        self.positions = torch.arange(self.seen, self.seen + n_pos, device=device)
        self.seen += n_pos
        self.inputs, self.outputs, self.mlp, self.acts = {}, {}, {}, {}


_ACTIVE: contextvars.ContextVar[RunState | None] = contextvars.ContextVar("attribute_ray_run", default=None)


# ----- the model ----------------------------------------------------------------------------------


class ReplacementModel:
    """A causal LM plus a `Transcoder`, with the hooks that make the local replacement model.

    With ``transcoder=None`` (then `hookpoints` says where to capture) only `Capture` runs work."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        transcoder: Transcoder | None,
        *,
        hookpoints: Hookpoints | None = None,
        n_zero_positions: int = 1,
        name: str = "",
    ):
        self.family: Family = family_for(model.config)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or self.family.name
        self.layers = self.family.decoder_layers(model)
        n_layers, d_model = len(self.layers), model.config.hidden_size
        if transcoder is None:
            if hookpoints is None:
                raise ValueError("a ReplacementModel without a transcoder needs hookpoints= (where to capture)")
        else:
            if transcoder.n_layers != n_layers:
                raise ShapeMismatchError(f"transcoder has {transcoder.n_layers} layers, model has {n_layers}")
            if transcoder.d_model != d_model:
                raise ShapeMismatchError(f"transcoder d_model={transcoder.d_model} but model d_model={d_model}")
            if hookpoints is not None and hookpoints != transcoder.hookpoints:
                raise ValueError(f"hookpoints={hookpoints} but the transcoder's are {transcoder.hookpoints}")
            param = next(model.parameters())
            transcoder = transcoder.to(param.device, param.dtype)
        self.transcoder = transcoder
        self.hookpoints: Hookpoints = hookpoints or transcoder.hookpoints
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
        if not isinstance(transcoder, Transcoder):  # graphs carry these names: never a filesystem path
            tc.name = display_name(transcoder)
        return cls(hf_model, tokenizer, tc, name=display_name(model))

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

    # ----- node vectors (docs/method.md §2) -------------------------------------------------------
    def encoder_vectors(self, feats: ActiveFeatures, rows: Tensor | None = None) -> Tensor:
        """[n, D] target vectors of features (those at `rows` [n] only, when given), read at their layer's input
        site: W_enc[f]·in_scale."""
        layers, indices = (feats.layers, feats.indices) if rows is None else (feats.layers[rows], feats.indices[rows])
        out = torch.empty(len(layers), self.d_model, dtype=self.transcoder.dtype, device=self.device)
        for l in layers.unique().tolist():
            m = layers == l
            enc = self.transcoder.encoders[l]
            out[m] = enc.W[indices[m]] * enc.in_scale
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

    # ----- runs ----------------------------------------------------------------------------------
    def run(self, strategy: Strategy, tokens: Tensor) -> RunOutput:
        """One forward of `strategy` on `tokens` [B, T], or [T] (broadcast to the batch of the strategy's
        additions). Autograd is on only for ``Record(linearise=True)``."""
        tokens = tokens.to(self.device)
        if tokens.ndim == 1:
            tokens = tokens[None].expand(strategy.add.batch() if isinstance(strategy, (Frozen, Replaced)) else 1, -1)
        linearise = isinstance(strategy, Record) and strategy.linearise
        with torch.set_grad_enabled(linearise), self.hooks(strategy) as state:
            logits = self.model(input_ids=tokens).logits
        L = range(self.n_layers)
        outputs = [state.outputs[l] for l in L] if state.outputs else []
        return RunOutput(logits, [state.inputs[l] for l in L], outputs, state.final)

    def trace(self, tokens: Tensor, *, linearise: bool = False, keep_patterns: bool = True) -> Trace:
        """Run the real model once on `tokens` [T] and record everything (see `Trace`).

        ``keep_patterns=False`` keeps no attention pattern (`Trace.patterns` is empty, so the trace cannot be
        replayed by `Frozen` or ``Replaced(freeze_attention=True)``): attention runs in query blocks of at most
        `PATTERN_BLOCK_BYTES` of pattern and the linearised graph keeps q and k instead of the L·H·T² patterns
        (what attribution uses: docs/memory.md)."""
        with torch.set_grad_enabled(linearise), self.hooks(Record(linearise, keep_patterns)) as run:
            logits = self.model(input_ids=tokens[None]).logits
        L, T = self.n_layers, tokens.numel()
        z = min(self.n_zero_positions, T)
        tc = self.transcoder
        inputs = [run.inputs[l][0].detach() for l in range(L)]
        acts = [tc.encode_sparse(l, x) for l, x in enumerate(inputs)]
        acts = [a.select(a.rows >= z) for a in acts]  # no features at zero positions
        recons = [tc.decode(t, acts, inputs) for t in range(L)]
        mlp_out = [run.mlp[l][0] for l in range(L)]
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
            patterns=[run.patterns[l] for l in range(L)] if run.patterns else [],
            norm_scales=run.scales,
            final_resid=run.final[0].detach(),
            n_zero=z,
            graph=LinearGraph.of(run, L) if linearise else None,
        )

    @torch.no_grad()
    def capture(self, tokens: Tensor, outputs: bool = True, n_layers: int | None = None) -> Captured:
        """The real model on token windows [B, T]: input-site tensors and (with `outputs`) the real output-site
        tensors of each of the first `n_layers` layers (default: all), each [B, T, D]. The forward stops after
        layer n_layers − 1, whose tensors the layers above cannot change; the unembedding is skipped."""
        n = self.n_layers if n_layers is None else n_layers
        if not 1 <= n <= self.n_layers:
            raise ValueError(f"n_layers must be in 1..{self.n_layers}, got {n_layers}")
        stop = self.layers[n - 1].register_forward_hook(_stop_forward) if n < self.n_layers else None
        try:
            with self.hooks(Capture(outputs)) as run:
                try:
                    self.model.base_model(input_ids=tokens.to(self.device))
                except _ForwardStopped:
                    pass
        finally:
            if stop is not None:
                stop.remove()
        return Captured([run.inputs[l] for l in range(n)], [run.outputs[l] for l in range(n)] if outputs else None)

    def input_activations(self, tokens: Tensor) -> list[Tensor]:
        """Input-site tensors [B, T, D] of every layer for token windows [B, T] (`capture` without outputs)."""
        return self.capture(tokens, outputs=False).inputs

    @torch.no_grad()
    def run_replaced(self, trace: Trace, add: Additions | None = None, *, with_errors: bool = True) -> RunOutput:
        """`Replaced(trace)` on the trace's tokens: features respond to the live inputs, recorded errors added
        back, attention and norms live."""
        return self.run(Replaced(trace, add or Additions(), with_errors), trace.tokens)

    @torch.no_grad()
    def run_frozen(self, trace: Trace, add: Additions | None = None) -> RunOutput:
        """`Frozen(trace)` on the trace's tokens: the frozen (linear) replacement model."""
        return self.run(Frozen(trace, add or Additions()), trace.tokens)

    # ----- hooks ---------------------------------------------------------------------------------
    @contextmanager
    def hooks(self, strategy: Strategy) -> Iterator[RunState]:
        """Every forward of ``self.model`` inside the block runs `strategy`; yields the run's `RunState`."""
        if self.transcoder is None and not isinstance(strategy, Capture):
            raise NoTranscoderError(
                f"{type(strategy).__name__} runs need a transcoder; this ReplacementModel was built with "
                "transcoder=None and can only capture (capture(), input_activations(), Capture)"
            )
        fam, hp, state, handles = self.family, self.hookpoints, RunState(strategy), []
        keep_outputs = not (isinstance(strategy, Capture) and not strategy.outputs)
        try:
            emb = fam.get(self.model, fam.embed)
            handles.append(emb.register_forward_hook(lambda m, a, out: self._on_embed(state, out)))
            linearise = isinstance(strategy, Record) and strategy.linearise
            for l, layer in enumerate(self.layers):
                for name in fam.block_norms:
                    norm = fam.get(layer, name)
                    handles.append(norm.register_forward_hook(self._norm_hook(state, f"{l}.{name}", l if name == fam.mlp_norm else None)))
                if linearise:
                    handles += self._record_attention_sites(state, l, layer)
                if isinstance(strategy, Prefix):
                    handles.append(_SkippedForward(fam.get(layer, fam.mlp)))
                if hp.input == "mlp_in":
                    mlp = fam.get(layer, fam.mlp)
                    handles.append(mlp.register_forward_pre_hook(lambda m, args, l=l: self._on_input(state, l, args[0])))
                if keep_outputs:
                    out_mod = fam.get(layer, fam.mlp)
                    if hp.output == "mlp_out_normed" and fam.post_mlp_norm:
                        out_mod = fam.get(layer, fam.post_mlp_norm)  # hook order: its norm hook runs first
                    handles.append(out_mod.register_forward_hook(lambda m, a, out, l=l: self._on_output(state, l, out)))
            final = fam.get(self.model, fam.final_norm)
            handles.append(final.register_forward_hook(self._norm_hook(state, "final", None, final=True)))
            token = _ACTIVE.set(state)
            try:
                yield state
            finally:
                _ACTIVE.reset(token)
        finally:
            for h in handles:
                h.remove()

    def _record_attention_sites(self, state: RunState, l: int, layer: nn.Module) -> list:
        """Hooks that keep layer `l`'s `AttentionSites` in ``state.attention[l]``; returns their handles."""
        fam, sites = self.family, state.attention.setdefault(l, {})
        proj = sites["proj"] = fam.output_projection(layer)
        sites["value_weight"] = fam.value_weight(layer)

        def keep(name: str, x: Tensor) -> None:
            sites[name] = x

        attn_norm = fam.get(layer, fam.block_norms[0])
        return [  # (forward hooks run after the norm hook, and see the output it returned)
            attn_norm.register_forward_pre_hook(lambda m, a: keep("resid_pre", a[0])),
            attn_norm.register_forward_hook(lambda m, a, out: keep("attn_in", out)),
            fam.get(layer, fam.mlp_norm).register_forward_pre_hook(lambda m, a: keep("resid_mid", a[0])),
            proj.register_forward_pre_hook(lambda m, a: keep("proj_in", a[0])),
            proj.register_forward_hook(lambda m, a, out: keep("proj_out", out)),
        ]

    def _on_embed(self, state: RunState, out: Tensor) -> Tensor:
        state.start_forward(out.shape[1], out.device)  # every forward starts here
        s = state.strategy
        if isinstance(s, Record):
            out = out.detach().requires_grad_(s.linearise)
            state.embed = out
        if isinstance(s, (Frozen, Replaced)) and s.add.embed is not None:
            out = out + s.add.embed
        return out

    def _norm_hook(self, state: RunState, key: str, mlp_layer: int | None, final: bool = False):
        kind, site = self.family.norm, self.hookpoints.input

        def hook(norm: nn.Module, args, out: Tensor) -> Tensor:
            x, s = args[0], state.strategy
            if mlp_layer is not None and site == "resid_mid":
                self._on_input(state, mlp_layer, x)
            if s.attention_and_norms == "replay":
                scale = s.trace.norm_scales[key][:, : x.shape[1]]
            else:
                scale = norm_scale(kind, norm, x)
                if s.attention_and_norms == "record":
                    scale = scale.detach()
                    state.scales[key] = scale
            normalized = norm_normalized(kind, x, scale)
            if mlp_layer is not None and site == "mlp_in_normalized":
                normalized = self._on_input(state, mlp_layer, normalized)
            y = norm_apply_gain(kind, norm, normalized, x.dtype)
            if final:
                state.final = y
            return y

        return hook

    def _on_input(self, state: RunState, layer: int, x: Tensor) -> Tensor:
        state.inputs[layer] = x
        return x

    def _on_output(self, state: RunState, layer: int, y: Tensor) -> Tensor:
        s = state.strategy
        if isinstance(s, Capture):
            out = y
        elif isinstance(s, Record):
            if isinstance(s, Prefix):
                y = s.trace.mlp_outputs[layer][None, : y.shape[1]]
            state.mlp[layer] = y.detach()
            skip = self.transcoder.skip(layer, {src: x for src, x in state.inputs.items() if (src, layer) in self.transcoder.skips})
            out = y.detach() if skip is None else skip + (y - skip).detach()
            if s.linearise and not out.requires_grad:  # still a node gradients can be read at
                out.requires_grad_(True)
        else:
            out = self._replaced_output(state, layer, y)
        state.outputs[layer] = out
        return out

    # ----- the output site of Frozen and Replaced runs ---------------------------------------------
    def _replaced_output(self, state: RunState, layer: int, y: Tensor) -> Tensor:
        """out = base + (f − 1)·error + Σ_S Δ_S + addition, [B, T, D], where base is the strategy's output
        (frozen: recorded, skip live; replaced: transcoder(live acts) [+ error]) and f the edit's error factor."""
        s, tc = state.strategy, self.transcoder
        trace, zero = s.trace, state.positions < self._n_zero(s)
        if s.frozen(layer):  # recorded output, skip paths live
            rec_skip, live_skip = tc.skip(layer, trace.inputs), tc.skip(layer, state.inputs)
            out = (trace.mlp_outputs[layer] - (rec_skip if rec_skip is not None else 0)).expand_as(y)
            out = out + live_skip if live_skip is not None else out.clone()
            error = trace.errors[layer]
        else:
            recon = self._reconstruction(state, layer)
            if s.live_errors:  # the real output, whose error is y − ŷ on this same forward
                out, error = y.clone(), (y - recon).masked_fill(zero[:, None], 0)
            else:
                out = torch.where(zero[:, None], y if trace is None else trace.mlp_outputs[layer], recon)
                error = trace.errors[layer] if trace is not None and s.with_errors else None
                if error is not None:
                    out = out + error
        factor = s.edit.error_factor(layer, state.positions) if s.edit is not None else None
        if factor is not None and error is not None:
            out = out + (factor - 1)[:, None].to(out.dtype) * error
        for src in tc.sources(layer):
            self._add_edit_change(state, src, layer, out)
        if layer in s.add.mlp_out:
            out = out + s.add.mlp_out[layer]
        return out.to(y.dtype)

    def _n_zero(self, s: Frozen | Replaced) -> int:
        return s.trace.n_zero if s.trace is not None else self.n_zero_positions

    def _activations(self, state: RunState, source: int) -> tuple[Tensor | SparseActs, Tensor | None]:
        """(activations of `source` this forward, the edit's version or None), computed once per forward.
        Dense [B, T, F] when there is an edit; otherwise sparse over the B·T flattened rows."""
        if source not in state.acts:
            s, tc, x = state.strategy, self.transcoder, state.inputs[source]
            B, T, _ = x.shape
            zero = state.positions < self._n_zero(s)
            if s.frozen(source):  # the trace's activations
                a = s.trace.features.dense(source, T, tc.n_features(source)).expand(B, -1, -1)
            elif s.edit is None:  # sparse: B·T can be a training batch, F tens of thousands
                a = tc.encode_sparse(source, x.reshape(B * T, -1))
                a = a.select(~zero.repeat(B)[a.rows])
            else:
                a = tc.encode(source, x)
                a[:, zero] = 0
            edited = s.edit.activations(source, a.clone(), state.positions) if s.edit is not None else None
            state.acts[source] = (a, edited)
        return state.acts[source]

    def _reconstruction(self, state: RunState, target: int) -> Tensor:
        """ŷ_T [B, T, D] from the unedited activations of its sources and the live input sites."""
        B, T, D = state.inputs[target].shape
        inputs = {src: x.reshape(B * T, D) for src, x in state.inputs.items()}
        acts = {}
        for src in self.transcoder.sources(target):
            a = self._activations(state, src)[0]
            acts[src] = a if isinstance(a, SparseActs) else a.reshape(B * T, -1)
        return self.transcoder.decode(target, acts, inputs).view(B, T, D)

    def _add_edit_change(self, state: RunState, source: int, target: int, out: Tensor) -> None:
        """out += (gated(a_new) − gated(a_old))·W_dec[source, target][f] at every entry the edit changed."""
        a, edited = self._activations(state, source)
        if edited is None:
            return
        b, t, f = (edited != a).nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        tc = self.transcoder
        d = tc.gated(source, target, edited[b, t, f], f) - tc.gated(source, target, a[b, t, f], f)
        out.index_put_((b, t), (d[:, None] * tc.decoders[(source, target)].W[f]).to(out.dtype), accumulate=True)


class _ForwardStopped(Exception):
    """Raised by `_stop_forward` to end a forward whose remaining layers nobody reads (`ReplacementModel.capture`)."""


def _stop_forward(module: nn.Module, args, out) -> None:
    raise _ForwardStopped


class _SkippedForward:
    """Until `remove()`, `module` computes nothing: it returns zeros shaped like its input (its hooks still run,
    and replace that output)."""

    def __init__(self, module: nn.Module):
        self.module = module
        module.forward = lambda x, *args, **kwargs: torch.zeros_like(x)

    def remove(self) -> None:
        del self.module.forward


# ----- attention with a recorded or replayed pattern ----------------------------------------------

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
    """Eager attention whose pattern is detached (record) or replayed (replay): out = pattern · V."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    state = _ACTIVE.get()
    mode = state.strategy.attention_and_norms if state is not None else "live"
    if mode == "live":
        return eager(module, query, key, value, attention_mask, **kwargs)
    layer, s = module.layer_idx, state.strategy
    if mode == "replay" and s.trace.patterns:
        n = query.shape[2]
        pattern = s.trace.patterns[layer][:, :, :n, :n]  # a prefix's own (`Prefix`)
        if isinstance(s, Prefix):
            state.patterns[layer] = pattern
    elif mode == "replay" and not isinstance(s, Prefix):
        raise ValueError("this trace was recorded with keep_patterns=False: it has no attention patterns to replay")
    elif not s.keep_patterns:  # q and k are the trace's: its norm scales are replayed (`Prefix`) or its own
        blocks = _query_blocks(attention_mask, query.shape[1], query.shape[2])
        eager_of = _Eager(eager, module, kwargs)
        return _BlockAttention.apply(value, query.detach(), key.detach(), attention_mask, eager_of, blocks), None
    else:
        _, pattern = eager(module, query.detach(), key.detach(), value.detach(), attention_mask, **kwargs)
        pattern = pattern.detach()
        state.patterns[layer] = pattern
    n_rep = query.shape[1] // value.shape[1]
    v = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    p = pattern.to(v.dtype)
    if v.shape[0] == p.shape[0] == 1:
        # One 2-D product per head: the batched backward of attribution (is_grads_batched) then folds its B rows
        # into one GEMM, where a 4-D matmul would copy the [H, T, T] pattern for each of them (B·H·T² floats).
        out = torch.stack([F.linear(vh.T, ph) for vh, ph in zip(v[0].unbind(0), p[0].unbind(0))]).permute(2, 0, 1)[None]
    else:
        out = torch.matmul(p, v).transpose(1, 2)
    return out.contiguous(), pattern


# ----- attention without stored patterns (long prompts) -------------------------------------------

# PATTERN_BLOCK_BYTES (attribute_ray/memory.py): most bytes of fp32 pattern one query block of `_BlockAttention`
# holds; its forward and each backward recompute H·q·T floats at a time (q query rows, at most T keys), never H·T².


@dataclass(frozen=True)
class _Eager:
    """The family's own ``eager_attention_forward`` bound to one attention module and its keyword arguments
    (scaling, softcap, sliding window, ...), so that every block's pattern is the family's exactly."""

    fn: object
    module: nn.Module
    kwargs: dict

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.fn(self.module, query, key, value, mask, **self.kwargs)

    def pattern(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """The pattern alone: the values get zero width (no pattern · V product), except for families whose
        eager attention reads the head size from them (GPT-2 scales by value.size(-1) ** -0.5)."""
        if type(self.module).__module__ not in _VALUE_SIZED:
            value = value[..., :0]
        return self(query, key, value, mask)[1]


_VALUE_SIZED = {"transformers.models.gpt2.modeling_gpt2"}  # eager attention modules that read value's head size


def _query_blocks(mask: Tensor | None, n_heads: int, n_pos: int) -> list[tuple[int, int, int]]:
    """(first, end, keys) of each query block: rows [first, end) attend to keys [0, keys) only.

    With a causal mask (no query sees a later key) a block needs the keys up to its own end; that is also the
    layout GPT-2's eager attention assumes (its causal mask takes the block as the last rows of the keys). A
    mask that lets a query see ahead, or no mask, gets one block of every row (the plain eager call)."""
    if mask is None or _sees_ahead(mask):
        return [(0, n_pos, n_pos)]
    rows = max(1, PATTERN_BLOCK_BYTES // (4 * n_heads * n_pos))  # a module global: tests shrink it
    return [(i, min(i + rows, n_pos), min(i + rows, n_pos)) for i in range(0, n_pos, rows)]


def _sees_ahead(mask: Tensor) -> bool:
    """Whether the attention mask [B, 1, T, T] (additive float, or boolean) lets a query attend to a later key."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return bool(torch.triu(allowed, diagonal=1).any())


class _BlockAttention(torch.autograd.Function):
    """out = pattern(q, k) · V [1, T, H, dh] (one sequence, as `trace` records), the pattern a constant (detached
    q, k), computed in query blocks (`_query_blocks`); it saves q, k, v and the mask, never the pattern: its backward
    recomputes each block's pattern P and returns Pᵀ·g for V (GQA: summed over the heads that share a key-value
    head). Works under the vmapped backward of attribution (``is_grads_batched``): each head's Pᵀ·g is one 2-D
    product, into which vmap folds the rows of the batch, so no pattern is copied per row."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, query: Tensor, key: Tensor, mask: Tensor | None, eager: _Eager, blocks: list) -> Tensor:
        outs = [eager(query[:, :, i:j], key[:, :, :n], value[:, :, :n], _rows(mask, i, j, n))[0] for i, j, n in blocks]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        value, query, key, mask, eager, blocks = inputs
        ctx.save_for_backward(value.detach(), query, key, mask)
        ctx.eager, ctx.blocks = eager, blocks

    @staticmethod
    def backward(ctx, grad: Tensor):
        """grad [1, T, H, dh] → (grad of value [1, KV, T, dh], None for the rest)."""
        value, query, key, mask = ctx.saved_tensors
        n_kv, n_pos = value.shape[1], value.shape[2]
        n_heads = query.shape[1]
        n_rep = n_heads // n_kv
        total = None
        for i, j, n in ctx.blocks:
            p = ctx.eager.pattern(query[:, :, i:j], key[:, :, :n], value[:, :, :n], _rows(mask, i, j, n)).to(grad.dtype)
            g = grad[0, i:j]  # [q, H, dh]
            # per head: (Pᵀ g)ᵀ = gᵀ P [dh, n], as F.linear(gᵀ, Pᵀ): the batch's rows fold into the GEMM's rows
            heads = [F.linear(g[:, h].T, p[0, h].T) for h in range(n_heads)]
            kv = torch.stack([sum(heads[r * n_rep : (r + 1) * n_rep]) for r in range(n_kv)])  # [KV, dh, n]
            part = F.pad(kv.transpose(1, 2), (0, 0, 0, n_pos - n))  # [KV, T, dh]
            total = part if total is None else total + part
        return total[None], None, None, None, None, None


def _rows(mask: Tensor | None, first: int, end: int, keys: int) -> Tensor | None:
    return None if mask is None else mask[:, :, first:end, :keys]
