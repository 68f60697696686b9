"""The attribution graph: nodes, the row block of its adjacency matrix, and circuit-tracer's conventions.

Node order (docs/method.md §5), N = n_sel + (L+1)·T + K:
    [selected features: n_sel | errors: n_sel + l·T + p | tokens: n_sel + L·T + p | logits: n_sel + (L+1)·T + k]
Only feature and logit nodes have incoming edges, so only their rows are stored: `rows` [n_sel + K, N],
rows = targets, columns = sources, A[target, source] = direct effect. `adjacency` materialises the dense
N×N matrix (zero rows for errors and tokens) only when asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attribute_ray import neuronpedia, pruning, wire
from attribute_ray.pruning import PRUNE, PruneResult


@dataclass(frozen=True)
class LogitTarget:
    """A logit node: its token string and vocabulary index (vocab_size + i for custom directions)."""

    token: str
    index: int


@dataclass
class Graph:
    input_string: str
    input_tokens: Tensor  # [T] long
    active_features: Tensor  # [n_active, 3] long: (layer, pos, feature)
    activation_values: Tensor  # [n_active] activation the decoder consumes
    selected_features: Tensor  # [n_sel] long, ascending indices into active_features
    logit_targets: list[LogitTarget]
    logit_probabilities: Tensor  # [K] weights (probabilities, not renormalised)
    rows: Tensor  # [n_sel + K, N] float32 adjacency rows of the selected features, then the logits
    n_layers: int
    vocab_size: int
    model_id: str = ""
    transcoder_id: str = ""
    settings: dict = field(default_factory=dict)
    prompt_tokens: list[str] = field(default_factory=list)  # each input token decoded
    feature_labels: list[str] | None = None  # [n_sel] aligned with selected_features; "" = no label
    special_positions: list[int] = field(default_factory=list)  # prompt positions of special tokens (BOS, chat markers)

    # ----- sizes and offsets ---------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return self.input_tokens.numel()

    @property
    def n_selected(self) -> int:
        return self.selected_features.numel()

    @property
    def n_logits(self) -> int:
        return len(self.logit_targets)

    @property
    def error_offset(self) -> int:
        return self.n_selected

    @property
    def token_offset(self) -> int:
        return self.n_selected + self.n_layers * self.n_pos

    @property
    def logit_offset(self) -> int:
        return self.n_selected + (self.n_layers + 1) * self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_offset + self.n_logits

    @property
    def row_nodes(self) -> Tensor:
        """[n_sel + K] node index of each stored row."""
        return torch.cat([torch.arange(self.n_selected), self.logit_offset + torch.arange(self.n_logits)])

    @property
    def logit_token_ids(self) -> Tensor:
        return torch.tensor([t.index for t in self.logit_targets], dtype=torch.long)

    @property
    def logit_tokens(self) -> Tensor:  # circuit-tracer's older name
        return self.logit_token_ids

    @property
    def selected_nodes(self) -> Tensor:
        """[n_sel, 3] (layer, pos, feature) of the feature nodes, in node order."""
        return self.active_features[self.selected_features]

    @property
    def adjacency(self) -> Tensor:
        """The dense [N, N] adjacency matrix A[target, source] in circuit-tracer's layout."""
        dense = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.rows.dtype)
        dense[self.row_nodes] = self.rows
        return dense

    @property
    def adjacency_matrix(self) -> Tensor:  # circuit-tracer's name
        return self.adjacency

    # ----- labels --------------------------------------------------------------------------------
    def label_features(self, labels: Mapping[tuple[int, int], str]) -> None:
        """Set `feature_labels` from labels keyed by (layer, feature); features without one get ""."""
        self.feature_labels = [labels.get((layer, feat), "") for layer, _, feat in self.selected_nodes.tolist()]

    def top_features(self, n: int | None = None) -> list[tuple[int, int]]:
        """The distinct (layer, feature) of the selected features, most influential on the logits first (a
        feature active at several positions counts once, at its best); at most `n`."""
        w = pruning.logit_vector(self.logit_probabilities, self.n_nodes, self.rows.dtype)
        infl = pruning.influence(pruning.normalize(self.rows), self.row_nodes, w)[: self.n_selected]
        nodes = self.selected_nodes.tolist()
        ranked = dict.fromkeys((nodes[i][0], nodes[i][2]) for i in torch.argsort(infl, descending=True).tolist())
        return list(ranked)[:n]

    # ----- pruning, scores, serialisation ----------------------------------------------------------
    def _counts(self) -> dict:
        return dict(n_features=self.n_selected, n_errors=self.n_layers * self.n_pos, n_tokens=self.n_pos)

    def prune(self, node_threshold: float = PRUNE.node_threshold,
              edge_threshold: float = PRUNE.edge_threshold) -> PruneResult:
        """Node mask [N], edge mask on the stored rows [n_sel + K, N], cumulative influence [N] (docs/method.md §7)."""
        return pruning.prune(self.rows, self.row_nodes, self.logit_probabilities, **self._counts(),
                             node_threshold=node_threshold, edge_threshold=edge_threshold)

    def scores(self) -> tuple[float, float]:
        """(replacement score, completeness score) of the unpruned graph (docs/method.md §8)."""
        return pruning.graph_scores(self.rows, self.row_nodes, self.logit_probabilities, **self._counts())

    def pruned(self, node_threshold: float = PRUNE.node_threshold,
               edge_threshold: float = PRUNE.edge_threshold) -> Graph:
        """The graph restricted to the features that survive pruning, with only the kept edges (other entries
        are zero). Error, token and logit nodes stay (their positions define the node order); `active_features`
        shrinks to the kept features."""
        node_mask, edge_mask, _ = self.prune(node_threshold, edge_threshold)
        keep_feat = node_mask[: self.n_selected]
        rows_kept = torch.cat([keep_feat, torch.ones(self.n_logits, dtype=torch.bool)])
        cols = torch.cat([keep_feat, torch.ones(self.n_nodes - self.n_selected, dtype=torch.bool)])
        mask = edge_mask & node_mask[None, :] & node_mask[self.row_nodes][:, None]
        rows = (self.rows * mask)[rows_kept][:, cols]
        kept = self.selected_features[keep_feat]  # a pruned graph lists only its own features as active
        labels = None if self.feature_labels is None else [
            label for label, keep in zip(self.feature_labels, keep_feat.tolist()) if keep]
        return Graph(**{**self.__dict__, "active_features": self.active_features[kept], "feature_labels": labels,
                        "activation_values": self.activation_values[kept],
                        "selected_features": torch.arange(len(kept)), "rows": rows,
                        "settings": {**self.settings, "pruned": {"node_threshold": node_threshold,
                                                                 "edge_threshold": edge_threshold}}})

    def to_msgpack(self) -> bytes:
        """The graph in the msgpack wire format (docs/formats.md §h), with its scores in the header."""
        replacement, completeness = self.scores()
        fields = {**vars(self), "logit_targets": [(t.token, t.index) for t in self.logit_targets]}
        return wire.to_msgpack(fields, {"replacement": replacement, "completeness": completeness})

    @classmethod
    def from_msgpack(cls, data: bytes) -> Graph:
        """The graph `to_msgpack` wrote; `wire.WireFormatError` for anything else."""
        fields, _ = wire.from_msgpack(data)
        return cls(**{**fields, "logit_targets": [LogitTarget(t, i) for t, i in fields["logit_targets"]]})

    def to_neuronpedia_json(self, slug: str, node_threshold: float = PRUNE.node_threshold,
                            edge_threshold: float = PRUNE.edge_threshold, **kw) -> dict:
        """The pruned graph as Neuronpedia JSON (`neuronpedia.graph_json`; `kw`: scan, feature_json_base_url, info)."""
        return neuronpedia.graph_json(self, slug, node_threshold=node_threshold, edge_threshold=edge_threshold, **kw)


def prune_graph(graph: Graph, node_threshold: float = PRUNE.node_threshold,
                edge_threshold: float = PRUNE.edge_threshold) -> PruneResult:
    return graph.prune(node_threshold, edge_threshold)


def graph_scores(graph: Graph) -> tuple[float, float]:
    return graph.scores()
