"""Neuronpedia / Anthropic attribution-graph JSON (docs/formats.md §e), valid against Neuronpedia's graph-schema.json.

Node ids: feature ``{layer}_{feat}_{pos}``, error ``{layer}_-1_{pos}`` (the fixed form, not circuit-tracer
0.5.0's colliding ``0_{layer}_{pos}``), embedding ``E_{tokenId}_{pos}``, logit ``{L+1}_{tokenId}_{pos}``.
Only pruned edges are written, with weight = A[target, source]; nodes without edges are dropped except
embeddings and logits. A feature node's ``clerp`` is its label (``Graph.feature_labels``; "" when none). A node's
``influence`` is its cumulative share of total influence (smaller = more important), which the frontend's
pruning slider compares against.

Functions take a `Graph` duck-typed (its properties and `prune`): graph.py imports this module, not the other
way round.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from attribute_ray.files import atomic_write
from attribute_ray.pruning import PRUNE
from attribute_ray.settings import AttributionSettings

SLUG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
GENERATOR = {"name": "attribute-ray", "version": "0.1.0", "url": "https://github.com/attribute-ray/attribute-ray"}


def cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def cantor_inverse(n: int) -> tuple[int, int]:
    w = int(((8 * n + 1) ** 0.5 - 1) // 2)
    while (w + 1) * (w + 2) // 2 <= n:  # guard float rounding for large n
        w += 1
    while w * (w + 1) // 2 > n:
        w -= 1
    b = n - w * (w + 1) // 2
    return w - b, b


def _nodes(graph: Any, node_mask, cumulative) -> dict[int, dict]:
    nodes: dict[int, dict] = {}
    L, T = graph.n_layers, graph.n_pos
    selected = graph.selected_nodes.tolist()
    acts = graph.activation_values[graph.selected_features].tolist()
    tokens = graph.input_tokens.tolist()
    probs = graph.logit_probabilities.tolist()
    labels = graph.feature_labels or [""] * len(selected)
    for i in node_mask.nonzero()[:, 0].tolist():
        infl = float(cumulative[i])
        if i < graph.error_offset:
            layer, pos, feat = selected[i]
            node = dict(node_id=f"{layer}_{feat}_{pos}", feature=cantor(layer, feat), layer=str(layer), ctx_idx=pos,
                        feature_type="cross layer transcoder", jsNodeId=f"{layer}_{feat}-0", clerp=labels[i],
                        influence=infl, activation=acts[i])
        elif i < graph.token_offset:
            layer, pos = divmod(i - graph.error_offset, T)
            node = dict(node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                        feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0", clerp="", influence=infl)
        elif i < graph.logit_offset:
            pos = i - graph.token_offset
            tok = tokens[pos]
            node = dict(node_id=f"E_{tok}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                        jsNodeId=f"E_{tok}-{pos}", clerp="", influence=infl)
        else:
            k = i - graph.logit_offset
            target, p = graph.logit_targets[k], probs[k]
            node = dict(node_id=f"{L + 1}_{target.index}_{T - 1}", feature=target.index, layer=str(L + 1), ctx_idx=T - 1,
                        feature_type="logit", jsNodeId=f"L_{target.index}-{T - 1}",
                        clerp=f'Output "{target.token}" (p={p:.3f})', token_prob=p, is_target_logit=k == 0)
        nodes[i] = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, **node}
    return nodes


def graph_json(
    graph: Any,
    slug: str,
    *,
    node_threshold: float = PRUNE.node_threshold,
    edge_threshold: float = PRUNE.edge_threshold,
    scan: str | None = None,
    feature_json_base_url: str | None = None,
    info: dict | None = None,
) -> dict:
    """The `Graph` pruned with the thresholds, as a Neuronpedia/Anthropic JSON object (``{metadata, qParams, nodes,
    links}``)."""
    if not SLUG_RE.match(slug):
        raise ValueError(f"slug {slug!r} may only contain letters, digits, '_', '-' and '.'")
    node_mask, edge_mask, cumulative = graph.prune(node_threshold, edge_threshold)
    nodes = _nodes(graph, node_mask, cumulative)
    links = []
    row_nodes = graph.row_nodes.tolist()
    r, c = edge_mask.nonzero(as_tuple=True)
    weights = graph.rows[r, c].tolist()
    for ri, ci, w in zip(r.tolist(), c.tolist(), weights):
        tgt, src = nodes.get(row_nodes[ri]), nodes.get(ci)
        if tgt is not None and src is not None:
            links.append({"source": src["node_id"], "target": tgt["node_id"], "weight": w})
    connected = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    metadata = {
        "slug": slug,
        "scan": scan or graph.transcoder_id or graph.model_id,
        "transcoder_list": [],
        "prompt_tokens": list(graph.prompt_tokens),
        "prompt": graph.input_string,
        "node_threshold": node_threshold,
        "schema_version": 1,
        "info": {"generator": GENERATOR, "create_time_ms": int(time.time() * 1000), **(info or {}),
                 **({"trimmed": graph.settings["trimmed"]} if graph.settings.get("trimmed") else {})},
        "generation_settings": {k: graph.settings[k] for k in AttributionSettings.model_fields
                                if graph.settings.get(k) is not None},
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
    }
    if feature_json_base_url:
        metadata["feature_details"] = {"feature_json_base_url": feature_json_base_url}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(graph: Any, directory: str | os.PathLike, slug: str, **kwargs) -> Path:
    """Write ``{slug}.json`` and add its metadata to ``graph-metadata.json`` (deduplicated by slug)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = graph_json(graph, slug, **kwargs)
    path = directory / f"{slug}.json"
    atomic_write(path, json.dumps(data))
    meta_path = directory / "graph-metadata.json"
    index = json.loads(meta_path.read_text()) if meta_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
    atomic_write(meta_path, json.dumps(index, indent=2))
    return path
