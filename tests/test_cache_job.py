"""The Ray Data activation-caching job on a tiny model and a small offline corpus."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attribute_ray import ReplacementModel, save_sparsify
from attribute_ray import activation_cache as cache
from attribute_ray.corpus import CorpusError, read_texts, token_windows
from attribute_ray.tiny import save_tiny_model, tiny_model, transcoder_for
from jobs.cache_activations import CacheConfig, parse_args, run

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    model_dir = save_tiny_model(root / "model", "qwen3", seed=4)
    tc = transcoder_for(tiny_model("qwen3", seed=4)[0], kind="clt", skip=True, gates=True)
    return model_dir, save_sparsify(tc, root / "tc")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Public-domain-ish offline text: Python's own pydoc topics, lower-cased for the tiny word vocabulary."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with path.open("w") as f:
        for text in list(topics.values())[:30]:
            f.write(json.dumps({"text": text.lower(), "id": 1}) + "\n")
    return path


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["ATTRIBUTE_RAY_CRASH_SHARD"] = ""  # set per test through the runtime of the actors
    ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False, namespace="cache")
    yield
    ray.shutdown()


def config(pair, corpus, out: Path, **kw) -> CacheConfig:
    base = dict(model=str(pair[0]), transcoder=str(pair[1]), dataset=str(corpus), n_tokens=1500, ctx_len=24,
                out=str(out), shard_windows=16, batch_size=8, num_actors=2, build_features=False)
    return CacheConfig(**{**base, **kw})


def read_shards(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((out / "shards").glob("*.parquet"))], ignore_index=True)


def expected_rows(pair, windows: np.ndarray) -> pd.DataFrame:
    """Straightforward single-process computation: one window at a time, dense activations."""
    rm = ReplacementModel.from_pretrained(str(pair[0]), str(pair[1]))
    tc = rm.transcoder
    rows = []
    for seq, window in enumerate(windows):
        trace = rm.trace(torch.as_tensor(window, dtype=torch.long))
        for layer in range(rm.n_layers):
            acts = tc.encode(layer, trace.inputs[layer])  # [T, F]
            pos, feat = acts.nonzero(as_tuple=True)
            vals = tc.gated(layer, layer, acts[pos, feat], feat)
            for p, f, v in zip(pos.tolist(), feat.tolist(), vals.tolist()):
                if p > 0 and v > 0:
                    rows.append((layer, f, seq, p, v))
    return pd.DataFrame(rows, columns=["layer", "feature", "sequence", "position", "activation"])


def test_job_matches_single_process_computation_and_resumes(ray_session, pair, corpus, tmp_path, capsys) -> None:
    cfg = config(pair, corpus, tmp_path / "cache")
    manifest = run(cfg)
    got = read_shards(tmp_path / "cache").sort_values(["sequence", "position", "layer", "feature"], ignore_index=True)
    tokenizer = ReplacementModel.from_pretrained(str(pair[0]), str(pair[1])).tokenizer
    windows = token_windows(tokenizer, read_texts(str(corpus)), ctx_len=24, n_tokens=1500)
    assert manifest["n_sequences"] == len(windows) and len(manifest["shards"]) == -(-len(windows) // 16)
    tokens = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "cache" / "tokens").glob("*.parquet"))])
    assert np.array_equal(np.stack(tokens.sort_values("sequence")["tokens"].to_list()), windows)
    want = expected_rows(pair, windows).sort_values(["sequence", "position", "layer", "feature"], ignore_index=True)
    assert len(got) == len(want) > 0
    for col in ("layer", "feature", "sequence", "position"):
        assert np.array_equal(got[col].to_numpy(), want[col].to_numpy())
    np.testing.assert_allclose(got["activation"], want["activation"], rtol=1e-4, atol=1e-5)
    assert sum(s["n_activations"] for s in manifest["shards"]) == len(got)
    # the same command again is a no-op
    capsys.readouterr()
    run(cfg)
    assert "all shards present" in capsys.readouterr().out


def test_a_crashing_actor_loses_and_duplicates_nothing(ray_session, pair, corpus, tmp_path) -> None:
    import ray

    marker = tmp_path / "crashed"
    cfg = config(pair, corpus, tmp_path / "cache")
    os.environ["ATTRIBUTE_RAY_CRASH_SHARD"] = f"2:{marker}"
    try:
        ray.shutdown()  # actors inherit the environment of the Ray instance
        ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
        manifest = run(cfg)
    finally:
        os.environ["ATTRIBUTE_RAY_CRASH_SHARD"] = ""
    assert marker.exists(), "the fault hook must have fired"
    ids = sorted(int(p.stem) for p in (tmp_path / "cache" / "shards").glob("*.parquet"))
    assert ids == list(range(len(manifest["shards"])))
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    rows = read_shards(tmp_path / "cache")
    assert not rows.duplicated(["layer", "feature", "sequence", "position"]).any()
    assert set(rows["sequence"]) <= set(range(manifest["n_sequences"]))
    assert rows.groupby("sequence").ngroups == manifest["n_sequences"]  # every window is there


def test_bad_inputs_fail_clearly_and_leave_nothing(pair, corpus, tmp_path) -> None:
    out = tmp_path / "cache"
    with pytest.raises(CorpusError, match="no column 'body'"):
        run(config(pair, corpus, out, text_column="body"))
    with pytest.raises(CorpusError, match="cannot read dataset|no .* files"):
        run(config(pair, corpus, out, dataset=str(tmp_path / "missing.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(CorpusError, match="not enough for one window"):
        run(config(pair, corpus, out, dataset=str(empty)))
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        config(pair, corpus, out, ctx_len=1)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    with pytest.raises(CorpusError, match="not writable"):
        run(config(pair, corpus, blocked / "cache"))
    assert not list(out.rglob("*.parquet"))


def test_dashboards_equal_a_single_process_computation(ray_session, pair, corpus, tmp_path) -> None:
    from attribute_ray.features import read_feature
    from jobs.build_features import build

    out = tmp_path / "cache"
    manifest = run(config(pair, corpus, out))
    build(str(out), top_k=5, n_bins=8)
    rows = read_shards(out)  # equal to the single-process rows (previous test); aggregate them by hand
    n_tokens = manifest["n_sequences"] * (manifest["ctx_len"] - 1)
    assert manifest["n_tokens"] == n_tokens
    checked = 0
    for (layer, feature), g in rows.groupby(["layer", "feature"]):
        d = read_feature(out, int(layer), int(feature))
        assert d is not None and d["index"] == (layer + feature) * (layer + feature + 1) // 2 + feature
        assert d["activation_frequency"] == pytest.approx(len(g) / n_tokens)
        acts = g["activation"].to_numpy()
        assert d["act_min"] == pytest.approx(acts.min()) and d["act_max"] == pytest.approx(acts.max())
        hist, _ = np.histogram(acts, bins=np.linspace(acts.min(), acts.max(), 9))
        if acts.min() < acts.max():
            assert d["histogram"] == pytest.approx(hist.tolist())
        per_seq = g.groupby("sequence")["activation"].max().sort_values(ascending=False)
        top = next(q for q in d["examples_quantiles"] if q["quantile_name"] == "Top activations")["examples"]
        assert [max(e["tokens_acts_list"]) for e in top] == pytest.approx(per_seq.to_numpy()[:5].tolist())
        for e in top:
            assert e["tokens_acts_list"][e["train_token_ind"]] == max(e["tokens_acts_list"])
        checked += 1
    assert checked > 20
    for layer in range(3):  # never-active features have no dashboard
        missing = set(range(48)) - set(rows[rows.layer == layer].feature)
        if missing:
            assert read_feature(out, layer, min(missing)) is None


# ----- the cache format and the command line, without Ray -----------------------------------------------------


def test_cache_format_round_trips_locally_and_through_fsspec(tmp_path) -> None:
    import uuid

    import pyarrow as pa

    rng = np.random.default_rng(0)
    windows = rng.integers(0, 50, (5, 6)).astype(np.int64)
    n = 40
    acts = pa.table({"layer": rng.integers(0, 3, n).astype(np.int16),
                     "feature": rng.integers(0, 9, n).astype(np.int32),
                     "sequence": rng.integers(10, 15, n).astype(np.int64),
                     "position": rng.integers(1, 6, n).astype(np.int16),
                     "activation": rng.random(n).astype(np.float32)})
    manifest = {"n_tokens": 25, "shards": [{"id": 3, "first_sequence": 10, "n_sequences": 5, "n_activations": n}]}
    for out in (str(tmp_path / "c"), f"memory://cache-{uuid.uuid4().hex}"):
        assert cache.completed_shards(out) == set()
        cache.write_shard(out, 3, 10, windows, acts)
        cache.write_manifest(out, manifest)
        assert cache.completed_shards(out) == {3} and cache.shard_rows(out, 3) == n
        pd.testing.assert_frame_equal(cache.read_shard(out, 3), acts.to_pandas())
        assert cache.read_manifest(out) == manifest
        assert cache.cache_tokens_lookup(out)([12, 10]) == {10: windows[0].tolist(), 12: windows[2].tolist()}
    assert cache.plan_shards(35, 16) == [(0, 0, 16), (1, 16, 16), (2, 32, 3)]


def test_a_failed_write_leaves_neither_the_file_nor_its_temp(tmp_path) -> None:
    from attribute_ray.files import atomic_open

    target = tmp_path / "shards" / "000000.parquet"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half a shard")
            raise RuntimeError("writer died")
    assert not target.exists() and not list((tmp_path / "shards").iterdir())
    (tmp_path / "shards" / ".000001.parquet.0123456789ab.tmp").write_bytes(b"left by a killed actor")
    cache.remove_temporaries(str(tmp_path))
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_command_line_keeps_the_readme_flags() -> None:
    argv = ["--model", "m", "--transcoder", "t", "--dataset", "d.jsonl", "--out", "o", "--n-tokens", "20_000",
            "--ctx-len", "64", "--split", "s", "--text-column", "body", "--batch-size", "4", "--shard-windows", "8",
            "--threshold", "0.5", "--no-bos", "--filter-bos", "--num-actors", "2", "--device", "cpu", "--no-features"]
    assert parse_args(argv) == CacheConfig(
        model="m", transcoder="t", dataset="d.jsonl", out="o", n_tokens=20_000, ctx_len=64, split="s",
        text_column="body", batch_size=4, shard_windows=8, threshold=0.5, bos=False, filter_bos=True, num_actors=2,
        device="cpu", build_features=False)
    assert parse_args(["--model", "m", "--transcoder", "t", "--dataset", "d", "--out", "o"]) == CacheConfig(
        model="m", transcoder="t", dataset="d", out="o")
    with pytest.raises(ValueError, match="give a model and a transcoder"):
        parse_args(["--dataset", "d", "--out", "o"])

