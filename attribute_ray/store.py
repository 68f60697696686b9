"""Content-addressed graph store: msgpack graphs under a local directory or any fsspec URI (s3://, gs://...).

The key hashes everything that determines a graph (model, transcoder, prompt tokens, attribution settings),
so a repeated request is a lookup. The store is bounded in bytes; the least recently used graphs go first
(on object stores, where a read cannot refresh the timestamp, that degrades to oldest-written first).
Temporary files of writes in progress count against the bound; those of writes that died (older than
`stale_tmp_s`) are removed when the store opens and whenever it evicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import fsspec

from attribute_ray.files import atomic_open

KEY_RE = re.compile(r"^[0-9a-f]{32}$")
STALE_TMP_S = 300.0  # no graph write takes this long; a younger temp file may belong to a live writer


def graph_key(model_id: str, transcoder_id: str, tokens: list[int], settings: dict) -> str:
    blob = json.dumps({"model": model_id, "transcoder": transcoder_id, "tokens": tokens, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class GraphStore:
    def __init__(self, uri: str, max_bytes: int = 2 * 2**30, stale_tmp_s: float = STALE_TMP_S):
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.fs.makedirs(self.root, exist_ok=True)
        self.max_bytes = max_bytes
        self.stale_tmp_s = stale_tmp_s
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.evict()  # leftovers of writes killed midway, and a bound lowered since the last run

    def _path(self, key: str) -> str:
        if not KEY_RE.match(key):
            raise KeyError(f"not a graph id: {key!r}")
        return f"{self.root.rstrip('/')}/{key}.msgpack"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        if self.local:
            os.utime(path)  # a read makes it recently used
        return data

    def open(self, key: str) -> IO[bytes] | None:
        """The stored graph as an open binary file (for streaming it out), or None when absent."""
        path = self._path(key)
        try:
            f = self.fs.open(path, "rb")
        except FileNotFoundError:
            return None
        if self.local:
            os.utime(path)
        return f

    def local_path(self, key: str) -> str | None:
        """The graph's path on this machine's file system (None on object stores)."""
        return self._path(key) if self.local else None

    def __contains__(self, key: str) -> bool:
        return KEY_RE.match(key) is not None and self.fs.exists(self._path(key))

    def put(self, key: str, data: bytes) -> None:
        """Write atomically (temporary name, then rename): a graph is complete or absent."""
        with self.writer(key) as f:
            f.write(data)

    @contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        """A file to write graph `key` into piece by piece; it appears whole when the block ends without error
        (nothing appears otherwise)."""
        with atomic_open(self.fs.unstrip_protocol(self._path(key))) as f:
            yield f
        self.evict(keep=key)

    def evict(self, keep: str | None = None) -> None:
        """Remove stale temporary files, then the least recently used graphs (never `keep`) until the store's
        files, temporary ones included, fit in `max_bytes`."""
        now = time.time()
        entries = []
        for e in self.fs.ls(self.root, detail=True):
            name = e["name"].rsplit("/", 1)[-1]
            if name.endswith(".tmp") and now - entry_mtime(e) > self.stale_tmp_s:
                self._remove(e["name"])
            elif name.endswith((".msgpack", ".tmp")):
                entries.append(e)
        total = sum(e["size"] for e in entries)
        for e in sorted((e for e in entries if e["name"].endswith(".msgpack")), key=entry_mtime):
            if total <= self.max_bytes:
                break
            if keep and e["name"].endswith(f"{keep}.msgpack"):
                continue
            self._remove(e["name"])
            total -= e["size"]

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:  # another replica's eviction or rename got there first
            pass


def entry_mtime(entry: dict) -> float:
    """An `fs.ls` entry's modification time in seconds since the epoch (file systems and object stores differ)."""
    t = entry.get("mtime") or entry.get("LastModified") or entry.get("created") or 0
    return float(t.timestamp() if hasattr(t, "timestamp") else t)
