"""Content-addressed graph store: msgpack graphs under a local directory or any fsspec URI (s3://, gs://...).

The key hashes everything that determines a graph (model, transcoder, prompt tokens, attribution settings),
so a repeated request is a lookup. The store is bounded in bytes; the least recently used graphs go first
(on object stores, where a read cannot refresh the timestamp, that degrades to oldest-written first).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import fsspec

from attribute_ray.files import atomic_open

KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def graph_key(model_id: str, transcoder_id: str, tokens: list[int], settings: dict) -> str:
    blob = json.dumps({"model": model_id, "transcoder": transcoder_id, "tokens": tokens, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class GraphStore:
    def __init__(self, uri: str, max_bytes: int = 2 * 2**30):
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.fs.makedirs(self.root, exist_ok=True)
        self.max_bytes = max_bytes
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

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

    def __contains__(self, key: str) -> bool:
        return KEY_RE.match(key) is not None and self.fs.exists(self._path(key))

    def put(self, key: str, data: bytes) -> None:
        """Write atomically (temporary name, then rename): a graph is complete or absent."""
        with atomic_open(self.fs.unstrip_protocol(self._path(key))) as f:
            f.write(data)
        self.evict(keep=key)

    def evict(self, keep: str | None = None) -> None:
        entries = [e for e in self.fs.ls(self.root, detail=True) if e["name"].endswith(".msgpack")]
        total = sum(e["size"] for e in entries)
        mtime = lambda e: e.get("mtime") or e.get("LastModified") or e.get("created") or 0  # noqa: E731
        for e in sorted(entries, key=lambda e: float(mtime(e).timestamp() if hasattr(mtime(e), "timestamp") else mtime(e))):
            if total <= self.max_bytes:
                break
            if keep and e["name"].endswith(f"{keep}.msgpack"):
                continue
            self.fs.rm_file(e["name"])
            total -= e["size"]
