"""`python -m jobs.explain_features` end to end on the synthetic cache of tests/test_explanations.py, under a local
Ray: every active feature gets the tokens explainer's label and score, and a rerun writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from attribute_ray.explanations import (
    ExplainSettings,
    Explanation,
    TokensExplainer,
    active_features,
    feature_records,
    read_explanations,
)
from jobs.explain_features import main
from tests.test_explanations import PARIS, make_cache

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
             namespace="explain")
    yield
    ray.shutdown()


def stored(out: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "features").rglob("*") if p.is_file()}


def test_job_explains_every_feature_once_and_resumes(ray_session, tmp_path, capsys) -> None:
    out, _, _ = make_cache(tmp_path)
    assert main([str(out), "--explainer", "tokens", "--chunk-size", "3", "--n-held-out", "20"]) == 0
    assert "4 written, 0 left" in capsys.readouterr().out
    ex = TokensExplainer()
    for r in feature_records(out, n_held_out=20):  # the same labels and scores as the library, in one process
        text = ex.explain(r)
        assert read_explanations(out, r.layer, r.feature) == [
            Explanation(r.layer, r.feature, "tokens", text, ex.score(r, text))]
    assert read_explanations(out, *PARIS)[0].text == '"Paris" → France, French, Lyon'
    files = stored(out)
    assert main([str(out), "--explainer", "tokens"]) == 0  # resumed: nothing left to do
    assert "0 written, 0 left" in capsys.readouterr().out
    assert stored(out) == files
    assert len(active_features(out)) == 4


def test_self_explanations_come_from_an_actor_holding_the_model(ray_session, tmp_path) -> None:
    """The actor path on a tiny model (its words are noise; scoring is skipped: no held-out or negative examples)."""
    from attribute_ray import save_sparsify
    from attribute_ray.tiny import save_tiny_model, tiny_model, transcoder_for

    out, _, _ = make_cache(tmp_path)
    model = save_tiny_model(tmp_path / "model", "llama")
    tc = save_sparsify(transcoder_for(tiny_model("llama")[0]), tmp_path / "tc")
    assert main([str(out), "--explainer", "self", "--model", str(model), "--transcoder", str(tc), "--device", "cpu",
                 "--n-held-out", "0", "--n-negatives", "0", "--scale", "2", "--chunk-size", "2"]) == 0
    got = {k: read_explanations(out, *k) for k in active_features(out)}
    assert all(len(es) == 1 and es[0].explainer == "self" and es[0].text and es[0].score == 0.5 for es in got.values())


def test_command_line_flags_come_from_the_settings(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["somewhere", "--explainer", "llm"])  # an llm needs an endpoint: refused before any work
    assert "--endpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for name, field in ExplainSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in help_text, name
