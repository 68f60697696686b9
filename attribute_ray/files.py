"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer in the project goes through `atomic_path` (a temp name in the target's folder, then
``os.replace``), or `atomic_open` for fsspec URLs (a temp file in the target's folder, then a rename); on any
error the temp file or folder is removed and the target is untouched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a fresh temp path beside `path` (ending in `suffix`, e.g. ".npy" for writers that add one);
    write a file or a folder there; on success it replaces `path` (a folder replaces a folder: the old
    one is removed after the swap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically (mode 0644); returns `path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
    return Path(path)


@contextmanager
def atomic_open(url: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `url` (a local path or any fsspec URL) for writing; on success it is moved
    onto `url` (a rename within the folder), on error removed. Temp names end in ".tmp"."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    folder, _, name = path.rstrip("/").rpartition("/")
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise
