"""Resolve a model/transcoder reference to a local directory: a local path, or a Hugging Face repo.

References: ``/local/dir``, ``user/repo``, ``user/repo/sub/folder``, ``user/repo@revision``,
``hf://user/repo/sub/folder?revision=R``. Hub downloads go through ``huggingface_hub.snapshot_download``
with ``allow_patterns`` (only needed files) into the standard HF cache, which is also the offline route
(``HF_HUB_OFFLINE=1`` reads the cache only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from attribute_ray.errors import HubUnavailableError


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, ref: str, subfolder: str | None = None, revision: str | None = None) -> HubRef:
        if ref.startswith("hf://"):
            url = urlparse(ref)
            parts = (url.netloc + url.path).strip("/").split("/")
            rev = parse_qs(url.query).get("revision", [None])[0]
        else:
            path, _, rev = ref.partition("@")
            parts = path.strip("/").split("/")
            rev = rev or None
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"not a local path nor a hub reference 'user/repo[/subfolder][@rev]': {ref!r}")
        sub = "/".join(parts[2:]) or None
        if subfolder:
            sub = f"{sub}/{subfolder}" if sub else subfolder
        return cls("/".join(parts[:2]), sub, revision or rev)

    def __str__(self) -> str:
        s = self.repo_id + (f"//{self.subfolder}" if self.subfolder else "")
        return s + (f"@{self.revision}" if self.revision else "")


def is_local(ref: str | os.PathLike) -> bool:
    return Path(ref).expanduser().exists()


def resolve(
    ref: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Local directory holding `ref` (downloading the files matching `allow_patterns`, relative to the
    subfolder, when `ref` is a hub reference)."""
    if is_local(ref):
        path = Path(ref).expanduser()
        return path / subfolder if subfolder else path
    if str(ref).startswith(("/", "./", "../", "~")) or os.path.isabs(str(ref)):
        raise FileNotFoundError(f"local path does not exist: {ref}")
    hub = HubRef.parse(str(ref), subfolder, revision)
    patterns = allow_patterns or ["*"]
    if hub.subfolder:
        patterns = [f"{hub.subfolder}/{p}" for p in patterns]
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=patterns)
    except Exception as e:  # network errors, gated repos, offline mode without a cached copy
        raise HubUnavailableError(
            f"could not fetch {patterns} from Hugging Face repo {hub} ({type(e).__name__}: {e}). "
            "Check the network / HF_TOKEN, or pass a local directory."
        ) from e
    return Path(root) / hub.subfolder if hub.subfolder else Path(root)


def resolve_file(ref: str, base: Path | None = None) -> Path:
    """A single file: ``hf://user/repo/path/file?revision=R``, an absolute path, or a path relative to `base`."""
    if not ref.startswith("hf://"):
        path = Path(ref).expanduser()
        return path if path.is_absolute() or base is None else base / path
    hub = HubRef.parse(ref)
    if not hub.subfolder:
        raise ValueError(f"hf:// reference without a file path: {ref!r}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub.repo_id, hub.subfolder, revision=hub.revision))
    except Exception as e:
        raise HubUnavailableError(f"could not fetch {ref} ({type(e).__name__}: {e})") from e
