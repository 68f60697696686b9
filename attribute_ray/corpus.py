"""Text corpora → fixed token windows, deterministically (the caching and training jobs share it).

`--dataset` is a Hugging Face dataset id (with `--split`, `--text-column`, read streaming) or a local/remote
path: a .txt/.jsonl/.json/.parquet file or a directory of them (plain-text files are one document each).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from attribute_ray.errors import AttributeRayError

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CorpusError(AttributeRayError, ValueError):
    """The dataset is missing, empty, or lacks the text column."""


class CorpusSettings(BaseModel):
    """Which text to read and how windows start: the fields the caching and training configs share
    (`read_texts(dataset, split=, text_column=)`, `token_windows(..., bos=, filter_bos=)`)."""

    dataset: str = Field(description="HF dataset id, or a .txt/.jsonl/.parquet file or directory")
    split: str = Field("train", description="dataset split")
    text_column: str = Field("text", description="column holding the documents")
    bos: bool = Field(True, description="start every window with the BOS token (its position carries no features)")
    filter_bos: bool = Field(False, description="drop BOS tokens from inside the text first")


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise CorpusError(f"{path}: no {sorted(SUFFIXES)} files")
    kinds = {SUFFIXES.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise CorpusError(f"{path}: expected files of one kind among {sorted(SUFFIXES)}, got {sorted(p.suffix for p in files)}")
    return kinds.pop(), [str(p) for p in files]


def read_texts(dataset: str, *, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """Documents in a deterministic order."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(dataset).expanduser()
    try:
        if path.exists() or "://" in dataset:
            kind, files = _local_files(path) if path.exists() else (SUFFIXES.get(Path(dataset).suffix), [dataset])
            if kind is None:
                raise CorpusError(f"{dataset}: unknown file type (expected {sorted(SUFFIXES)})")
            extra = {"sample_by": "document"} if kind == "text" else {}
            ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=True, **extra)
        else:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
    except CorpusError:
        raise
    except Exception as e:  # not found, offline, bad split...
        raise CorpusError(f"cannot read dataset {dataset!r} (split {split!r}): {type(e).__name__}: {e}") from e
    first = True
    for row in ds:
        if first and text_column not in row:
            raise CorpusError(f"dataset {dataset!r} has no column {text_column!r}; columns: {sorted(row)}")
        first = False
        text = row[text_column]
        if isinstance(text, str) and text.strip():
            yield text


def token_windows(tokenizer, texts: Iterator[str], *, ctx_len: int, n_tokens: int, bos: bool = True,
                  filter_bos: bool = False, batch_docs: int = 64) -> np.ndarray:
    """[n_windows, ctx_len] int32 windows over the concatenated documents (EOS between documents).

    With `bos`, each window starts with the BOS token and holds ctx_len − 1 text tokens (the model sees the
    start-of-sequence it expects; position 0 carries no features). `filter_bos` drops BOS ids from the text
    stream first. Stops once `n_tokens` text tokens are windowed; the last partial window is dropped."""
    if ctx_len < 2:
        raise CorpusError(f"ctx_len must be at least 2, got {ctx_len}")
    bos_id = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), None)
    sep = tokenizer.eos_token_id
    body = ctx_len - 1 if bos and bos_id is not None else ctx_len
    need = -(-n_tokens // body) * body  # whole windows
    stream: list[np.ndarray] = []
    have = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal have
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            arr = np.asarray(ids + ([sep] if sep is not None else []), dtype=np.int32)
            if filter_bos and tokenizer.bos_token_id is not None:
                arr = arr[arr != tokenizer.bos_token_id]
            stream.append(arr)
            have += len(arr)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_docs:
            flush()
        if have >= need:
            break
    if batch and have < need:
        flush()
    flat = np.concatenate(stream) if stream else np.zeros(0, np.int32)
    n_windows = min(len(flat), need) // body
    if n_windows == 0:
        raise CorpusError(f"the corpus has {len(flat)} tokens: not enough for one window of {body}")
    windows = flat[: n_windows * body].reshape(n_windows, body)
    if body != ctx_len:
        windows = np.concatenate([np.full((n_windows, 1), bos_id, np.int32), windows], axis=1)
    return windows


def writable(out: str) -> None:
    """Fail early, naming the path, if `out` cannot be written."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    probe = f"{root.rstrip('/')}/.write-test-{os.getpid()}"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as e:
        raise CorpusError(f"output location {out!r} is not writable: {type(e).__name__}: {e}") from e
