"""One in-memory representation for every transcoder variant: PLT, skip PLT and all CLT modes.

Notation: L layers, D = d_model, F_S features at source layer S, N tokens.
Layer S's encoder reads x_S, the tensor at its input site (see `Hookpoints`):

    pre_S = (in_scale_S · x_S) · W_encᵀ + b_enc           [N, F_S]
    a_S   = act(pre_S)                                     (ReLU, JumpReLU or TopK)

A feature (S, f) writes into every target layer T of `targets(S)` (T = S for a PLT). With the
per-(S, T) gate of clt-training (`post_enc(s)`/`post_enc_scale(s)`):

    a'_{S,T} = (a_S + offset_{S,T} · 1[a_S > 0]) · scale_{S,T}

and the reconstruction at the output site of layer T is

    ŷ_T = Σ_S coef_{S,T} · a'_{S,T} · W_{S,T}  +  bias_T  +  Σ_S skip_coef_{S,T} · x_S · W_skip_{S,T}ᵀ

Loaders fold every format-specific scalar (normalize_io, divide_cross_layer) into `coef`,
`skip_coef`, `in_scale` and `bias`, and tied decoders are the *same* tensor object under several
(S, T) keys, so no weight is duplicated in memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from attribute_ray.errors import ShapeMismatchError, TranscoderFormatError, UnknownActivationError

InputSite = Literal["mlp_in", "resid_mid", "mlp_in_normalized"]
"""Where a transcoder reads, per layer:
- ``mlp_in``: the MLP module's input, i.e. the MLP norm's output *with* its gain
  (sparsify ``layers.N.mlp``, circuit-tracer ``mlp.hook_in``);
- ``resid_mid``: the residual stream before the MLP norm (TransformerLens ``hook_resid_mid``);
- ``mlp_in_normalized``: the MLP norm's output *before* the gain, x/rms (TL ``ln2.hook_normalized``).
"""

OutputSite = Literal["mlp_out", "mlp_out_normed"]
"""Where a transcoder writes, per layer:
- ``mlp_out``: the MLP module's output (sparsify, circuit-tracer ``mlp.hook_out``); for Gemma-2 this is
  before ``post_feedforward_layernorm``, whose frozen scale then applies to the transcoder output;
- ``mlp_out_normed``: what the MLP block adds to the residual (TL ``hook_mlp_out``): for Gemma-2 the
  output of ``post_feedforward_layernorm``, for other families the same as ``mlp_out``.
"""

INPUT_SITES: tuple[str, ...] = ("mlp_in", "resid_mid", "mlp_in_normalized")
OUTPUT_SITES: tuple[str, ...] = ("mlp_out", "mlp_out_normed")


@dataclass(frozen=True)
class Hookpoints:
    """Which tensors of each layer the transcoder reads (`input`) and writes (`output`)."""

    input: InputSite = "mlp_in"
    output: OutputSite = "mlp_out"

    def __post_init__(self) -> None:
        if self.input not in INPUT_SITES:
            raise TranscoderFormatError(f"unknown input site {self.input!r}; expected one of {INPUT_SITES}")
        if self.output not in OUTPUT_SITES:
            raise TranscoderFormatError(f"unknown output site {self.output!r}; expected one of {OUTPUT_SITES}")


ACTIVATIONS = ("relu", "jumprelu", "topk")


@dataclass(frozen=True)
class Activation:
    """The activation function of every encoder.

    `topk` keeps the k largest values per token and layer. sparsify applies ReLU first
    (`relu_before_topk=True`); circuit-tracer keeps the k largest pre-activations even when negative.
    `k` is one int for every layer, or a tuple with one k per layer (runs trained with a per-layer k);
    a tuple whose entries are all equal is stored as that int. Read it with `k_at(layer)`.
    """

    kind: Literal["relu", "jumprelu", "topk"]
    k: int | tuple[int, ...] | None = None
    relu_before_topk: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise UnknownActivationError(f"unknown activation {self.kind!r}; supported: {ACTIVATIONS}")
        if isinstance(self.k, (list, tuple)):
            ks = tuple(int(k) for k in self.k)
            object.__setattr__(self, "k", ks[0] if ks and len(set(ks)) == 1 else ks)
        ks = self.k if isinstance(self.k, tuple) else (self.k,)
        if self.kind == "topk" and (not ks or any(k is None or k < 1 for k in ks)):
            raise TranscoderFormatError(f"topk activation needs k >= 1 for every layer, got k={self.k}")

    @property
    def per_layer(self) -> bool:
        """True when layers have different k."""
        return isinstance(self.k, tuple)

    def k_at(self, layer: int) -> int | None:
        """The TopK k of `layer` (None for ReLU / JumpReLU without k)."""
        return self.k[layer] if isinstance(self.k, tuple) else self.k


@dataclass
class Encoder:
    """Encoder of one source layer: W [F, D], b [F], JumpReLU threshold [F] or None."""

    W: Tensor
    b: Tensor
    threshold: Tensor | None = None
    in_scale: float = 1.0


@dataclass
class Decoder:
    """How source layer S writes into target layer T: rows W [F_S, D] (possibly shared), gate vectors [F_S]."""

    W: Tensor
    coef: float = 1.0
    offset: Tensor | None = None
    scale: Tensor | None = None


@dataclass
class Skip:
    """Linear skip from the input of source S to the output of target T: x_S · Wᵀ · coef, W [D_out, D_in]."""

    W: Tensor
    coef: float = 1.0


@dataclass
class SparseActs:
    """Activations of one layer in COO form, sorted by (row, feature): each tensor is [n]."""

    rows: Tensor
    features: Tensor
    values: Tensor

    @classmethod
    def from_dense(cls, acts: Tensor) -> SparseActs:
        rows, feats = acts.nonzero(as_tuple=True)
        return cls(rows, feats, acts[rows, feats])

    def select(self, mask: Tensor) -> SparseActs:
        return SparseActs(self.rows[mask], self.features[mask], self.values[mask])


@dataclass
class Transcoder:
    """A full set of transcoders for an L-layer model (see the module docstring for the maths)."""

    encoders: list[Encoder]
    decoders: dict[tuple[int, int], Decoder]
    biases: list[Tensor]
    activation: Activation
    skips: dict[tuple[int, int], Skip] = field(default_factory=dict)
    hookpoints: Hookpoints = field(default_factory=Hookpoints)
    name: str = ""
    format: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # ----- shape facts -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.encoders)

    @property
    def d_model(self) -> int:
        return self.encoders[0].W.shape[1]

    def n_features(self, layer: int) -> int:
        return self.encoders[layer].W.shape[0]

    @property
    def is_cross_layer(self) -> bool:
        return any(s != t for s, t in self.decoders)

    @property
    def has_skip(self) -> bool:
        return bool(self.skips)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoders[0].W.dtype

    @property
    def device(self) -> torch.device:
        return self.encoders[0].W.device

    def targets(self, source: int) -> list[int]:
        return sorted(t for s, t in self.decoders if s == source)

    def sources(self, target: int) -> list[int]:
        return sorted(s for s, t in self.decoders if t == target)

    def validate(self) -> None:
        """Raise TranscoderFormatError naming the first inconsistent tensor."""
        if not self.encoders:
            raise TranscoderFormatError("transcoder has no layers")
        L, D = self.n_layers, self.encoders[0].W.shape[1]
        if len(self.biases) != L:
            raise TranscoderFormatError(f"{len(self.biases)} decoder biases for {L} layers")
        if self.activation.per_layer and len(self.activation.k) != L:
            raise TranscoderFormatError(f"{len(self.activation.k)} per-layer k values for {L} layers")
        for s, enc in enumerate(self.encoders):
            F = enc.W.shape[0]
            _expect(enc.W, (F, D), f"layer {s} encoder W")
            _expect(enc.b, (F,), f"layer {s} encoder bias")
            if enc.threshold is not None:
                _expect(enc.threshold, (F,), f"layer {s} threshold")
            if self.activation.kind == "jumprelu" and enc.threshold is None:
                raise TranscoderFormatError(f"jumprelu activation but layer {s} has no threshold")
            _expect(self.biases[s], (D,), f"layer {s} decoder bias")
        for (s, t), dec in self.decoders.items():
            if not 0 <= s <= t < L:
                raise TranscoderFormatError(f"decoder ({s}->{t}) outside 0 <= source <= target < {L}")
            F = self.n_features(s)
            _expect(dec.W, (F, D), f"decoder {s}->{t}")
            for name in ("offset", "scale"):
                v = getattr(dec, name)
                if v is not None:
                    _expect(v, (F,), f"decoder {s}->{t} {name}")
        for (s, t), skip in self.skips.items():
            if not 0 <= s <= t < L:
                raise TranscoderFormatError(f"skip ({s}->{t}) outside 0 <= source <= target < {L}")
            _expect(skip.W, (D, D), f"skip {s}->{t}")
        for s in range(L):
            if s not in {src for src, _ in self.decoders}:
                raise TranscoderFormatError(f"layer {s} has an encoder but no decoder")

    # ----- device / dtype ----------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """Every stored tensor (shared ones may repeat)."""
        out: list[Tensor] = []
        for e in self.encoders:
            out += [t for t in (e.W, e.b, e.threshold) if t is not None]
        for d in self.decoders.values():
            out += [t for t in (d.W, d.offset, d.scale) if t is not None]
        return out + list(self.biases) + [s.W for s in self.skips.values()]

    def common_dtype(self) -> torch.dtype:
        """The floating dtype every tensor fits in without loss (bf16 and fp32 -> fp32)."""
        return functools.reduce(torch.promote_types, {t.dtype for t in self.tensors() if t.is_floating_point()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Transcoder:
        """A copy on `device`/`dtype`; tensors shared between decoders stay shared."""
        moved: dict[int, Tensor] = {}

        def mv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if id(t) not in moved:
                moved[id(t)] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            return moved[id(t)]

        return replace(
            self,
            encoders=[Encoder(mv(e.W), mv(e.b), mv(e.threshold), e.in_scale) for e in self.encoders],
            decoders={k: Decoder(mv(d.W), d.coef, mv(d.offset), mv(d.scale)) for k, d in self.decoders.items()},
            biases=[mv(b) for b in self.biases],
            skips={k: Skip(mv(s.W), s.coef) for k, s in self.skips.items()},
        )

    def with_hookpoints(self, hookpoints: Hookpoints) -> Transcoder:
        return replace(self, hookpoints=hookpoints)

    # ----- encode ------------------------------------------------------------------------------
    def pre_activation(self, layer: int, x: Tensor) -> Tensor:
        """[N, D] input-site tensor -> [N, F] pre-activations (with the encoder bias)."""
        enc = self.encoders[layer]
        return torch.nn.functional.linear(x * enc.in_scale, enc.W, enc.b)

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        """[N, F] pre-activations -> [N, F] activations a (zeros where inactive)."""
        act = self.activation
        if act.kind == "relu":
            return torch.relu(pre)
        if act.kind == "jumprelu":
            return pre * (pre > self.encoders[layer].threshold)
        if act.relu_before_topk:
            pre = torch.relu(pre)
        k = min(act.k_at(layer), pre.shape[-1])
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """[N, D] -> [N, F] activations of layer `layer`'s features."""
        return self.activate(layer, self.pre_activation(layer, x))

    def encode_sparse(self, layer: int, x: Tensor) -> SparseActs:
        """[N, D] -> the non-zero activations of layer `layer`, without a dense [N, F] activation tensor."""
        pre = self.pre_activation(layer, x)
        if self.activation.kind != "topk":
            return SparseActs.from_dense(self.activate(layer, pre))
        if self.activation.relu_before_topk:
            pre = torch.relu_(pre)
        values, feats = pre.topk(min(self.activation.k_at(layer), pre.shape[-1]), dim=-1)
        feats, order = feats.sort(dim=-1)
        values = values.gather(-1, order)
        rows = torch.arange(pre.shape[0], device=pre.device)[:, None].expand_as(feats)
        keep = values != 0
        return SparseActs(rows[keep], feats[keep], values[keep])

    # ----- decode ------------------------------------------------------------------------------
    def gated(self, source: int, target: int, acts: Tensor, features: Tensor) -> Tensor:
        """Activations a'_{S,T} consumed by the decoder: `acts` [n] of `features` [n] of layer `source`."""
        dec = self.decoders[(source, target)]
        out = acts
        if dec.offset is not None:
            out = out + dec.offset[features] * (acts > 0)
        if dec.scale is not None:
            out = out * dec.scale[features]
        return out * dec.coef

    def decoder_vectors(self, source: int, target: int, acts: Tensor, features: Tensor) -> Tensor:
        """Activation-scaled decoder vectors [n, D] that features (source, `features`) write at `target`."""
        return self.gated(source, target, acts, features)[:, None] * self.decoders[(source, target)].W[features]

    def skip(self, target: int, inputs: dict[int, Tensor] | list[Tensor]) -> Tensor | None:
        """Σ_S skip_coef · x_S · W_skipᵀ at `target` ([N, D]), or None without skip connection."""
        out = None
        for (s, t), sk in self.skips.items():
            if t == target:
                term = (inputs[s] @ sk.W.T) * sk.coef
                out = term if out is None else out + term
        return out

    def decode(self, target: int, acts: dict | list, inputs: dict[int, Tensor] | list[Tensor]) -> Tensor:
        """Reconstruction ŷ_T [N, D] from activations acts[S] (dense [N, F_S] or `SparseActs`) and input-site
        tensors inputs[S] [N, D]."""
        n = inputs[target].shape[0]
        out = self.biases[target].expand(n, -1).clone()
        for s in self.sources(target):
            a = acts[s] if isinstance(acts[s], SparseActs) else SparseActs.from_dense(acts[s])
            if a.rows.numel():
                vecs = self.decoder_vectors(s, target, a.values, a.features)
                out.index_add_(0, a.rows, vecs.to(out.dtype))
        skip = self.skip(target, inputs)
        return out if skip is None else out + skip

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        """Input-site tensors of every layer ([N, D] each) -> reconstructions of every layer."""
        if len(inputs) != self.n_layers:
            raise ShapeMismatchError(f"expected {self.n_layers} layer inputs, got {len(inputs)}")
        acts = [self.encode_sparse(s, x) for s, x in enumerate(inputs)]
        return [self.decode(t, acts, inputs) for t in range(self.n_layers)]

    __call__ = forward


def _expect(t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise TranscoderFormatError(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")
