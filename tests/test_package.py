"""The package imports offline, without Ray, and the console script is wired."""

import subprocess
import sys


def test_import_without_ray_or_network() -> None:
    code = (
        "import sys, attribute_ray; "
        "assert 'ray' not in sys.modules, 'attribute_ray imported ray'; "
        "print(attribute_ray.__version__)"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "NO_PROXY": "*", "https_proxy": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


def test_cli_info_on_tiny_model(tmp_path) -> None:
    from attribute_ray import save_sparsify
    from attribute_ray.tiny import save_tiny_model, tiny_model, transcoder_for

    model_dir = save_tiny_model(tmp_path / "model", "gpt2")
    tc_dir = save_sparsify(transcoder_for(tiny_model("gpt2")[0], kind="plt", skip=True), tmp_path / "tc", layer_prefix="h")
    out = subprocess.run(
        [sys.executable, "-m", "attribute_ray.cli", "info", "--model", str(model_dir), "--transcoder", str(tc_dir), "the cat sat"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "gpt2, 3 layers, d_model 32" in out.stdout and "PLT +skip" in out.stdout
    assert "active features per layer" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "attribute_ray.cli", "info", "--model", str(model_dir), "--transcoder", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1 and "local path does not exist" in bad.stderr


def test_presets_and_offline_hub_errors() -> None:
    import pytest

    from attribute_ray.presets import PRESETS, get_preset

    assert get_preset("smollm2-135m-clt").transcoder == "nev/SmolLM2-CLT-135M-73k-k32"
    assert {"smollm2-135m-clt", "llama-3.2-1b-plt", "gemma-2-2b-plt", "gemma-2-2b-clt-426k"} <= set(PRESETS)
    with pytest.raises(KeyError, match="available"):
        get_preset("nope")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    out = subprocess.run([sys.executable, "-m", "attribute_ray.cli", "info", "--preset", "smollm2-135m-clt"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "HubUnavailableError" in out.stderr and "SmolLM2-135M" in out.stderr
    assert "offline preset is 'demo'" in out.stderr
