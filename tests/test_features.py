"""Feature dashboards: every pass checked against a single-process computation over all rows at once."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from attribute_ray import features as F
from attribute_ray.activation_cache import cache_tokens_lookup, read_shard
from attribute_ray.neuronpedia import cantor

L, NF, NSEQ, C = 3, 20, 40, 8
SHARDS = [(0, 0, 14), (1, 14, 13), (2, 27, 13)]  # (id, first_sequence, n_sequences)
TOP_K, N_BINS, N_RANDOM, SEED = 5, 8, 4, 7
CTX_WINDOW, CTX_AFTER = 4, 2
SCHEMA = json.loads((Path(__file__).parent / "data" / "feature-details-schema.json").read_text())


def decode(ids: list[int]) -> list[str]:
    return [f"t{i}" for i in ids]


def make_rows(seed: int = 0) -> pd.DataFrame:
    """Random activations; values rounded to 0.1 so that ties exercise the tie-breaks."""
    rng = np.random.default_rng(seed)
    l, f, s, p = np.meshgrid(np.arange(L), np.arange(NF), np.arange(NSEQ), np.arange(1, C), indexing="ij")
    l, f, s, p = l.ravel(), f.ravel(), s.ravel(), p.ravel()
    prob = rng.uniform(0.0, 0.12, size=(L, NF))
    prob[:, 0] = 0.0  # never active
    prob[0, 1] = 0.5  # dense
    prob[1, 2] = 0.02
    active = rng.random(len(l)) < prob[l, f]
    act = np.round(rng.exponential(1.0, len(l)), 1).astype(np.float32) + np.float32(0.1)
    act[(l == 2) & (f == 3)] = np.float32(0.7)  # constant feature: act_min == act_max
    df = pd.DataFrame({"layer": l.astype(np.int16), "feature": f.astype(np.int32), "sequence": s.astype(np.int64),
                       "position": p.astype(np.int16), "activation": act})[active]
    single = pd.DataFrame({"layer": np.int16([1]), "feature": np.int32([0]), "sequence": np.int64([5]),
                           "position": np.int16([3]), "activation": np.float32([2.5])})  # one activation only
    return pd.concat([df, single], ignore_index=True)


def tokens_of(seq: int) -> list[int]:
    return [seq * C + p for p in range(C)]  # unique ids: a token string names its (sequence, position)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rows = make_rows()
    rng = np.random.default_rng(1)
    (root / "shards").mkdir()
    (root / "tokens").mkdir()
    shards = []
    for sid, first, n in SHARDS:
        part = rows[(rows.sequence >= first) & (rows.sequence < first + n)]
        part = part.iloc[rng.permutation(len(part))]  # rows in no particular order
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), root / "shards" / f"{sid:06d}.parquet")
        seqs = np.arange(first, first + n)
        tok = pa.table({"sequence": pa.array(seqs, pa.int64()),
                        "tokens": pa.array([tokens_of(s) for s in seqs], pa.list_(pa.int32()))})
        pq.write_table(tok, root / "tokens" / f"{sid:06d}.parquet")
        shards.append({"id": sid, "first_sequence": first, "n_sequences": n, "n_activations": len(part)})
    manifest = {"model": "tiny", "transcoder": "tiny-clt", "n_layers": L, "n_features": [NF] * L, "ctx_len": C,
                "n_sequences": NSEQ, "n_tokens": NSEQ * (C - 1), "bos": True, "threshold": 0.0, "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, rows


def passes(root: Path, order=None, split: int = 1):
    """Run the three passes over the shards in `order`, optionally cutting each shard into `split` random row
    chunks (which splits sequences across partials), merging left to right."""
    ids = [s[0] for s in SHARDS] if order is None else order
    rng = np.random.default_rng(len(ids) + split)
    chunks = []
    for i in ids:
        df = read_shard(root, i)
        cut = np.array_split(rng.permutation(len(df)), split)
        chunks += [df.iloc[c] for c in cut]
    as_dicts = [{c: d[c].to_numpy() for c in d.columns} for d in chunks]  # dict-of-arrays input works too

    def fold(parts, merge):
        out = parts[0]
        for p in parts[1:]:
            out = merge(out, p)
        return out

    stats = fold([F.stats_partial(c) for c in chunks], F.merge_stats)
    details = fold([F.detail_partial(c, stats, top_k=TOP_K, n_bins=N_BINS, n_random=N_RANDOM, seed=SEED)
                    for c in as_dicts], F.merge_details)
    wanted = F.wanted_examples(details)
    contexts = fold([F.context_partial(c, wanted) for c in chunks], F.merge_contexts)
    return stats, details, contexts


# ----- reference (single process, all rows) ---------------------------------------------------------------


def splitmix(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def ref_hash(layer: int, feature: int, seq: int, seed: int) -> int:
    h = splitmix(seed)
    for v in (layer, feature, seq):
        h = splitmix(h ^ v)
    return h


def reference(rows: pd.DataFrame) -> dict:
    out = {}
    for (l, f), g in rows.groupby(["layer", "feature"]):
        vals = g.activation.to_numpy()
        lo, hi = float(vals.min()), float(vals.max())
        edges = np.linspace(lo, hi, N_BINS + 1)
        hist, _ = np.histogram(vals.astype(np.float64), bins=edges)
        best = g.assign(neg=-g.activation).sort_values(["neg", "sequence", "position"]).drop_duplicates("sequence")
        top = list(best.head(TOP_K)[["sequence", "position", "activation"]].itertuples(index=False, name=None))
        per_seq = best.assign(h=[ref_hash(int(l), int(f), int(s), SEED) for s in best.sequence])
        rnd = per_seq.sort_values(["h", "sequence"]).head(N_RANDOM)
        out[(int(l), int(f))] = dict(
            count=len(g), lo=lo, hi=hi, hist=hist, top=top, rows=g,
            random=list(rnd[["sequence", "position", "activation"]].itertuples(index=False, name=None)),
        )
    return out


def ref_example(rows: pd.DataFrame, seq: int, pos: int, window: int | None, after: int) -> tuple[list[str], list[float], int]:
    start, end = (0, C) if window is None else (max(0, pos - window + 1), min(C, pos + after + 1))
    acts = [0.0] * (end - start)
    for p, a in rows[rows.sequence == seq][["position", "activation"]].itertuples(index=False, name=None):
        if start <= p < end:
            acts[p - start] = float(a)
    return [f"t{seq * C + p}" for p in range(start, end)], acts, pos - start


@pytest.fixture(scope="module")
def built(cache):
    root, rows = cache
    stats, details, contexts = passes(root)
    lookup = {s: tokens_of(s) for s in range(NSEQ)}
    logits = {(l, f): ([f"up{l}_{f}"], [f"down{l}_{f}"]) for l in range(L) for f in range(NF)}
    dash = F.build_dashboards(stats, details, contexts, lookup, n_tokens_total=NSEQ * (C - 1), decode=decode,
                              logit_effects=logits, transcoder_id="tiny-clt", ctx_window=CTX_WINDOW,
                              ctx_after=CTX_AFTER)
    return stats, details, contexts, dash, reference(rows)


# ----- tests ------------------------------------------------------------------------------------------------


def test_stats_match_reference(built):
    stats, _, _, dash, ref = built
    assert sorted(dash) == sorted(ref)
    assert len(stats) == len(ref)
    for (l, f), r in ref.items():
        assert stats.get(l, f) == (r["count"], r["lo"], r["hi"])
        d = dash[(l, f)]
        assert d["act_min"] == r["lo"] and d["act_max"] == r["hi"]
        assert d["activation_frequency"] == r["count"] / (NSEQ * (C - 1))
        assert d["dense"] == (r["count"] / (NSEQ * (C - 1)) > 0.1)
        assert d["index"] == cantor(l, f) and d["layer"] == l and d["feature"] == f
        assert d["transcoder_id"] == "tiny-clt"
        assert d["top_logits"] == [f"up{l}_{f}"] and d["bottom_logits"] == [f"down{l}_{f}"]
    assert all(stats.get(l, 0) is None for l in (0, 2))  # never active: no dashboard
    assert dash[(0, 1)]["dense"] and not dash[(1, 2)]["dense"]


def test_histograms_match_numpy(built):
    _, details, _, dash, ref = built
    for key, r in ref.items():
        np.testing.assert_array_equal(details.histogram(*key), r["hist"])
        assert dash[key]["histogram"] == [float(x) for x in r["hist"]]
    assert ref[(2, 3)]["lo"] == ref[(2, 3)]["hi"]  # degenerate range: np.histogram puts everything last
    assert dash[(1, 0)]["histogram"][-1] == 1.0


def test_quantiles(built):
    _, _, _, dash, ref = built
    for key, r in ref.items():
        q = dash[key]["quantile_values"]
        assert len(q) == 100 and q == sorted(q)
        assert q[-1] == pytest.approx(r["hi"])
        counts, total = r["hist"], r["count"]
        edges = np.linspace(r["lo"], r["hi"], N_BINS + 1)
        for i, p in enumerate([0.01, 0.25, 0.5, 0.9, 0.99]):
            target, acc = p * total, 0
            for b, c in enumerate(counts):  # walk the bins: linear interpolation in the crossing bin
                if acc + c >= target and c > 0:
                    expected = edges[b] + (target - acc) / c * (edges[b + 1] - edges[b])
                    break
                acc += c
            if r["lo"] == r["hi"]:
                expected = r["lo"]
            assert q[round(p * 100) - 1] == pytest.approx(expected, abs=1e-9)
            true = np.quantile(r["rows"].activation.to_numpy(np.float64), p, method="inverted_cdf")
            assert abs(expected - true) <= (edges[1] - edges[0]) + 1e-9


def test_top_and_random_examples_match_reference(built):
    _, details, _, _, ref = built
    for (l, f), r in ref.items():
        k = (l << 32) | f
        for ex, want in ((details.top, r["top"]), (details.random, r["random"])):
            m = ex.key == k
            got = list(zip(ex.sequence[m].tolist(), ex.position[m].tolist(), ex.activation[m].tolist()))
            assert got == [(int(s), int(p), float(a)) for s, p, a in want]
    assert len(details.top.key) > 0 and len(details.random.key) > 0


def test_sample_hash_matches_pure_python():
    l, f, s = np.array([0, 2, 7]), np.array([1, 19, 123456]), np.array([0, 39, 1 << 40])
    got = F.sample_hash(l, f, s, 3).tolist()
    assert got == [ref_hash(int(a), int(b), int(c), 3) for a, b, c in zip(l, f, s)]


def test_dashboard_examples(built):
    _, _, contexts, dash, ref = built
    for key, r in ref.items():
        d = dash[key]
        (top, rnd) = d["examples_quantiles"]
        assert top["quantile_name"] == "Top activations" and rnd["quantile_name"] == "Random sample"
        top_seqs = {s for s, _, _ in r["top"]}
        for q, want in ((top, r["top"]), (rnd, r["random"])):
            assert len(q["examples"]) == len(want)
            for ex, (s, p, a) in zip(q["examples"], want):
                tokens, acts, ind = ref_example(r["rows"], int(s), int(p), CTX_WINDOW, CTX_AFTER)
                assert ex["tokens"] == tokens
                assert ex["tokens_acts_list"] == acts
                assert ex["train_token_ind"] == ind
                assert ex["tokens_acts_list"][ind] == float(a) == max(ex["tokens_acts_list"])
                assert ex["is_repeated_datapoint"] == (q is rnd and int(s) in top_seqs)
        # the context partial holds the feature's activations in each wanted window
        for s, p, a in r["top"] + r["random"]:
            pos, act = contexts.window(*key, int(s))
            g = r["rows"][r["rows"].sequence == s].sort_values("position")
            np.testing.assert_array_equal(pos, g.position.to_numpy(np.int64))
            np.testing.assert_array_equal(act, g.activation.to_numpy(np.float32))


def test_whole_window_and_driver(cache, built):
    root, rows = cache
    *_, ref = built
    dash = F.dashboards_from_cache(root, decode=decode, top_k=TOP_K, n_bins=N_BINS, n_random=N_RANDOM, seed=SEED,
                                   ctx_window=None)
    assert sorted(dash) == sorted(ref)
    for key, r in ref.items():
        d = dash[key]
        assert d["transcoder_id"] == "tiny-clt" and d["top_logits"] == [] and d["bottom_logits"] == []
        for ex, (s, p, a) in zip(d["examples_quantiles"][0]["examples"], r["top"]):
            tokens, acts, ind = ref_example(r["rows"], int(s), int(p), None, 0)
            assert (ex["tokens"], ex["tokens_acts_list"], ex["train_token_ind"]) == (tokens, acts, ind)
            assert len(tokens) == C
    only = F.dashboards_from_cache(root, decode=decode, top_k=TOP_K, n_bins=N_BINS, n_random=N_RANDOM, seed=SEED,
                                   layers=[1])
    assert sorted(only) == sorted(k for k in ref if k[0] == 1)


@pytest.mark.parametrize("order,split", [([2, 1, 0], 1), ([1, 2, 0], 1), ([0, 1, 2], 3), ([2, 0, 1], 4)])
def test_merge_order_independent(cache, built, order, split):
    root, _ = cache
    stats, details, contexts, _, _ = built
    s2, d2, c2 = passes(root, order, split)
    assert s2.equals(stats) and d2.equals(details) and c2.equals(contexts)


def test_merge_is_associative_and_commutative(cache):
    root, _ = cache
    dfs = [read_shard(root, i) for i, _, _ in SHARDS]
    st = F.merge_all([F.stats_partial(d) for d in dfs], F.merge_stats)
    parts = [F.detail_partial(d, st, top_k=3, n_bins=4, n_random=2, seed=1) for d in dfs]
    a, b, c = parts
    left = F.merge_details(F.merge_details(a, b), c)
    right = F.merge_details(a, F.merge_details(c, b))
    assert left.equals(right) and left.equals(F.merge_details(F.merge_details(c, a), b))
    empty = F.stats_partial(dfs[0].iloc[:0])
    assert len(empty) == 0 and F.merge_stats(empty, st).equals(st)
    e = F.detail_partial(dfs[0].iloc[:0], st, top_k=3, n_bins=4, n_random=2, seed=1)
    assert F.merge_details(left, e).equals(left)
    with pytest.raises(ValueError):
        F.merge_details(a, F.detail_partial(dfs[0], st, top_k=4, n_bins=4, n_random=2, seed=1))
    with pytest.raises(KeyError):
        F.detail_partial(dfs[0], F.stats_partial(dfs[1]))


def test_export_validates_and_store_round_trips(tmp_path, cache, built):
    root, _ = cache
    _, _, _, dash, _ = built
    n = F.export_feature_json(dash, tmp_path / "json")
    assert n == len(dash)
    for (l, f), d in dash.items():
        obj = json.loads((tmp_path / "json" / f"{cantor(l, f)}.json").read_text())
        jsonschema.validate(obj, SCHEMA)
        assert obj == d
        assert all(len(e["tokens"]) == len(e["tokens_acts_list"]) for q in obj["examples_quantiles"] for e in q["examples"])

    store = tmp_path / "store"
    index = F.write_feature_store(dash, store)
    meta = json.loads(index.read_text())
    assert meta["transcoder_id"] == "tiny-clt"
    assert set(meta["layers"]) == {"0", "1", "2"}
    for l in range(L):
        t = pq.read_table(store / "features" / meta["layers"][str(l)]["file"])
        assert t.schema.equals(F.STORE_SCHEMA)
        assert t.num_rows == meta["layers"][str(l)]["n_features"] == sum(1 for k in dash if k[0] == l)
    for (l, f), d in dash.items():
        assert F.read_feature(store, l, f) == {**d, "explanations": []}
        assert F.read_feature(store / "features", l, f) == {**d, "explanations": []}
    assert F.read_feature(store, 0, 0) is None and F.read_feature(store, 9, 0) is None
    assert F.export_feature_json(store, tmp_path / "json2") == len(dash)
    for p in (tmp_path / "json").iterdir():
        assert (tmp_path / "json2" / p.name).read_text() == p.read_text()

    # rewriting one layer keeps the others, and readers see the new file (cache keyed by file version)
    changed = {k: {**d, "top_logits": ["new"]} for k, d in dash.items() if k[0] == 1}
    F.write_feature_store(changed, store)
    assert F.read_feature(store, 1, 2)["top_logits"] == ["new"]
    assert F.read_feature(store, 0, 1) == {**dash[(0, 1)], "explanations": []}
    assert not [p for p in (store / "features").iterdir() if p.name.endswith(".tmp")]


def test_cache_tokens_lookup(cache):
    root, _ = cache
    got = cache_tokens_lookup(root)([39, 0, 14, 13])
    assert got == {s: tokens_of(s) for s in (0, 13, 14, 39)}


# ----- direct logit effects ------------------------------------------------------------------------------------


def _reference_logits(rm, layer: int, feat: int, k: int, final_gain, post_gain=None):
    tc = rm.transcoder
    v = torch.zeros(rm.d_model)
    for t in tc.targets(layer):
        dec = tc.decoders[(layer, t)]
        scale = 1.0 if dec.scale is None else float(dec.scale[feat])
        w = dec.coef * scale * dec.W[feat]
        if post_gain is not None:
            w = w * post_gain(t)
        v = v + w
    logits = (v * final_gain) @ rm.unembedding
    top = torch.argsort(logits, descending=True)[:k].tolist()
    bottom = torch.argsort(logits)[:k].tolist()
    return [rm.tokenizer.decode([i]) for i in top], [rm.tokenizer.decode([i]) for i in bottom], logits


def test_logit_effects_clt_llama():
    from attribute_ray.replacement import ReplacementModel
    from attribute_ray.tiny import tiny_model, transcoder_for

    model, tok = tiny_model("llama")
    tc = transcoder_for(model, kind="clt", gates=True, n_features=16)
    for (s, t), dec in tc.decoders.items():
        dec.coef = 0.5 + 0.25 * (t - s)  # exercise coef
    rm = ReplacementModel(model, tok, tc)
    got = F.logit_effects(rm, {0: [3, 5], 2: [0]}, k=6, chunk_size=1)
    assert sorted(got) == [(0, 3), (0, 5), (2, 0)]
    gain = model.model.norm.weight.detach()
    for (l, f), (top, bottom) in got.items():
        ref_top, ref_bottom, _ = _reference_logits(rm, l, f, 6, gain)
        assert (top, bottom) == (ref_top, ref_bottom)
    every = F.logit_effects(rm, k=3)
    assert len(every) == 3 * 16 and every[(0, 3)] == (got[(0, 3)][0][:3], got[(0, 3)][1][:3])


def test_logit_effects_gemma2_uses_one_plus_w():
    from attribute_ray.replacement import ReplacementModel
    from attribute_ray.tiny import tiny_model, transcoder_for

    model, tok = tiny_model("gemma2")
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="clt", gates=True, n_features=16))
    final = 1.0 + model.model.norm.weight.detach()
    post = lambda t: 1.0 + model.model.layers[t].post_feedforward_layernorm.weight.detach()  # noqa: E731
    feats = {0: [1, 7], 1: [4]}
    plain = F.logit_effects(rm, feats, k=5, post_mlp_gain=False)
    full = F.logit_effects(rm, feats, k=5)
    for (l, f) in plain:
        assert plain[(l, f)] == _reference_logits(rm, l, f, 5, final)[:2]
        assert full[(l, f)] == _reference_logits(rm, l, f, 5, final, post)[:2]
    # the gain matters: using w instead of 1 + w changes some ranking
    wrong = [_reference_logits(rm, l, f, 5, final - 1.0)[:2] for (l, f) in plain]
    assert wrong != [plain[k] for k in plain]


def test_logit_effects_gpt2_layernorm_centres():
    from attribute_ray.replacement import ReplacementModel
    from attribute_ray.tiny import tiny_model, transcoder_for

    model, tok = tiny_model("gpt2")
    rm = ReplacementModel(model, tok, transcoder_for(model, kind="plt", n_features=8))
    got = F.logit_effects(rm, {1: [2]}, k=4)
    dec = rm.transcoder.decoders[(1, 1)]
    v = dec.coef * dec.W[2]
    logits = ((v - v.mean()) * model.transformer.ln_f.weight.detach()) @ rm.unembedding
    assert got[(1, 2)] == ([tok.decode([i]) for i in torch.argsort(logits, descending=True)[:4].tolist()],
                           [tok.decode([i]) for i in torch.argsort(logits)[:4].tolist()])


def test_histogram_bins_agree_with_numpy_at_edges():
    """float32 activations at (and one ulp around) every bin edge land in np.histogram's bin."""
    rng = np.random.default_rng(3)
    n_feat, n_bins = 3000, 21
    lo, hi = np.sort((rng.random((n_feat, 2)) * rng.choice([1, 10, 1000], (n_feat, 1))).astype(np.float32), axis=1).T
    feats, vals = [], []
    for f in range(n_feat):
        e32 = np.linspace(float(lo[f]), float(hi[f]), n_bins + 1).astype(np.float32)
        v = np.concatenate([e32, np.nextafter(e32, np.float32(np.inf)), np.nextafter(e32, np.float32(-np.inf))])
        v = np.concatenate([[lo[f], hi[f]], v[(v >= lo[f]) & (v <= hi[f])]]).astype(np.float32)
        feats.append(np.full(len(v), f))
        vals.append(v)
    feats, vals = np.concatenate(feats), np.concatenate(vals)
    acts = {"layer": np.zeros(len(vals), np.int16), "feature": feats.astype(np.int32),
            "sequence": np.arange(len(vals)), "position": np.ones(len(vals), np.int16), "activation": vals}
    stats = F.stats_partial(acts)
    det = F.detail_partial(acts, stats, n_bins=n_bins)
    for f in range(n_feat):
        v = vals[feats == f].astype(np.float64)
        want, _ = np.histogram(v, bins=np.linspace(float(v.min()), float(v.max()), n_bins + 1))
        np.testing.assert_array_equal(det.histogram(0, f), want)


def test_huge_ids_take_the_unpacked_paths(cache, built):
    """Sequence ids too large to pack with (layer, feature) into 62 bits give the same selections."""
    root, _ = cache
    stats, details, contexts, _, _ = built
    big = 1 << 40
    dfs = [read_shard(root, i).assign(sequence=lambda d: d.sequence * big) for i, _, _ in SHARDS]
    st = F.merge_all([F.stats_partial(d) for d in dfs], F.merge_stats)
    det = F.merge_all([F.detail_partial(d, st, top_k=TOP_K, n_bins=N_BINS, n_random=N_RANDOM, seed=SEED) for d in dfs],
                      F.merge_details)
    assert st.equals(stats)
    np.testing.assert_array_equal(det.hist, details.hist)
    assert np.array_equal(det.top.sequence, details.top.sequence * big)
    assert np.array_equal(det.top.position, details.top.position)
    assert np.array_equal(det.top.activation, details.top.activation)
    assert len(det.random) == len(details.random)  # other ids hash differently; same per-feature sizes
    wanted = F.wanted_examples(details)
    per_shard = F.wanted_by_shard(wanted, [{"id": i, "first_sequence": a, "n_sequences": n} for i, a, n in SHARDS])
    assert sum(len(w) for w in per_shard.values()) == len(wanted)
    wanted_big = wanted * np.array([1, 1, big])
    ctx = F.merge_all([F.context_partial(d, wanted_big) for d in dfs], F.merge_contexts)
    assert np.array_equal(ctx.sequence, contexts.sequence * big) and np.array_equal(ctx.activation, contexts.activation)
    per = F.merge_all([F.context_partial(read_shard(root, i), per_shard[i]) for i, _, _ in SHARDS], F.merge_contexts)
    assert per.equals(contexts)


def test_pipeline_passes_equal_a_plain_fold_whatever_the_shard_mapper(cache, built):
    """`cache_partials` (what the jobs run, one shard per task) gives the partials of this file's own left fold
    over whole shards, whichever order a mapper computes the shards in."""
    root, _ = cache
    stats, details, contexts, _, _ = built

    def backwards(fn, calls):  # the last shard first, results in that order
        return [fn(*args) for args in reversed(list(calls))]

    for mapper in (F.map_serial, backwards):
        s, d, c = F.cache_partials(root, top_k=TOP_K, n_bins=N_BINS, n_random=N_RANDOM, seed=SEED, map_shards=mapper)
        assert s.equals(stats) and d.equals(details) and c.equals(contexts)


def test_feature_settings_take_the_flag_and_the_library_names_and_refuse_typos():
    s = F.FeatureSettings(n_bins=8, n_random=3)
    assert (s.bins, s.random) == (8, 3) and s == F.FeatureSettings(bins=8, random=3)
    assert (s.top_k, s.context, s.seed, s.dense_threshold) == (20, 16, 0, 0.1)
    with pytest.raises(ValueError):
        F.FeatureSettings(n_bin=8)

