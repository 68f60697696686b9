"""The README's "Interventions and steering" examples, run on the offline demo: they visibly change its prediction.

The Python example is extracted from README.md (the code block after `<!-- example:interventions -->`) and executed
as written; the curl bodies (after `<!-- example:interventions-curl -->`) are validated as the service validates them
(`InterventionRequest`) and run through the library exactly as the engine runs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest

from attribute_ray import Intervention, ReplacementModel, Supernode, generate_with_interventions, intervene
from attribute_ray.api import InterventionRequest
from attribute_ray.presets import resolve_preset

pytestmark = pytest.mark.timeout(600)
README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = "The capital of France is"


def readme_block(marker: str) -> str:
    """The body of the first fenced code block after `<!-- example:MARKER -->` in README.md."""
    text = README.read_text()
    m = re.search(rf"<!-- example:{re.escape(marker)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README.md has no code block after <!-- example:{marker} -->"
    return m.group(1)


@pytest.fixture(scope="module")
def python_example() -> tuple[dict, str]:
    """(the namespace the README's Python example leaves, what it printed)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    namespace: dict = {"__name__": "readme_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_block("interventions"), "README.md:interventions", "exec"), namespace)
    return namespace, out.getvalue()


def test_python_example_changes_the_prediction(python_example) -> None:
    ns, printed = python_example
    r = ns["r"]
    assert r.top_before[0].token == " Paris" and r.top_after[0].token != " Paris"
    assert r.top_after[0].prob > r.probs_after[r.top_before[0].token_id]  # " Paris" lost first place
    assert r.warnings == []  # both features are active where they are edited
    # the node it reads is one of the edited ones: scale -1 flips its activation
    (layer, pos, feat), = r.read_features
    assert (layer, feat) in ns["capital"].features and pos == len(ns["model"].tokenize(PROMPT)) - 1
    assert float(r.activations_before[0]) > 0 and float(r.activations_after[0]) == pytest.approx(-float(r.activations_before[0]))
    # what the comments promise is what it printed
    assert f"{r.top_before[0].token} -> {r.top_after[0].token}" in printed
    top3 = ns["graph"].top_features(3)
    assert repr(top3) in printed and f"# {top3!r}" in readme_block("interventions")


def test_python_example_steering_changes_the_text(python_example) -> None:
    ns, _ = python_example
    model: ReplacementModel = ns["model"]
    tokens = model.tokenize(PROMPT)
    greedy = model.model.generate(tokens[None], max_new_tokens=8, do_sample=False,
                                  attention_mask=tokens.new_ones(tokens.shape)[None],
                                  pad_token_id=model.tokenizer.eos_token_id)[0, len(tokens):].tolist()
    assert ns["plain"] == model.tokenizer.decode(greedy)  # the plain text is the model's own greedy continuation
    assert ns["steered"] != ns["plain"] and "Paris" in ns["plain"] and "Paris" not in ns["steered"]


def test_python_example_warns_on_an_inactive_feature(python_example) -> None:
    ns, printed = python_example
    model: ReplacementModel = ns["model"]
    trace = model.trace(model.tokenize(PROMPT))
    f = trace.features
    (layer, feat), = re.findall(r"Intervention\((\d+), (\d+), \"ablate\"\)\]\)\.warnings", readme_block("interventions"))
    layer, feat = int(layer), int(feat)
    assert not ((f.layers == layer) & (f.indices == feat)).any()  # indeed inactive here
    assert f"feature {feat} of layer {layer} (ablate): inactive at every prompt position" in printed
    (node,) = ns["r"].read_features
    assert ns["one"] == Intervention(node[0], node[2], "ablate", 0.0, (node[1],))


@pytest.mark.parametrize("route", ["interventions", "steer"])
def test_curl_examples_change_the_prediction(python_example, route: str) -> None:
    """Each curl body, validated by the service's model and converted as the engine converts it."""
    bodies = {m.group(1): json.loads(m.group(2)) for m in re.finditer(
        r"curl -X POST http://127\.0\.0\.1:8000/v1/(\w+) .*? -d '(.*?)'", readme_block("interventions-curl"), re.S)}
    req = InterventionRequest.model_validate(bodies[route])
    model: ReplacementModel = python_example[0]["model"]
    items = [Intervention(i.layer, i.feature, i.op, i.value, i.positions) for i in req.interventions]
    for sn in req.supernodes:
        items += Supernode(sn.label, [tuple(f) for f in sn.features]).interventions(sn.op, sn.value, sn.positions)
    assert req.prompt == PROMPT and items
    if route == "interventions":
        r = intervene(model, req.tokens or req.prompt, items, top_k=req.top_k)
        assert r.top_before[0].token == " Paris" and r.top_after[0].token != " Paris" and r.warnings == []
    else:
        kw = dict(max_new_tokens=req.max_new_tokens, temperature=req.temperature, seed=req.seed)
        plain, _ = generate_with_interventions(model, req.prompt, [], **kw)
        steered, _ = generate_with_interventions(model, req.prompt, items, **kw)
        assert steered != plain and "Paris" in plain and "Paris" not in steered


def test_demo_preset_is_what_the_example_loads() -> None:
    demo = resolve_preset("demo")
    assert Path(demo.model, "config.json").is_file() and Path(demo.transcoder).is_dir()
