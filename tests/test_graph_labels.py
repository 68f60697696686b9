"""Feature labels and special-token positions travel with a graph: msgpack header keys (optional on read), the
Neuronpedia JSON `clerp` of feature nodes, and `attribute()` marking BOS and chat markers (docs/formats.md §e, §h)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import msgpack
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from attribute_ray import ReplacementModel
from attribute_ray.attribution import attribute
from attribute_ray.graph import Graph
from attribute_ray.tiny import tiny_model, tiny_tokenizer, transcoder_for
from attribute_ray.wire import WireFormatError

SCHEMA = json.loads((Path(__file__).parent / "data" / "graph-schema.json").read_text())
MARKER = "<|im_start|>"


@pytest.fixture(scope="module")
def graph() -> Graph:
    model, tok = tiny_model("llama")
    return attribute("the capital of france is", ReplacementModel(model, tok, transcoder_for(model)))


def every_other_label(graph: Graph) -> dict[tuple[int, int], str]:
    """A label for every other selected (layer, feature), naming it, so a misaligned label is visible."""
    return {(layer, feat): f"L{layer} f{feat} label" for layer, _, feat in graph.selected_nodes.tolist()[::2]}


def test_labels_align_with_selected_features_and_round_trip(graph: Graph) -> None:
    labels = every_other_label(graph)
    graph.label_features(labels)
    try:
        nodes = graph.selected_nodes.tolist()
        assert graph.feature_labels == [labels.get((layer, feat), "") for layer, _, feat in nodes]
        assert any(graph.feature_labels) and "" in graph.feature_labels
        back = Graph.from_msgpack(graph.to_msgpack())
        assert back.feature_labels == graph.feature_labels
        assert back.special_positions == graph.special_positions == [0]  # the BOS tokenize() prepended
        header = msgpack.unpackb(graph.to_msgpack())
        assert header["feature_labels"] == graph.feature_labels and header["special_positions"] == [0]
        # a pruned graph keeps the labels of the features it keeps
        small = graph.pruned(0.5, 0.9)
        assert small.feature_labels == [labels.get((layer, feat), "") for layer, _, feat in small.selected_nodes.tolist()]
        assert len(small.feature_labels) == small.n_selected < graph.n_selected
    finally:
        graph.feature_labels = None


def test_old_msgpack_without_the_keys_still_decodes(graph: Graph) -> None:
    header = msgpack.unpackb(graph.to_msgpack())
    assert "feature_labels" not in header  # an unlabelled graph writes no labels
    del header["special_positions"]
    old = Graph.from_msgpack(msgpack.packb(header, use_bin_type=True))
    assert old.feature_labels is None and old.special_positions == []
    assert old.n_nodes == graph.n_nodes and old.rows.equal(graph.rows)
    # a Graph built without them has none either
    fields = {k: v for k, v in vars(graph).items() if k not in ("feature_labels", "special_positions")}
    assert Graph(**fields).special_positions == [] and Graph(**fields).feature_labels is None


@pytest.mark.parametrize("key, value, needle", [
    ("feature_labels", ["a"], "feature labels for"),
    ("feature_labels", "abc", "list of strings"),
    ("special_positions", [99], "special positions"),
])
def test_bad_label_keys_are_rejected(graph: Graph, key: str, value, needle: str) -> None:
    header = msgpack.unpackb(graph.to_msgpack())
    header[key] = value
    with pytest.raises(WireFormatError, match=needle):
        Graph.from_msgpack(msgpack.packb(header, use_bin_type=True))


def test_neuronpedia_clerp_is_the_feature_label(graph: Graph) -> None:
    labels = every_other_label(graph)
    graph.label_features(labels)
    try:
        data = graph.to_neuronpedia_json("labels", node_threshold=0.9, edge_threshold=0.98)
    finally:
        graph.feature_labels = None
    jsonschema.validate(data, SCHEMA)
    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    labelled = [n for n in features if (int(n["layer"]), int(n["node_id"].split("_")[1])) in labels]
    assert labelled and len(labelled) < len(features)
    for n in features:
        layer, feat, _ = map(int, n["node_id"].split("_"))
        assert n["clerp"] == labels.get((layer, feat), "")
    # without labels every feature clerp is empty, and the JSON is valid as before
    plain = graph.to_neuronpedia_json("plain", node_threshold=0.9, edge_threshold=0.98)
    jsonschema.validate(plain, SCHEMA)
    assert all(n["clerp"] == "" for n in plain["nodes"] if n["feature_type"] == "cross layer transcoder")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with one of its filler words replaced by a chat marker, a special token (id < 64)."""
    vocab = {(MARKER if t == "w61" else t): i for t, i in tiny_tokenizer().get_vocab().items()}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=[MARKER])


def test_special_positions_mark_bos_and_chat_markers() -> None:
    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    marker = tok.convert_tokens_to_ids(MARKER)
    assert marker < 64 and marker in tok.all_special_ids
    rm = ReplacementModel(model, tok, transcoder_for(model))
    g = attribute(f"the capital {MARKER} of france", rm, max_feature_nodes=8)
    assert g.input_tokens.tolist()[:4] == [tok.bos_token_id, *tok.convert_tokens_to_ids(["the", "capital", MARKER])]
    assert g.special_positions == [0, 3]
    assert Graph.from_msgpack(g.to_msgpack()).special_positions == [0, 3]
    # token ids as given (no BOS prepended: the first is special); an unknown word is prompt text, not a marker
    ids = [tok.bos_token_id, marker, *tok.convert_tokens_to_ids(["the", "cat"]), tok.unk_token_id]
    g = attribute(ids, rm, max_feature_nodes=8)
    assert g.input_tokens.tolist() == ids and g.special_positions == [0, 1]
