"""What a re-run resumes from: the run's settings (OUT/config.json) and per-unit training checkpoints
(docs/formats.md §j).

OUT/checkpoints/{layer_l|clt}/ holds ``step_{N}.safetensors`` (weights ``param.*``, Adam state ``adam.*``,
dead-latent counters ``since``) and ``state.json`` (written after it: step, file, done, summary). No pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from attribute_ray.files import atomic_path, atomic_write
from attribute_ray.training.config import TrainConfig
from attribute_ray.training.transcoder import TrainableTranscoder, build_trainable, layer_scales


class Checkpoints:
    """The checkpoint folder of one training unit (a layer, or the whole CLT)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def state(self) -> dict | None:
        p = self.folder / "state.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def load(self) -> tuple[dict, dict[str, Tensor]] | None:
        """(state, tensors) of the latest checkpoint, or None."""
        st = self.state()
        if st is None:
            return None
        return st, load_file(str(self.folder / st["file"]))

    def save(self, step: int, tensors: dict[str, Tensor], state: dict) -> None:
        """Write the tensors, then point state.json at them, then remove older checkpoints."""
        name = f"step_{step:08d}.safetensors"
        with atomic_path(self.folder / name) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)})
        atomic_write(self.folder / "state.json", json.dumps({**state, "step": step, "file": name}, indent=2))
        for old in self.folder.glob("step_*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def finish(self, summary: list[dict]) -> None:
        """Mark the unit done with its per-layer summaries (a re-run skips it)."""
        atomic_write(self.folder / "state.json", json.dumps({**self.state(), "done": True, "summary": summary}, indent=2))


def checkpoint_folder(out: str | Path, kind: str, layer: int | None = None) -> Path:
    return Path(out) / "checkpoints" / ("clt" if kind == "clt" else f"layer_{layer}")


def pack_state(model: TrainableTranscoder, opt: torch.optim.Adam, since: Tensor) -> dict[str, Tensor]:
    """Weights, Adam moments and step counts, and the dead-latent counters `since` [n, f] as flat tensors."""
    tensors = {f"param.{n}": p for n, p in model.named_parameters()}
    names = dict(zip((id(p) for p in model.parameters()), (n for n, _ in model.named_parameters())))
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"adam.{n}.exp_avg"] = st["exp_avg"]
                tensors[f"adam.{n}.exp_avg_sq"] = st["exp_avg_sq"]
                tensors[f"adam.{n}.step"] = st["step"].reshape(1).float()
    tensors["since"] = since
    return tensors


def unpack_state(model: TrainableTranscoder, opt: torch.optim.Adam, tensors: dict[str, Tensor]) -> Tensor:
    """Inverse of `pack_state`: loads weights and Adam state in place; returns the dead-latent counters."""
    _load_weights(model, tensors)
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    state = {}
    for i, n in enumerate(names):
        if f"adam.{n}.exp_avg" in tensors:
            state[i] = {"step": tensors[f"adam.{n}.step"].reshape(()).clone(), "exp_avg": tensors[f"adam.{n}.exp_avg"],
                        "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"]}
    sd["state"] = state
    opt.load_state_dict(sd)
    return tensors["since"].clone()


def _load_weights(model: TrainableTranscoder, tensors: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tensors[f"param.{n}"])


def load_trained(cfg: TrainConfig, meta: dict, layers: list[int]) -> tuple[TrainableTranscoder, list[float], list[float], dict]:
    """(model at its latest checkpoint, s_in, s_out, state): the trainer's in-memory model, for assembly and tests."""
    model = build_trainable(cfg, meta, layers)
    got = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, layers[0])).load()
    if got is None:
        raise FileNotFoundError(f"no checkpoint for layers {layers} under {cfg.out}/checkpoints")
    st, tensors = got
    _load_weights(model, tensors)
    s_in, s_out = layer_scales(meta, layers)
    return model.eval(), s_in, s_out, st


def finished_units(cfg: TrainConfig, n_layers: int) -> tuple[dict[int, dict], list[list[int]]]:
    """(summary of every finished layer — also those other invocations (--layers) trained, the units this
    invocation still has to train)."""
    wanted = cfg.layers if cfg.layers is not None else list(range(n_layers))
    bad = [l for l in wanted if l >= n_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range: the model has {n_layers} layers")
    summaries: dict[int, dict] = {}
    pending = []
    for layers in cfg.units(n_layers):
        st = Checkpoints(checkpoint_folder(cfg.out, cfg.kind, layers[0])).state()
        if st and st.get("done"):
            for s in st["summary"]:
                summaries[s["layer"]] = s
        elif layers[0] in wanted:
            pending.append(layers)
    return summaries, pending



def check_identity(cfg: TrainConfig, *, write: bool) -> None:
    """Refuse to resume a run made with other settings; `write` records them (once the data is ready, so a
    typo in --dataset does not pin the folder)."""
    path = Path(cfg.out) / "config.json"
    ident = cfg.train_identity()
    if path.is_file():
        old = json.loads(path.read_text()).get("identity", {})
        if old != ident:
            diff = sorted(k for k in set(ident) | set(old) if ident.get(k) != old.get(k))
            raise ValueError(f"{cfg.out} holds a training run with different settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} → {ident.get(k)!r}' for k in diff)}); "
                             "use another --out or delete it")
    elif write:
        atomic_write(path, json.dumps({"identity": ident}, indent=2))
