"""The ingress's table of graph jobs: plain asyncio, no Ray, no HTTP.

- A job is found by its id (`/v1/jobs/{id}`) and by the graph key it computes: while a key's job is queued or
  running, a repeated request joins it instead of starting another.
- At most `capacity` jobs are queued or running; `submit` beyond that raises `TableFull` (the ingress answers
  503 + Retry-After).
- A job runs its `work` coroutine in a task; `work` reports progress through `Job.report`, stores the graph
  itself and returns the job's warnings (e.g. "trimmed to fit the memory budget"). Cancelling the task
  (`cancel`) cancels the work; any other exception fails the job with an HTTP status: `EngineBusy` 503 (the
  engine queue was full), `Refused` 413 (over the memory budget), anything else 500.
- The table holds job metadata only, never graph bytes (those live in the graph store). Finished jobs beyond
  the newest `keep`, or beyond `keep_bytes` of metadata, are forgotten, oldest first; `recent_graphs` lists the
  graphs this table computed or was told about (`remember`), newest first.
- With a `JobStore`, a job submitted with its `request` (what the work computes) is written there when it is
  submitted and when it ends, so a new table (a restarted ingress) can `restore` it or run it again.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from attribute_ray.api import JobStatus, JobView
from deployments.failures import EngineBusy, InternalError, Refused, public_failure
from deployments.job_store import JobRecord, JobStore

log = logging.getLogger("ray.serve")
PROMPT_SHOWN = 200  # characters of a prompt the recent-graphs list keeps


class TableFull(Exception):
    """`capacity` jobs are already queued or running."""


class Job:
    """One graph computation: its status, latest progress, error and warnings."""

    def __init__(self, key: str, prompt: str = "", job_id: str | None = None, request: dict | None = None):
        self.id = job_id or uuid.uuid4().hex
        self.request = request  # what the work computes ({tokens, settings, targets}), kept in the JobStore
        self.key = key
        self.prompt = prompt
        self.status: JobStatus = "queued"
        self.progress: dict | None = None  # {"phase", "done", "total"} of the latest report
        self.error: str | None = None
        self.http_status = 500  # of a failure: 503 EngineBusy, 413 Refused, else 500
        self.warnings: list[str] = []  # what the finished graph lacks (e.g. trimmed to fit the memory budget)
        self.done = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.created = time.time()
        self._changed = asyncio.Event()  # set (and replaced) at every change

    def view(self) -> JobView:
        return JobView(job_id=self.id, graph_id=self.key if self.status == "done" else None, status=self.status,
                       progress=self.progress, error=self.error, warnings=self.warnings)

    def footprint(self) -> int:
        """Bytes this job's metadata holds, roughly (its prompt text and request: tokens dominate)."""
        tokens = len((self.request or {}).get("tokens") or [])
        return 2048 + 4 * len(self.prompt) + 40 * tokens + sum(4 * len(w) for w in self.warnings)

    def report(self, progress: dict) -> None:
        """Called by the work: the job is running and has got this far."""
        self.status, self.progress = "running", progress
        self._notify()

    async def updates(self) -> AsyncIterator[dict]:
        """Each new progress report (a report may be skipped when several arrive between two reads), until done."""
        last = None
        while True:
            changed = self._changed  # taken before looking, so a change after the look still wakes us
            if self.progress is not None and self.progress != last:
                last = dict(self.progress)
                yield last
            if self.done.is_set():
                return
            await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class JobTable:
    def __init__(self, capacity: int, keep: int = 1000, keep_recent: int = 500, store: JobStore | None = None,
                 keep_bytes: int = 64 * 2**20):
        self.capacity = capacity  # jobs queued or running at once
        self.keep = keep  # jobs remembered (finished ones are forgotten beyond it)
        self.keep_bytes = keep_bytes  # metadata bytes of the jobs remembered (`Job.footprint`)
        self.keep_recent = keep_recent  # entries of `recent_graphs`
        self.jobs: dict[str, Job] = {}
        self.by_key: dict[str, Job] = {}
        self.recent: list[dict] = []  # {"graph_id", "prompt", "created"}, oldest first
        self.store = store  # where jobs submitted with a request are kept for a later table

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def active(self) -> int:
        """Jobs queued or running."""
        return sum(not j.done.is_set() for j in self.by_key.values())

    def submit(self, key: str, prompt: str, work: Callable[[Job], Awaitable[bytes]], request: dict | None = None,
               job_id: str | None = None) -> Job:
        """The unfinished job for `key`, or a new one running `work(job)`; TableFull at capacity. With `request`
        (JSON-able: what `work` computes) the job is saved in the store; `job_id` reuses a stored job's id."""
        job = self.by_key.get(key)
        if job is not None and not job.done.is_set():
            return job
        active = self.active()
        if active >= self.capacity:
            raise TableFull(f"{active} graphs queued or running; retry later")
        job = Job(key, prompt, job_id, request)
        self.jobs[job.id] = self.by_key[key] = job
        self._save(job)
        job.task = asyncio.get_running_loop().create_task(work(job))
        # A callback, not a wrapper coroutine: it also runs for a task cancelled before it ever started.
        job.task.add_done_callback(lambda task: self._finish(job, task))
        self._forget_old_jobs()
        return job

    async def cancel(self, job: Job) -> Job:
        """Cancel the job's work (nothing happens to a finished job) and wait until it has stopped."""
        if not job.done.is_set() and job.task is not None:
            job.task.cancel()
            await job.done.wait()
        return job

    def recorded(self, job_id: str) -> JobRecord | None:
        """The stored record of a job this table does not hold (e.g. one of a previous ingress); blocking I/O."""
        return self.store.load(job_id) if self.store else None

    def restore(self, record: JobRecord) -> Job:
        """A finished stored job as a Job of this table (its graph bytes stay in the graph store)."""
        job = Job(record.graph_id, record.prompt, record.job_id, record.request)
        job.status, job.error, job.http_status, job.created = record.status, record.error, record.http_status, record.created
        job.warnings = list(record.warnings)
        job.done.set()
        self.jobs[job.id] = job
        return job

    def remember(self, key: str, prompt: str) -> None:
        """Put graph `key` at the head of `recent_graphs` (once)."""
        recent = [g for g in self.recent if g["graph_id"] != key]
        recent.append({"graph_id": key, "prompt": prompt[:PROMPT_SHOWN], "created": time.time()})
        self.recent = recent[-self.keep_recent:]

    def recent_graphs(self, limit: int) -> list[dict]:
        """The `limit` most recently remembered graphs, newest first."""
        return self.recent[-limit:][::-1]

    def _finish(self, job: Job, task: asyncio.Task) -> None:
        if task.cancelled():
            job.status = "cancelled"
        elif (e := task.exception()) is not None:
            job.http_status = 503 if isinstance(e, EngineBusy) else 413 if isinstance(e, Refused) else 500
            if not isinstance(e, (EngineBusy, Refused, InternalError)):  # its text may hold paths or Ray internals
                e = public_failure(f"graph job {job.id}", e)
            job.status, job.error = "failed", f"{type(e).__name__}: {e}" if isinstance(e, EngineBusy) else str(e)
            log.warning("graph job %s failed: %s", job.id, job.error)
        else:
            job.warnings, job.status = list(task.result() or []), "done"
            self.remember(job.key, job.prompt)
        self._save(job)
        job.done.set()
        job._notify()

    def _save(self, job: Job) -> None:
        if self.store is None or job.request is None:
            return
        status = "queued" if job.status == "running" else job.status  # progress is not kept; either means "rerun"
        try:
            self.store.save(JobRecord(job_id=job.id, graph_id=job.key, prompt=job.prompt, status=status,
                                      error=job.error, http_status=job.http_status, warnings=job.warnings,
                                      created=job.created, request=job.request))
        except OSError as e:  # the job still runs; only a restarted ingress would not find it
            log.warning("graph job %s not saved: %s", job.id, e)

    def _forget_old_jobs(self) -> None:
        """Forget the oldest finished jobs while more than `keep` jobs or `keep_bytes` of metadata are held."""
        held = sum(j.footprint() for j in self.jobs.values())
        for job in sorted((j for j in self.jobs.values() if j.done.is_set()), key=lambda j: j.created):
            if len(self.jobs) <= self.keep and held <= self.keep_bytes:
                break
            held -= job.footprint()
            self.jobs.pop(job.id, None)
            if self.by_key.get(job.key) is job:
                self.by_key.pop(job.key)
