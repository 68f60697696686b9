"""Interventions and steering on the replacement model (circuit-tracer's ``feature_intervention`` /
``feature_intervention_generate``, Neuronpedia's ``/steer``).

What an intervention changes
----------------------------
The model is the replacement model of `ReplacementModel`: at each layer T the MLP output is the transcoder
reconstruction ŷ_T (from the *current* feature activations) plus the error recorded on the clean run. An
`Intervention` edits the activation a of one feature (layer S, index f) at some positions — ``set``
(a := v), ``scale`` (a *= v), ``add`` (a += v), ``ablate`` (a := 0) — or scales/ablates an error node. Ops act
on the activation-function output a (bypassing the activation function: a scaled JumpReLU feature is not
re-thresholded); every target layer T the feature writes to receives

    Δ_T = (gated(S, T, a_new) − gated(S, T, a_old)) · W_dec[S, T][f]

with the transcoder's own gate (`Transcoder.gated`), so CLT offsets/scales are honoured. For an ungated
transcoder an ablation removes exactly the feature's source vector, and ``scale`` by c adds (c − 1) times it;
with gate offsets, ``scale`` acts on a, not on the offset.

Three regimes (`intervene`):

- ``direct_only=True``: the frozen local replacement model of docs/method.md §1 (attention patterns, norm scales
  and all transcoder outputs replayed from the clean run) plus the Δ's of the intervened features computed
  from their *clean* activations — a `Frozen` run with the interventions as its `Edit`. Linear, and it reproduces
  the attribution graph's direct effects exactly (`check_graph`).
- default: features respond. Every layer's activations are recomputed from the live (changed) residual, the
  ops are applied on top of the live activation, and the MLP output is ŷ(new activations) + recorded error.
  Attention and norms stay live unless ``freeze_attention`` (patterns and norm scales replayed).
- ``constrained_layers``: those layers' features do not respond (their activations stay at the clean values;
  ops apply to the clean value) and their outputs are frozen at the clean MLP output (skip paths stay live, as
  in the frozen model) plus the Δ's of the interventions — circuit-tracer's ``constrained_layers``.

Generation (`generate_with_interventions`) runs the real HF model with the KV cache; no clean run exists for
generated tokens, so the error there is the *live* one (e = MLP(x) − ŷ(x) on the same forward). The MLP output
is therefore MLP(x) + Σ Δ (plus (c − 1)·e for a scaled error node): with no (or zero-change) interventions it is
the plain model exactly, and the generation equals ``model.generate(do_sample=False)``.

Addresses: one order everywhere
-------------------------------
A *feature* is ``(layer, feature)`` (`Supernode` members, `Graph.top_features`); a *node*, a feature at one token
position, is ``(layer, position, feature)`` (`read_features`, `Graph.selected_nodes`, `Intervention.at`; the
order of circuit-tracer's intervention tuples ``(layer, pos, feature_idx, value)``). Layer first, feature last,
the position between them when there is one. `Intervention` itself takes ``(layer, feature, op, value,
positions)``, the feature order plus its positions; build one from a node with ``Intervention.at(node, ...)``.
The HTTP API (attribute_ray/api.py) names every field in objects and uses the same tuple orders.

Interventions that change nothing
---------------------------------
``ablate`` and ``scale`` (and ``set``/``add`` with 0) of a feature that is inactive at every chosen position leave
it at zero: the run equals the clean one. `intervention_warnings` names such interventions (checked on the clean
run of the prompt); `intervene` returns them in `InterventionResult.warnings`.

How it hooks in
---------------
All of it is public API of `ReplacementModel`: an `InterventionEdit` is the `Edit` that applies the ops to each
source layer's activations and scales error nodes, and each regime is one run strategy: ``direct_only`` is
``Frozen(trace, edit=...)``, the default ``Replaced(trace, edit=..., frozen_layers=constrained_layers,
freeze_attention=...)`` and generation ``Replaced(None, edit=..., live_errors=True)`` inside `ReplacementModel.hooks`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from attribute_ray.errors import InterventionError
from attribute_ray.graph import Graph
from attribute_ray.replacement import Edit, Frozen, Replaced, ReplacementModel, RunOutput, Trace
from attribute_ray.settings import SEED_MAX, VALUE_MAX

Op = Literal["set", "scale", "add", "ablate"]
OPS: tuple[str, ...] = ("set", "scale", "add", "ablate")
ERROR_OPS: tuple[str, ...] = ("ablate", "scale")
POSITION_RULES: tuple[str, ...] = ("all", "generated")
Positions = Sequence[int] | Literal["all", "generated"]


def _as_int(v, what: str) -> int:
    """An int from an int-like (Python, NumPy or 0-d tensor integer); bools and floats are refused."""
    if isinstance(v, bool):
        raise InterventionError(f"{what} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise InterventionError(f"{what} must be an int, got {v!r}") from None


# ----- what to change ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intervention:
    """Change feature `feature` of layer `layer` (or, with ``feature=None``, the error node of `layer`).

    positions: token positions (0 = the BOS the tokenizer prepends; negative counts from the end of the
    prompt), ``"all"`` (every position that can carry features: the prompt and, when generating, every
    generated token) or ``"generated"`` (generated tokens only; `generate_with_interventions` only).
    op: ``set`` a := value, ``scale`` a *= value, ``add`` a += value, ``ablate`` a := 0. Error nodes take
    only ``ablate`` and ``scale``. Several interventions on the same feature and position compose in order.
    value: finite, |value| ≤ 1e6 (`settings.VALUE_MAX`); anything else raises `InterventionError`.
    """

    layer: int
    feature: int | None = None
    op: str = "ablate"
    value: float = 0.0
    positions: Positions = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _as_int(self.layer, "layer"))
        if self.feature is not None:
            object.__setattr__(self, "feature", _as_int(self.feature, "feature (or None for the error node)"))
        if self.op not in OPS:
            raise InterventionError(f"unknown op {self.op!r}; expected one of {OPS}")
        if self.feature is None and self.op not in ERROR_OPS:
            raise InterventionError(
                f"op {self.op!r} is not allowed on the error node of layer {self.layer}; error nodes take {ERROR_OPS}"
            )
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise InterventionError(f"value must be a number, got {self.value!r}") from None
        if not (math.isfinite(value) and abs(value) <= VALUE_MAX):
            raise InterventionError(f"value must be finite with |value| <= {VALUE_MAX:g}, got {self.value!r}")
        object.__setattr__(self, "value", value)
        pos = self.positions
        if isinstance(pos, str):
            if pos not in POSITION_RULES:
                raise InterventionError(f"unknown positions {pos!r}; expected a list of ints, 'all' or 'generated'")
        else:
            if isinstance(pos, Tensor):
                pos = pos.flatten().tolist()
            try:
                pos = tuple(pos)
            except TypeError:
                raise InterventionError(f"positions must be a list of ints, 'all' or 'generated', got {pos!r}") from None
            pos = tuple(_as_int(p, "position") for p in pos)
            if not pos:
                raise InterventionError("positions is empty")
            object.__setattr__(self, "positions", pos)

    @classmethod
    def at(cls, node: Sequence[int], op: str = "ablate", value: float = 0.0) -> Intervention:
        """An intervention on one node ``(layer, position, feature)`` (the order of `read_features` and
        `Graph.selected_nodes`): feature `feature` of `layer` at that position only."""
        try:
            layer, position, feature = node
        except (TypeError, ValueError):
            raise InterventionError(f"a node is (layer, position, feature), got {node!r}") from None
        return cls(layer, feature, op, value, [position])

    @classmethod
    def on_error(cls, layer: int, op: str = "ablate", value: float = 0.0, positions: Positions = "all") -> Intervention:
        """An intervention on the error node of `layer` (op ``ablate`` or ``scale``)."""
        return cls(layer, None, op, value, positions)

    @property
    def is_error(self) -> bool:
        return self.feature is None

    def apply(self, a: Tensor) -> Tensor:
        """The new activation (or error factor) from the old one."""
        if self.op == "set":
            return torch.full_like(a, self.value)
        if self.op == "scale":
            return a * self.value
        if self.op == "add":
            return a + self.value
        return torch.zeros_like(a)


@dataclass
class Supernode:
    """A labelled group of features (layer, feature) steered together."""

    label: str
    features: list[tuple[int, int]]

    def interventions(self, op: str = "ablate", value: float = 0.0, positions: Positions = "all") -> list[Intervention]:
        return supernode_interventions(self, op, value, positions)


def supernode_interventions(
    supernode: Supernode, op: str = "ablate", value: float = 0.0, positions: Positions = "all"
) -> list[Intervention]:
    """The same op on every member of `supernode`."""
    if not supernode.features:
        raise InterventionError(f"supernode {supernode.label!r} has no features")
    out = []
    for member in supernode.features:
        try:
            layer, feature = member
        except (TypeError, ValueError):
            raise InterventionError(f"supernode {supernode.label!r}: member {member!r} is not a (layer, feature) pair") from None
        if feature is None:
            raise InterventionError(f"supernode {supernode.label!r}: member {member!r} has no feature index")
        out.append(Intervention(int(layer), int(feature), op, value, positions))
    return out


# ----- resolved against a model and a sequence ----------------------------------------------------------


@dataclass
class _Item:
    spec: Intervention
    positions: Tensor | None  # absolute positions, or None for a rule ("all"/"generated")

    def mask(self, abs_pos: Tensor, n_zero: int, prompt_len: int) -> Tensor:
        if self.positions is not None:
            return torch.isin(abs_pos, self.positions.to(abs_pos.device))
        lo = n_zero if self.spec.positions == "all" else max(n_zero, prompt_len)
        return abs_pos >= lo


@dataclass
class InterventionEdit(Edit):
    """Interventions grouped by layer and validated against the model and the sequence length: the `Edit`
    that applies them to a run of the replacement model (module docstring)."""

    features: dict[int, list[_Item]]  # source layer -> feature items, in the caller's order
    errors: dict[int, list[_Item]]  # layer -> error items
    n_zero: int
    prompt_len: int

    @classmethod
    def build(cls, model: ReplacementModel, interventions: Sequence[Intervention], *, prompt_len: int, n_zero: int,
              max_len: int, generating: bool) -> InterventionEdit:
        """Check `interventions` against `model` and a sequence of `max_len` tokens (a `prompt_len`-token prompt,
        the rest generated); negative positions count from the end of the prompt."""
        feats: dict[int, list[_Item]] = {}
        errs: dict[int, list[_Item]] = {}
        L = model.n_layers
        for iv in interventions:
            if isinstance(iv, Supernode):
                raise InterventionError(f"supernode {iv.label!r}: pass supernode_interventions(supernode, op, value) instead")
            if not isinstance(iv, Intervention):
                raise InterventionError(f"expected an Intervention, got {iv!r}")
            if not 0 <= iv.layer < L:
                raise InterventionError(f"layer {iv.layer} out of range: the model has {L} layers (0..{L - 1})")
            if iv.feature is not None:
                F = model.transcoder.n_features(iv.layer)
                if not 0 <= iv.feature < F:
                    raise InterventionError(f"feature {iv.feature} out of range: layer {iv.layer} has {F} features (0..{F - 1})")
            positions = None
            if iv.positions == "generated" and not generating:
                raise InterventionError("positions='generated' only applies to generate_with_interventions; use 'all' or a list")
            if not isinstance(iv.positions, str):
                resolved = []
                for p in iv.positions:
                    q = p + prompt_len if p < 0 else p
                    if not 0 <= q < max_len:
                        where = f"a {prompt_len}-token prompt" + (f" + {max_len - prompt_len} generated tokens" if generating else "")
                        raise InterventionError(f"position {p} out of range for {where}")
                    if q < n_zero:
                        raise InterventionError(
                            f"position {p} is a zero (BOS) position: it carries no features and no error node; "
                            f"positions start at {n_zero}"
                        )
                    resolved.append(q)
                positions = torch.tensor(sorted(set(resolved)), dtype=torch.long, device=model.device)
            (errs if iv.is_error else feats).setdefault(iv.layer, []).append(_Item(iv, positions))
        return cls(feats, errs, n_zero, prompt_len)

    def __bool__(self) -> bool:
        return bool(self.features or self.errors)

    def activations(self, layer: int, activations: Tensor, positions: Tensor) -> Tensor:
        """The ops on layer `layer`'s activations [B, T, F] at absolute `positions` [T], in the caller's order."""
        for it in self.features.get(layer, ()):
            m, f = it.mask(positions, self.n_zero, self.prompt_len), it.spec.feature
            activations[:, m, f] = it.spec.apply(activations[:, m, f])
        return activations

    def error_factor(self, layer: int, positions: Tensor) -> Tensor | None:
        """[T] factor each error vector of `layer` is multiplied by, or None when untouched."""
        items = self.errors.get(layer)
        if not items:
            return None
        factor = torch.ones(positions.numel(), device=positions.device)
        for it in items:
            m = it.mask(positions, self.n_zero, self.prompt_len)
            factor[m] = it.spec.apply(factor[m])
        return factor


def _forward(model: ReplacementModel, trace: Trace, edit: InterventionEdit, *, direct_only: bool, freeze_attention: bool,
             constrained: frozenset) -> RunOutput:
    """One run of the intervened replacement model on the trace's tokens."""
    if direct_only:  # the frozen local replacement model; only the intervened features' Δ from clean activations
        strategy = Frozen(trace, edit=edit)
    else:
        strategy = Replaced(trace, edit=edit, frozen_layers=constrained, freeze_attention=freeze_attention)
    with torch.no_grad():
        return model.run(strategy, trace.tokens)


# ----- intervene ----------------------------------------------------------------------------------------


class TokenProb(NamedTuple):
    token_id: int
    token: str
    prob: float


@dataclass
class InterventionResult:
    """Before = the clean (real) model; after = the intervened replacement model. Logits, probabilities and
    the final-norm output are at the last position; activations are of `read_features` (layer, pos, feature):
    `activations_*` the activation a the ops act on, `pre_activations_*` the encoder pre-activation (with b_enc)."""

    tokens: Tensor  # [T]
    logits_before: Tensor  # [vocab]
    logits_after: Tensor
    probs_before: Tensor
    probs_after: Tensor
    top_before: list[TokenProb]
    top_after: list[TokenProb]
    final_resid_before: Tensor  # [D] final-norm output (unembedding input), last position
    final_resid_after: Tensor
    read_features: list[tuple[int, int, int]]
    activations_before: Tensor  # [n]
    activations_after: Tensor
    pre_activations_before: Tensor
    pre_activations_after: Tensor
    warnings: list[str] = field(default_factory=list)  # interventions that change nothing (`intervention_warnings`)

    def demeaned_logit_change(self, model: ReplacementModel, token_ids: Sequence[int] | Tensor) -> Tensor:
        """Change of ⟨u_k, final-norm output⟩ (the graph's logit quantity; no soft-capping) for `token_ids`."""
        u = model.logit_vectors(torch.as_tensor(token_ids, dtype=torch.long, device=model.device))
        return (self.final_resid_after - self.final_resid_before).to(u.dtype) @ u.T


def _check_options(model: ReplacementModel, constrained_layers, top_k: int | None = None) -> frozenset:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InterventionError(f"top_k must be a positive int, got {top_k!r}")
    layers = frozenset(constrained_layers or ())
    bad = sorted(l for l in layers if not (isinstance(l, int) and 0 <= l < model.n_layers))
    if bad:
        raise InterventionError(f"constrained layer {bad[0]} out of range: the model has {model.n_layers} layers")
    return layers


def _check_reads(model: ReplacementModel, reads, T: int) -> list[tuple[int, int, int]]:
    out = []
    for r in reads or []:
        try:
            l, p, f = (int(v) for v in r)
        except (TypeError, ValueError):
            raise InterventionError(f"read_features entries are (layer, pos, feature), got {r!r}") from None
        if not 0 <= l < model.n_layers:
            raise InterventionError(f"read_features: layer {l} out of range: the model has {model.n_layers} layers")
        if not -T <= p < T:
            raise InterventionError(f"read_features: position {p} out of range for a {T}-token prompt")
        F = model.transcoder.n_features(l)
        if not 0 <= f < F:
            raise InterventionError(f"read_features: feature {f} out of range: layer {l} has {F} features")
        out.append((l, p % T, f))
    return out


def _read_acts(model: ReplacementModel, trace: Trace, edit: InterventionEdit, reads, inputs: list[Tensor] | None,
               frozen: frozenset) -> tuple[Tensor, Tensor]:
    """(activations a, pre-activations) of `reads`; `inputs` None = the clean run."""
    tc, T = model.transcoder, len(trace.tokens)
    abs_pos = torch.arange(T, device=model.device)
    acts, pres = [], []
    per_layer: dict[int, tuple[Tensor, Tensor]] = {}
    for l, p, f in reads:
        if l not in per_layer:
            x = trace.inputs[l] if inputs is None else inputs[l][0]
            if inputs is None or l in frozen:
                a = trace.features.dense(l, T, tc.n_features(l))
            else:
                a = tc.encode(l, x)
                a[: trace.n_zero] = 0
            if inputs is not None:
                a = edit.activations(l, a[None].clone(), abs_pos)[0]
            per_layer[l] = (a, tc.pre_activation(l, x))
        a, pre = per_layer[l]
        acts.append(a[p, f])
        pres.append(pre[p, f])
    empty = torch.empty(0)
    return (torch.stack(acts).float().cpu(), torch.stack(pres).float().cpu()) if reads else (empty, empty)


def intervention_warnings(model: ReplacementModel, prompt: str | Sequence[int] | Tensor,
                          interventions: Sequence[Intervention], *, trace: Trace | None = None) -> list[str]:
    """One message per feature intervention that cannot change anything on the prompt: its op keeps a zero
    activation at zero (``ablate``, ``scale``, ``set``/``add`` 0) and the feature is inactive on the clean run at
    every chosen prompt position (for a list: the listed prompt positions that are inactive). Positions
    "generated" and listed positions past the prompt are not checked (no clean run exists there); with "all" in
    generation the feature may still fire on generated tokens. `trace`: the prompt's clean trace,
    if already computed. Interventions are not otherwise validated here (`InterventionEdit.build` does that)."""
    if trace is None:
        trace = model.trace(model.tokenize(prompt))
    T, n_zero, feats = len(trace.tokens), trace.n_zero, trace.features
    out = []
    for iv in interventions:
        if not isinstance(iv, Intervention) or iv.is_error or float(iv.apply(torch.zeros(1))) != 0.0:
            continue
        if iv.positions == "generated":
            continue
        if iv.positions == "all":
            chosen = list(range(n_zero, T))
        else:
            chosen = sorted({p + T if p < 0 else p for p in iv.positions if n_zero <= (p + T if p < 0 else p) < T})
        if not chosen:
            continue
        hit = (feats.layers == iv.layer) & (feats.indices == iv.feature)
        active = set(feats.positions[hit].tolist())
        inactive = [p for p in chosen if p not in active]
        what = f"feature {iv.feature} of layer {iv.layer} ({iv.op})"
        if iv.positions == "all" and len(inactive) == len(chosen):
            out.append(f"{what}: inactive at every prompt position of the clean run, so it changes nothing there")
        elif iv.positions != "all" and inactive:
            out.append(f"{what}: inactive at position{'s' if len(inactive) > 1 else ''} "
                       f"{', '.join(map(str, inactive))} of the clean run, so it changes nothing there")
    return out


def _top(model: ReplacementModel, probs: Tensor, k: int) -> list[TokenProb]:
    p, i = probs.topk(min(k, probs.numel()))
    return [TokenProb(int(t), model.tokenizer.decode([int(t)]), float(q)) for t, q in zip(i.tolist(), p.tolist())]


@torch.no_grad()
def intervene(
    model: ReplacementModel,
    prompt: str | Sequence[int] | Tensor,
    interventions: Sequence[Intervention],
    *,
    freeze_attention: bool = False,
    constrained_layers: range | Sequence[int] | None = None,
    direct_only: bool = False,
    top_k: int = 10,
    read_features: Sequence[tuple[int, int, int]] | None = None,
) -> InterventionResult:
    """Run `prompt` with `interventions` on the replacement model; compare with the clean run (module docstring).

    direct_only: everything but the intervened features frozen (attention, norms, all other features) — the
    graph's direct effects. freeze_attention: attention patterns and norm scales replayed, features respond.
    constrained_layers: layers whose features do not respond and whose outputs stay at their clean values."""
    constrained = _check_options(model, constrained_layers, top_k)
    tokens = model.tokenize(prompt)
    T = len(tokens)
    trace = model.trace(tokens)
    edit = InterventionEdit.build(model, interventions, prompt_len=T, n_zero=trace.n_zero, max_len=T, generating=False)
    reads = _check_reads(model, read_features, T)
    frozen = frozenset(range(model.n_layers)) if direct_only else constrained
    out = _forward(model, trace, edit, direct_only=direct_only, freeze_attention=freeze_attention, constrained=constrained)
    before, after = trace.logits[-1].float(), out.logits[0, -1].float()
    pb, pa = before.softmax(-1), after.softmax(-1)
    act_b, pre_b = _read_acts(model, trace, edit, reads, None, frozen)
    act_a, pre_a = _read_acts(model, trace, edit, reads, out.inputs, frozen)
    return InterventionResult(
        tokens=tokens.cpu(),
        logits_before=before.cpu(), logits_after=after.cpu(), probs_before=pb.cpu(), probs_after=pa.cpu(),
        top_before=_top(model, pb, top_k), top_after=_top(model, pa, top_k),
        final_resid_before=trace.final_resid[-1].float().cpu(), final_resid_after=out.final_resid[0, -1].float().cpu(),
        read_features=reads, activations_before=act_b, activations_after=act_a,
        pre_activations_before=pre_b, pre_activations_after=pre_a,
        warnings=intervention_warnings(model, tokens, interventions, trace=trace),
    )


# ----- generation ---------------------------------------------------------------------------------------


@torch.no_grad()
def generate_with_interventions(
    model: ReplacementModel,
    prompt: str | Sequence[int] | Tensor,
    interventions: Sequence[Intervention],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[str, list[int]]:
    """Open-ended steering: ``model.model.generate`` (KV cache) with the interventions applied at every forward.

    positions "all" = prompt + every generated token, "generated" = generated tokens only, a list = those
    absolute positions (0 = BOS; negative counts from the end of the prompt). temperature 0 = greedy;
    otherwise plain temperature sampling (no top-k/top-p) seeded by `seed`. Returns (decoded continuation,
    continuation token ids). With no or zero-change interventions this is plain greedy generation."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InterventionError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InterventionError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InterventionError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
    tokens = model.tokenize(prompt)
    T = len(tokens)
    n_zero = min(model.n_zero_positions, T)
    edit = InterventionEdit.build(model, interventions, prompt_len=T, n_zero=n_zero, max_len=T + max_new_tokens,
                                  generating=True)
    if max_new_tokens == 0:
        return "", []
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(tokens)[None], pad_token_id=pad)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if not edit:  # nothing to change: the plain model
            out = model.model.generate(tokens[None], **kwargs)
        else:
            with model.hooks(Replaced(None, edit=edit, live_errors=True)):
                out = model.model.generate(tokens[None], **kwargs)
    new = out[0, T:].tolist()
    return tok.decode(new), new


# ----- checking a graph by intervention -----------------------------------------------------------------


def _corr(a: Tensor, b: Tensor) -> float | None:
    a, b = a.double(), b.double()
    if a.numel() < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None


@torch.no_grad()
def check_graph(model: ReplacementModel, graph: Graph, node_index: int, *, direct_only: bool = True,
                freeze_attention: bool = False, tolerance: float = 1e-4) -> dict:
    """Ablate one source node of `graph` (a feature column, or an error column) and compare the graph's
    prediction Δ target = −A[target, node] with the real change: of every logit target's demeaned logit
    ⟨u_k, final-norm output⟩ (last position) and of every selected feature's pre-activation.

    direct_only=True runs the frozen local replacement model, where the agreement is exact: ``exact`` is
    max|actual − predicted| ≤ tolerance · max|A|. direct_only=False lets features (and, unless
    freeze_attention, attention) respond; ``total_effect_gap`` then measures how far the total effect is
    from the direct effect (the same relative error, not expected to be small). Custom (non-token) logit
    targets are skipped. For a pruned graph the prediction uses the kept edges only."""
    n_sel, T = graph.n_selected, graph.n_pos
    if isinstance(node_index, bool) or not isinstance(node_index, int) or not 0 <= node_index < graph.token_offset:
        raise InterventionError(
            f"node {node_index!r} is not a feature (0..{n_sel - 1}) or error ({graph.error_offset}..{graph.token_offset - 1}) node; "
            "only those can be ablated"
        )
    tokens = graph.input_tokens.to(model.device)
    trace = model.trace(tokens)
    feats = trace.features
    if node_index < n_sel:
        l, p, f = graph.selected_nodes[node_index].tolist()
        hit = ((feats.layers == l) & (feats.positions == p) & (feats.indices == f)).nonzero()
        if hit.numel() == 0:
            raise InterventionError(f"feature ({l}, {p}, {f}) of the graph is not active on this model: wrong model or transcoder?")
        iv = Intervention(l, f, "ablate", positions=[p])
        node = dict(index=node_index, kind="feature", layer=l, position=p, feature=f,
                    activation=float(graph.activation_values[graph.selected_features[node_index]]))
    else:
        l, p = divmod(node_index - graph.error_offset, T)
        if p < trace.n_zero:
            raise InterventionError(f"error node {node_index} is at zero (BOS) position {p}: its vector is zero")
        iv = Intervention.on_error(l, "ablate", positions=[p])
        node = dict(index=node_index, kind="error", layer=l, position=p)
    edit = InterventionEdit.build(model, [iv], prompt_len=T, n_zero=trace.n_zero, max_len=T, generating=False)
    empty = InterventionEdit({}, {}, trace.n_zero, T)
    opts = dict(direct_only=direct_only, freeze_attention=freeze_attention, constrained=frozenset())
    base, out = _forward(model, trace, empty, **opts), _forward(model, trace, edit, **opts)

    col = graph.rows[:, node_index].float()
    pred_feat, pred_logit = -col[:n_sel], -col[n_sel:]
    # features: Δ pre-activation = Δ ⟨W_enc[f]·in_scale, input site⟩
    sel = graph.selected_nodes
    enc = model.transcoder.encoders
    act_feat = torch.stack([
        (out.inputs[fl][0, fp] - base.inputs[fl][0, fp]).float() @ (enc[fl].W[ff].float() * enc[fl].in_scale)
        for fl, fp, ff in sel.tolist()
    ]).cpu() if n_sel else torch.empty(0)
    # logits: Δ demeaned logit at the last position
    keep = [k for k, t in enumerate(graph.logit_targets) if t.index < graph.vocab_size]
    ids = torch.tensor([graph.logit_targets[k].index for k in keep], dtype=torch.long, device=model.device)
    u = model.logit_vectors(ids).float()
    act_logit = ((out.final_resid[0, -1] - base.final_resid[0, -1]).float() @ u.T).cpu()
    pred_logit = pred_logit[keep]

    scale = float(graph.rows.abs().max()) or 1.0
    err_feat = float((act_feat - pred_feat).abs().max()) if n_sel else 0.0
    err_logit = float((act_logit - pred_logit).abs().max()) if keep else 0.0
    max_err = max(err_feat, err_logit)
    rel = max_err / scale
    return {
        "node": node,
        "direct_only": direct_only,
        "logits": {
            "token_ids": ids.tolist(),
            "tokens": [graph.logit_targets[k].token for k in keep],
            "predicted": pred_logit.tolist(),
            "actual": act_logit.tolist(),
            "correlation": _corr(pred_logit, act_logit),
            "max_abs_error": err_logit,
        },
        "features": {
            "nodes": sel.tolist(),
            "predicted": pred_feat.tolist(),
            "actual": act_feat.tolist(),
            "correlation": _corr(pred_feat, act_feat),
            "max_abs_error": err_feat,
        },
        "skipped_logits": [graph.logit_targets[k].token for k in range(len(graph.logit_targets)) if k not in keep],
        "max_abs_error": max_err,
        "scale": scale,
        "relative_error": rel,
        "exact": rel <= tolerance,
        "total_effect_gap": None if direct_only else rel,
    }
