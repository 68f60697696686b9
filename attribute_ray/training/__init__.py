"""Training transcoders on a model's own MLP activations: per-layer (PLT, skip PLT) or an untied CLT.
The run folder it reads and writes: docs/formats.md §j.

The stages, each resumable (jobs/train_transcoder.py schedules them on Ray):

1. `prepare_windows` (activations.py): the corpus as BOS token windows, the last ones held out.
2. `collect_activations` (activations.py): every layer's MLP input and output on every window, fp16 on disk.
3. `train_layers` (loop.py): a `TrainableTranscoder` (transcoder.py) per layer, or one for a CLT, with
   checkpoints (checkpoints.py) a re-run resumes from; or `train_stream` (stream.py): every layer online, the
   model running once per step, for runs whose activations would not fit on disk.
4. `assemble` + `write_transcoder` (assemble.py): one library `Transcoder` in the sparsify format.
5. `evaluate` (evaluate.py): held-out FVU / L0 and the replacement model's KL and next-token agreement.
"""

from attribute_ray.training.activations import cached_activations, collect_activations, prepare_windows, read_meta
from attribute_ray.training.assemble import assemble, write_transcoder
from attribute_ray.training.checkpoints import (
    Checkpoints,
    check_identity,
    checkpoint_folder,
    finished_units,
    load_trained,
    pack_state,
    unpack_state,
)
from attribute_ray.training.config import TrainConfig
from attribute_ray.training.evaluate import evaluate, replacement_logits
from attribute_ray.training.loop import FAIL_AFTER_ENV, TrainingInterrupted, UnitTrainer, train_layers
from attribute_ray.training.stream import train_stream, windows_per_step
from attribute_ray.training.transcoder import TrainableTranscoder, build_trainable, layer_scales

__all__ = [
    "FAIL_AFTER_ENV",
    "Checkpoints",
    "TrainConfig",
    "TrainableTranscoder",
    "TrainingInterrupted",
    "UnitTrainer",
    "assemble",
    "build_trainable",
    "cached_activations",
    "check_identity",
    "checkpoint_folder",
    "collect_activations",
    "evaluate",
    "finished_units",
    "layer_scales",
    "load_trained",
    "pack_state",
    "prepare_windows",
    "read_meta",
    "replacement_logits",
    "train_layers",
    "train_stream",
    "unpack_state",
    "windows_per_step",
    "write_transcoder",
]
