"""Graph jobs kept where a new ingress finds them: one small JSON file per job (`<folder>/<job id>.json`), under
a local folder or any fsspec URI, written atomically (`attribute_ray.files.atomic_open`). No Ray, no HTTP.

A record holds what the job computes (prompt tokens, attribution settings, targets), so an ingress that
restarted can finish a job its predecessor left queued or running; the work is content-addressed, so running it
again is safe. At most `keep` records are kept; the oldest (by write time) are deleted first.
"""

import json
import re

import fsspec
from pydantic import BaseModel, Field, ValidationError

from attribute_ray.api import JobStatus
from attribute_ray.files import atomic_open
from attribute_ray.store import entry_mtime

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class JobRecord(BaseModel):
    """One job as persisted: its state and what it computes."""

    job_id: str = Field(description="the job's id (32 hex digits)")
    graph_id: str = Field(description="the content key of the graph it computes")
    prompt: str = Field("", description="the prompt text, for the recent-graphs list")
    status: JobStatus = Field(description="queued, running, done, failed or cancelled, as last written")
    error: str | None = Field(None, description="why it failed (the public message)")
    http_status: int = Field(500, description="of a failure: 503 engine busy, 413 over the memory budget, else 500")
    warnings: list[str] = Field(default_factory=list, description="what the finished graph lacks (e.g. trimmed)")
    created: float = Field(description="creation time, seconds since the epoch")
    request: dict = Field(default_factory=dict, description="what the work computes: {tokens, settings, targets}")


class JobStore:
    def __init__(self, uri: str, keep: int = 1000):
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.keep = keep  # records kept (the oldest are deleted beyond it)
        self._writes = 0

    def _path(self, job_id: str) -> str:
        return f"{self.root}/{job_id}.json"

    def save(self, record: JobRecord) -> None:
        """Write (replace) the record atomically; every 100 writes, delete the oldest beyond `keep`."""
        with atomic_open(self.fs.unstrip_protocol(self._path(record.job_id)), "w") as f:
            f.write(record.model_dump_json())
        self._writes += 1
        if self._writes % 100 == 0:
            self.prune()

    def load(self, job_id: str) -> JobRecord | None:
        """The record of `job_id`; None when there is none (or it is unreadable: a job we cannot resume is lost)."""
        if not JOB_ID_RE.match(job_id):
            return None
        try:
            return JobRecord.model_validate(json.loads(self.fs.cat_file(self._path(job_id))))
        except (FileNotFoundError, ValueError, ValidationError):
            return None

    def prune(self) -> None:
        """Delete the oldest records beyond `keep` (and nothing else in the folder)."""
        name = lambda e: e["name"].rsplit("/", 1)[-1]  # noqa: E731
        entries = [e for e in self.fs.ls(self.root, detail=True) if name(e).endswith(".json") and JOB_ID_RE.match(name(e)[:-5])]
        for e in sorted(entries, key=entry_mtime)[: max(0, len(entries) - self.keep)]:
            self.fs.rm_file(e["name"])
