"""Feature explanations on a synthetic activation cache whose features fire by known rules: records, the tokens
explainer and its detection score, and the explanations store (docs/formats.md §l)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from attribute_ray import activation_cache as cache
from attribute_ray.explanations import (
    Explanation,
    ExplanationsError,
    TokensExplainer,
    active_features,
    balanced_accuracy,
    explained,
    feature_labels,
    feature_records,
    read_explanations,
    write_explanations,
)
from attribute_ray.explanations import records as records_module
from attribute_ray.explanations import store as store_module
from attribute_ray.features import dashboards_from_cache, read_feature, write_feature_store

FILLER = ("the a of to and in is was city river big small red blue green one two three cat dog ran sat over under "
          "France French Lyon").split()
WORDS = ["<bos>", "<unk>", *FILLER, "Paris", "capital", "visit"]
N_SEQ, CTX, SHARD = 240, 24, 80
PARIS, RANDOM, AFTER_CAPITAL, VISIT_PARIS = (0, 5), (1, 7), (2, 3), (2, 9)
LOGITS = {PARIS: (["France", " French", "France", "Lyon"], ["cat"]), RANDOM: (["dog"], ["cat"]),
          AFTER_CAPITAL: (["city"], ["cat"]), VISIT_PARIS: (["France"], ["cat"])}


def save_tokenizer(path: Path) -> Path:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>").save_pretrained(path)
    return path


def make_windows(seed: int = 0) -> np.ndarray:
    """[N_SEQ, CTX] token ids: BOS, then random filler with "Paris", "capital <word>" and "visit Paris" sprinkled in."""
    rng = np.random.default_rng(seed)
    ids = {w: i for i, w in enumerate(WORDS)}
    w = rng.integers(ids[FILLER[0]], ids[FILLER[-1]] + 1, (N_SEQ, CTX))
    w[:, 0] = ids["<bos>"]
    for s in range(N_SEQ):
        for p in rng.choice(np.arange(1, CTX), size=rng.integers(0, 3), replace=False):
            w[s, p] = ids["Paris"]
        if rng.random() < 0.4:
            p = rng.integers(1, CTX - 1)
            w[s, p] = ids["capital"]  # the token after it stays filler
        if rng.random() < 0.3:
            p = rng.integers(1, CTX - 1)
            w[s, p : p + 2] = ids["visit"], ids["Paris"]
    return w


def activation_rows(windows: np.ndarray, seed: int = 1) -> pd.DataFrame:
    """The features' rules: PARIS on every "Paris"; AFTER_CAPITAL on the token after "capital"; VISIT_PARIS on
    "Paris" right after "visit"; RANDOM on 4% of the tokens at random."""
    rng = np.random.default_rng(seed)
    ids = {w: i for i, w in enumerate(WORDS)}
    s, p = np.nonzero(np.ones_like(windows, bool))
    keep = p > 0
    s, p = s[keep], p[keep]
    tok, prev = windows[s, p], windows[s, p - 1]
    rules = {PARIS: tok == ids["Paris"], AFTER_CAPITAL: prev == ids["capital"],
             VISIT_PARIS: (tok == ids["Paris"]) & (prev == ids["visit"]), RANDOM: rng.random(len(s)) < 0.04}
    parts = [pd.DataFrame({"layer": np.int16(l), "feature": np.int32(f), "sequence": s[m].astype(np.int64),
                           "position": p[m].astype(np.int16),
                           "activation": (0.5 + rng.random(int(m.sum()))).astype(np.float32)})
             for (l, f), m in rules.items()]
    return pd.concat(parts).sort_values(["sequence", "position", "layer", "feature"], ignore_index=True)


def make_cache(root: Path, *, feature_store: bool = True) -> tuple[Path, np.ndarray, pd.DataFrame]:
    """A cache written by the library's writer (3 shards), its tokenizer as the manifest's model, and (by
    default) the feature store beside it with the logits of `LOGITS`."""
    out, tok_dir = root / "cache", save_tokenizer(root / "tokenizer")
    windows, rows = make_windows(), activation_rows(make_windows())
    shards = cache.plan_shards(N_SEQ, SHARD)
    for sid, first, n in shards:
        part = rows[(rows.sequence >= first) & (rows.sequence < first + n)]
        cache.write_shard(str(out), sid, first, windows[first : first + n], pa.Table.from_pandas(part, preserve_index=False))
    cache.write_manifest(str(out), {
        "model": str(tok_dir), "transcoder": "synthetic", "ctx_len": CTX, "n_sequences": N_SEQ, "bos": True,
        "n_tokens": N_SEQ * (CTX - 1), "threshold": 0.0,
        "shards": [{"id": i, "first_sequence": f, "n_sequences": n,
                    "n_activations": int(rows.sequence.between(f, f + n - 1).sum())} for i, f, n in shards]})
    if feature_store:
        dash = dashboards_from_cache(out, decode=lambda ids: [WORDS[i] for i in ids], logit_effects=LOGITS)
        write_feature_store(dash, out)
    return out, windows, rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("explain"))


@pytest.fixture(scope="module")
def records(synthetic):
    out, _, _ = synthetic
    return {(r.layer, r.feature): r for r in feature_records(out, n_held_out=40, n_negatives=40)}


# ----- records ----------------------------------------------------------------------------------------------


def test_records_hold_the_top_sequences_split_and_negatives_that_never_fire(synthetic, records) -> None:
    out, windows, rows = synthetic
    assert sorted(records) == sorted(LOGITS) == active_features(out)
    for key, r in records.items():
        g = rows[(rows.layer == key[0]) & (rows.feature == key[1])]
        per_seq = g.groupby("sequence").activation.max().reset_index()
        want = per_seq.sort_values(["activation", "sequence"], ascending=[False, True]).head(10 + 40)
        got_max = sorted(max(e.activations) for e in r.train + r.held_out)
        np.testing.assert_allclose(got_max, sorted(want.activation), rtol=1e-6)
        assert len(r.train) == 10 and len(r.held_out) == min(40, len(want) - 10)
        assert [max(e.activations) for e in r.train] == sorted((max(e.activations) for e in r.train), reverse=True)
        assert len(r.negatives) == 40 and all(max(e.activations) == 0.0 for e in r.negatives)
        assert all(len(e.tokens) == len(e.activations) == 20 for e in r.negatives)
        assert all("<bos>" not in e.tokens for e in r.train + r.held_out + r.negatives)
        assert (r.top_logits, r.bottom_logits) == LOGITS[key]
    for e in records[PARIS].train + records[PARIS].held_out:  # activations sit exactly on "Paris"
        assert all((a > 0) == (t == "Paris") for t, a in zip(e.tokens, e.activations))


def test_records_are_deterministic_read_each_shard_once_and_depend_on_the_seed(synthetic, monkeypatch) -> None:
    out, _, _ = synthetic
    reads = []
    real = records_module.read_shard
    monkeypatch.setattr(records_module, "read_shard", lambda d, sid: reads.append(sid) or real(d, sid))
    a = list(feature_records(out, [PARIS, RANDOM]))
    assert sorted(reads) == [0, 1, 2]
    assert a == list(feature_records(out, [RANDOM, PARIS]))
    b = list(feature_records(out, [PARIS, RANDOM], seed=1))
    assert [r.train for r in a] != [r.train for r in b]
    assert list(feature_records(out, [(0, 6)])) == []  # never fires: no record


def test_without_a_feature_store_records_have_no_logits(tmp_path) -> None:
    out, _, _ = make_cache(tmp_path, feature_store=False)
    got = {(r.layer, r.feature): r for r in feature_records(out)}
    assert sorted(got) == sorted(LOGITS) == active_features(out)
    assert all(r.top_logits == [] and r.bottom_logits == [] for r in got.values())


# ----- the tokens explainer -------------------------------------------------------------------------------


def test_tokens_labels_name_what_fires_and_what_is_promoted(records) -> None:
    ex = TokensExplainer()
    assert ex.explain(records[PARIS]) == '"Paris" → France, French, Lyon'
    assert ex.explain(records[AFTER_CAPITAL]) == 'after "capital" → city'
    assert ex.explain(records[VISIT_PARIS]) == '"visit" "Paris" → France'


def test_detection_score_is_one_for_exact_rules_and_chance_for_random_firing(records) -> None:
    ex = TokensExplainer()
    for key in (PARIS, AFTER_CAPITAL, VISIT_PARIS):
        assert ex.score(records[key], ex.explain(records[key])) == 1.0, key
    r = records[RANDOM]
    assert 0.35 <= ex.score(r, ex.explain(r)) <= 0.65
    # the score is the balanced accuracy of "contains a trigger" (written out here)
    text = '"Paris" → France'
    pos = [("Paris" in e.tokens) for e in r.held_out]
    neg = [("Paris" in e.tokens) for e in r.negatives]
    assert ex.score(r, text) == pytest.approx((np.mean(pos) + 1 - np.mean(neg)) / 2)
    assert ex.score(records[PARIS], "no trigger at all") == 0.5
    assert ex.score(records[PARIS], '"capital" "Paris"') == 0.5  # never adjacent: predicts nothing activating


def test_labels_parse_back_to_their_triggers_whatever_the_tokens() -> None:
    from attribute_ray.explanations.tokens import Trigger, parse_label

    triggers = [Trigger('"'), Trigger("a, b", "→"), Trigger(None, "\\n"), Trigger("Paris")]
    text = ", ".join(t.render() for t in triggers) + " → x, y"
    assert parse_label(text) == triggers
    assert Trigger("b", "a").matches(["a", "b"]) and not Trigger("b", "a").matches(["b", "a"])
    assert Trigger(None, "a").matches(["a", "z"]) and not Trigger(None, "a").matches(["z", "a"])


def test_balanced_accuracy() -> None:
    assert balanced_accuracy([True, True, False, False], [False, True]) == pytest.approx((0.5 + 0.5) / 2)
    assert balanced_accuracy([True], []) == 1.0 and balanced_accuracy([], []) == 0.5


# ----- the store --------------------------------------------------------------------------------------------


def _files(store: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(store.rglob("*")) if p.is_file()}


def test_store_round_trip_merge_and_best_labels(tmp_path) -> None:
    es = [Explanation(0, 5, "tokens", '"Paris" → France', 1.0), Explanation(0, 5, "llm", "the word Paris", 0.9),
          Explanation(0, 6, "llm", "cities", None), Explanation(3, 1, "self", "a colour", 0.4),
          Explanation(3, 1, "tokens", "", 0.9)]
    write_explanations(tmp_path, es)
    assert read_explanations(tmp_path, 0, 5) == [es[0], es[1]]
    assert read_explanations(tmp_path, 3, 1) == [es[4], es[3]]
    assert read_explanations(tmp_path, 0, 6) == [es[2]] and read_explanations(tmp_path, 9, 9) == []
    assert feature_labels(tmp_path) == {(0, 5): '"Paris" → France', (0, 6): "cities", (3, 1): "a colour"}
    assert explained(tmp_path, "llm") == {(0, 5), (0, 6)} and explained(tmp_path, "nope") == set()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")) == [
        "features/explanations/llm/layer_000.parquet", "features/explanations/self/layer_003.parquet",
        "features/explanations/tokens/layer_000.parquet", "features/explanations/tokens/layer_003.parquet"]
    # a new explanation replaces the old one of its feature only; rewriting what is there changes nothing
    write_explanations(tmp_path, [Explanation(0, 6, "llm", "French cities", 0.7)])
    assert read_explanations(tmp_path, 0, 6)[0].text == "French cities" and read_explanations(tmp_path, 0, 5) == [es[0], es[1]]
    before = _files(tmp_path)
    write_explanations(tmp_path, [Explanation(0, 6, "llm", "French cities", 0.7), es[0]])
    write_explanations(tmp_path, [])
    assert _files(tmp_path) == before


def test_a_failing_write_leaves_the_previous_file(tmp_path, monkeypatch) -> None:
    write_explanations(tmp_path, [Explanation(1, 2, "tokens", "old", 0.5)])
    before = _files(tmp_path)

    def dying_writer(table, path, **kw):
        Path(path).write_bytes(b"half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(store_module.pq, "write_table", dying_writer)
    with pytest.raises(OSError, match="disk full"):
        write_explanations(tmp_path, [Explanation(1, 3, "tokens", "new", 0.5)])
    monkeypatch.undo()
    assert _files(tmp_path) == before and read_explanations(tmp_path, 1, 2)[0].text == "old"


def test_bad_explanations_are_refused(tmp_path) -> None:
    for bad in (Explanation(0, 1, "tokens", "x", 1.5), Explanation(0, 1, "Bad Name", "x", 0.5),
                Explanation(0, 1, "../up", "x", 0.5), Explanation(-1, 1, "tokens", "x", 0.5)):
        with pytest.raises(ExplanationsError):
            write_explanations(tmp_path, [bad])
    assert not list(tmp_path.rglob("*"))


def test_read_feature_carries_the_explanations(synthetic) -> None:
    out, _, _ = synthetic
    assert read_feature(out, *RANDOM)["explanations"] == []
    write_explanations(out, [Explanation(*PARIS, "tokens", '"Paris" → France', 1.0),
                             Explanation(*PARIS, "llm", "Paris", None)])
    got = read_feature(out, *PARIS)
    assert got["explanations"] == [{"explainer": "tokens", "text": '"Paris" → France', "score": 1.0},
                                   {"explainer": "llm", "text": "Paris", "score": None}]
    assert read_feature(out / "features", *PARIS)["explanations"] == got["explanations"]
    json.dumps(got)  # what /v1/features returns
    for e in ("tokens", "llm"):
        os.remove(out / "features" / "explanations" / e / "layer_000.parquet")


# ----- settings, explainers and the run loop ---------------------------------------------------------------


def test_make_explainer_builds_each_explainer_from_the_settings(monkeypatch) -> None:
    from attribute_ray import ReplacementModel
    from attribute_ray.explanations import ExplainSettings, make_explainer
    from attribute_ray.explanations.config import SELF_FIELDS
    from attribute_ray.explanations.llm import LLMExplainer, OpenAIChat
    from attribute_ray.explanations.self_explain import SelfExplainer, SelfExplainSettings
    from attribute_ray.tiny import tiny_model, transcoder_for

    assert set(SELF_FIELDS) <= set(SelfExplainSettings.model_fields)  # mirrored, not restated
    assert isinstance(make_explainer(ExplainSettings()), TokensExplainer)
    monkeypatch.setenv("MY_KEY", "sk-test")
    llm = make_explainer(ExplainSettings(explainer="llm", endpoint="http://127.0.0.1:9/", llm_model="m",
                                         api_key_env="MY_KEY", n_train=7))
    assert isinstance(llm, LLMExplainer) and isinstance(llm.chat, OpenAIChat) and llm.n_examples == 7
    assert (llm.chat.url, llm.chat.model, llm.chat.api_key) == ("http://127.0.0.1:9/v1/chat/completions", "m", "sk-test")
    hf, tok = tiny_model("llama")
    model = ReplacementModel(hf, tok, transcoder_for(hf))
    me = make_explainer(ExplainSettings(explainer="self", scale=2.5), model)
    assert isinstance(me, SelfExplainer) and me._chat is None
    assert me.settings == SelfExplainSettings(scale=2.5)
    with pytest.raises(ValueError, match="needs --endpoint"):
        ExplainSettings(explainer="llm")
    with pytest.raises(ValueError, match="needs the model"):
        make_explainer(ExplainSettings(explainer="self"))


def test_a_dead_endpoint_stops_the_run_keeping_what_was_explained(tmp_path) -> None:
    from attribute_ray.explanations import ExplainSettings, explain_cache, explain_chunk
    from attribute_ray.explanations.llm import EndpointError, LLMExplainer

    out, _, _ = make_cache(tmp_path)
    settings = ExplainSettings(explainer="llm", endpoint="http://127.0.0.1:9", llm_model="m", chunk_size=2,
                               n_held_out=2, n_negatives=2)
    calls = {"left": 1 + 4 + 1 + 4}  # explain + score two features, then the endpoint dies

    def dying_chat(messages: list[dict]) -> str:
        calls["left"] -= 1
        if calls["left"] < 0:
            raise EndpointError("chat endpoint http://127.0.0.1:9 failed after 5 attempts")
        return "Explanation: a city" if "Explanation:" not in messages[-1]["content"] else "Yes"

    def run_serially(chunks):
        return [explain_chunk(out, c, settings, LLMExplainer(dying_chat)) for c in chunks]

    report = explain_cache(out, settings, run_serially, wave=2, progress=False)
    assert (report.done, report.left) == (2, 2) and "failed after 5 attempts" in report.error
    done = explained(out, "llm")
    assert done == set(sorted(LOGITS)[:2])
    assert all(read_explanations(out, *k)[0].score == 0.5 for k in done)  # said yes to every example
    calls["left"] = 10**6  # the endpoint is back: a rerun explains only the rest
    report = explain_cache(out, settings, run_serially, progress=False)
    assert (report.done, report.left, report.error) == (2, 0, None) and explained(out, "llm") == set(LOGITS)
