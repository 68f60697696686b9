"""The service's job table without Ray: one job per running graph key, bounded capacity, cancellation,
forgetting old jobs, the recent-graphs list and progress updates."""

import asyncio

import pytest

from deployments.failures import EngineBusy
from deployments.job_table import Job, JobTable, TableFull


class Gate:
    """Work that blocks until released, then returns `warnings`; records whether it was cancelled."""

    def __init__(self, warnings: list[str] | None = None):
        self.warnings = warnings or []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = False

    async def __call__(self, job: Job) -> list[str]:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return self.warnings


def returns(warnings: list[str] | None = None):
    """Work that finishes at once with `warnings`."""

    async def work(job: Job) -> list[str]:
        return warnings or []

    return work


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_a_running_key_is_computed_once() -> None:
    async def main() -> None:
        table = JobTable(capacity=4)
        gate, other = Gate(["a"]), Gate(["b"])
        first = table.submit("key-a", "prompt a", gate)
        again = table.submit("key-a", "prompt a", Gate(["never"]))
        third = table.submit("key-b", "prompt b", other)
        assert again is first and third is not first
        assert table.active() == 2 and table.get(first.id) is first
        assert first.view().model_dump() == {"job_id": first.id, "graph_id": None, "status": "queued",
                                             "progress": None, "error": None, "warnings": []}
        gate.release.set()
        await first.done.wait()
        assert first.status == "done" and first.warnings == ["a"]
        assert first.view().graph_id == "key-a"  # the graph id appears once the job is done
        # a finished key starts a new job (the ingress serves stored graphs before asking the table)
        later = table.submit("key-a", "prompt a", returns(["a2"]))
        assert later is not first
        await later.done.wait()
        assert later.warnings == ["a2"]
        other.release.set()
        await third.done.wait()

    run(main())


def test_capacity_refuses_new_keys_but_joins_running_ones() -> None:
    async def main() -> None:
        capacity = 3
        table = JobTable(capacity=capacity)
        gates = [Gate() for _ in range(capacity)]
        jobs = [table.submit(f"k{i}", "", g) for i, g in enumerate(gates)]
        with pytest.raises(TableFull, match=f"{capacity} graphs queued or running"):
            table.submit("one-too-many", "", Gate())
        assert table.submit("k1", "", Gate()) is jobs[1]  # joining a running key needs no room
        gates[0].release.set()
        await jobs[0].done.wait()
        assert table.active() == capacity - 1
        room = table.submit("one-too-many", "", Gate())  # a finished job made room
        assert table.active() == capacity
        for g in gates[1:]:
            g.release.set()
        await table.cancel(room)

    run(main())


def test_cancel_stops_the_work_and_finished_jobs_stay_as_they_are() -> None:
    async def main() -> None:
        table = JobTable(capacity=2)
        gate = Gate()
        job = table.submit("k", "", gate)
        await gate.started.wait()
        assert await table.cancel(job) is job
        assert gate.cancelled and job.done.is_set()
        assert job.view().model_dump() == {"job_id": job.id, "graph_id": None, "status": "cancelled",
                                           "progress": None, "error": None, "warnings": []}
        assert table.active() == 0
        done = table.submit("k2", "", returns(["graph"]))
        await done.done.wait()
        await table.cancel(done)
        assert done.status == "done" and done.warnings == ["graph"]
        early = table.submit("k3", "", Gate())
        await table.cancel(early)  # before its work ever started: still ends, as cancelled
        assert early.status == "cancelled" and early.done.is_set() and table.active() == 0

    run(main())


def test_failures_are_reported_and_engine_busy_is_marked() -> None:
    async def main() -> None:
        table = JobTable(capacity=2)

        async def boom(job: Job) -> bytes:
            raise ValueError("boom")

        async def busy(job: Job) -> bytes:
            raise EngineBusy("queue full")

        failed, refused = table.submit("a", "", boom), table.submit("b", "", busy)
        await failed.done.wait()
        await refused.done.wait()
        assert (failed.status, failed.http_status) == ("failed", 500)
        assert failed.error.startswith(f"graph job {failed.id} failed (error id ")  # the details only in the log
        assert "boom" not in failed.error and "ValueError" not in failed.error
        assert (refused.status, refused.error, refused.http_status) == ("failed", "EngineBusy: queue full", 503)
        assert table.recent_graphs(10) == []  # only finished graphs are remembered

    run(main())


def test_old_finished_jobs_are_forgotten_oldest_first() -> None:
    async def main() -> None:
        keep = 3
        table = JobTable(capacity=10, keep=keep)
        old = []
        for i in range(5):
            job = table.submit(f"k{i}", "", returns())
            await job.done.wait()
            old.append(job)
        running = table.submit("running", "", Gate())
        # forgetting happens at each submit: the table then holds the newest `keep` jobs, finished or not
        expected = [j.id for j in old][-(keep - 1):] + [running.id]
        assert list(table.jobs) == expected
        assert all(table.get(j.id) is None for j in old[: len(old) - (keep - 1)])
        assert set(table.by_key) == {j.key for j in old[-(keep - 1):]} | {"running"}
        # unfinished jobs are never forgotten, even beyond `keep`
        crowded = JobTable(capacity=10, keep=1)
        gates = [Gate() for _ in range(3)]
        jobs = [crowded.submit(f"g{i}", "", g) for i, g in enumerate(gates)]
        assert list(crowded.jobs) == [j.id for j in jobs]
        for g in gates:
            g.release.set()
        await table.cancel(running)

    run(main())


def test_recent_graphs_newest_first_once_each() -> None:
    async def main() -> None:
        table = JobTable(capacity=4, keep_recent=3)
        job = table.submit("k0", "the cat", returns())
        await job.done.wait()
        for key in ("k1", "k2", "k0", "k3"):
            table.remember(key, f"prompt {key}")
        # reference: move each remembered key to the end, keep the last 3, newest first
        order: list[str] = []
        for key in ("k0", "k1", "k2", "k0", "k3"):
            order = [k for k in order if k != key] + [key]
        want = order[-3:][::-1]
        assert [g["graph_id"] for g in table.recent_graphs(10)] == want == ["k3", "k0", "k2"]
        assert [g["graph_id"] for g in table.recent_graphs(2)] == want[:2]
        assert table.recent_graphs(10)[1]["prompt"] == "prompt k0"

    run(main())


def test_progress_updates_arrive_in_order_until_done() -> None:
    async def main() -> None:
        table = JobTable(capacity=1)
        total = 4
        seen_by_reader = [asyncio.Event() for _ in range(total)]

        async def work(job: Job) -> list[str]:
            for i in range(total):
                job.report({"phase": "features", "done": i + 1, "total": total})
                await seen_by_reader[i].wait()  # lock-step with the reader, so no report is skipped
            return []

        job = table.submit("k", "", work)
        received = []
        async for progress in job.updates():
            received.append(progress)
            if len(received) <= total:
                seen_by_reader[len(received) - 1].set()
        assert received == [{"phase": "features", "done": i + 1, "total": total} for i in range(total)]
        assert job.status == "done" and job.view().progress.done == total

    run(main())


def test_jobs_with_a_request_are_kept_in_the_store_for_a_new_table(tmp_path) -> None:
    from deployments.job_store import JobStore

    async def main() -> None:
        table = JobTable(capacity=4, store=JobStore(str(tmp_path / "jobs")))
        request = {"tokens": [1, 2, 3], "settings": {"batch_size": 8}, "targets": None}
        done = table.submit("k" * 32, "the cat", returns(["g"]), request=request)
        await done.done.wait()
        gate = Gate()
        running = table.submit("r" * 32, "the dog", gate, request=request)
        await gate.started.wait()
        running.report({"phase": "features", "done": 1, "total": 2})

        async def boom(job: Job) -> bytes:
            raise ValueError("boom")

        failed = table.submit("f" * 32, "", boom, request=request)
        await failed.done.wait()
        unsaved = table.submit("u" * 32, "", returns())  # no request: nothing to keep
        await unsaved.done.wait()

        later = JobTable(capacity=4, store=JobStore(str(tmp_path / "jobs")))  # a restarted ingress
        assert later.get(done.id) is None
        rec = later.recorded(done.id)
        assert (rec.job_id, rec.graph_id, rec.prompt, rec.status, rec.request) == (done.id, "k" * 32, "the cat", "done", request)
        restored = later.restore(rec)
        assert later.get(done.id) is restored and restored.done.is_set()
        assert restored.view().model_dump() == {"job_id": done.id, "graph_id": "k" * 32, "status": "done",
                                                "progress": None, "error": None, "warnings": ["g"]}
        assert later.recorded(running.id).status == "queued"  # unfinished (progress is not kept): run it again
        assert (later.recorded(failed.id).status, later.recorded(failed.id).error) == ("failed", failed.error)
        assert later.recorded(unsaved.id) is None
        assert later.recorded("../../etc/passwd") is None and later.recorded("0" * 32) is None
        again = later.submit(rec.graph_id, rec.prompt, returns(["g2"]), request=rec.request, job_id=running.id)
        assert again.id == running.id  # a resumed job keeps its id
        await again.done.wait()
        assert JobStore(str(tmp_path / "jobs")).load(running.id).status == "done"
        gate.release.set()
        await running.done.wait()

    run(main())


def test_job_store_keeps_the_newest_records(tmp_path) -> None:
    import os

    from deployments.job_store import JobRecord, JobStore

    store = JobStore(str(tmp_path), keep=2)
    ids = [f"{i:032x}" for i in range(4)]
    for n, job_id in enumerate(ids):
        store.save(JobRecord(job_id=job_id, graph_id="k" * 32, status="done", created=float(n)))
        os.utime(tmp_path / f"{job_id}.json", (1000 + n, 1000 + n))  # distinct write times, oldest first
    (tmp_path / "notes.json").write_text("{}")  # not a record: never deleted
    store.prune()
    assert [store.load(i) is not None for i in ids] == [False, False, True, True]
    assert (tmp_path / "notes.json").exists() and not list(tmp_path.glob("*.tmp"))


def test_finished_jobs_are_bounded_by_bytes_and_keep_no_graph() -> None:
    """Metadata only: a long prompt's job weighs its tokens, and the table forgets the oldest finished jobs once
    their metadata passes `keep_bytes`, however few they are; unfinished jobs are never forgotten."""

    async def main() -> None:
        request = {"tokens": list(range(2048)), "settings": {}, "targets": None}
        one = Job("k", "x" * 4000, request=request).footprint()
        assert one >= 40 * 2048 + 4 * 4000  # tokens and prompt, independently of how the table counts them
        table = JobTable(capacity=4, keep=1000, keep_bytes=5 * one)
        gate = Gate()
        running = table.submit("running", "x" * 4000, gate, request=request)
        for i in range(20):
            job = table.submit(f"k{i}", "x" * 4000, returns(), request=request)
            await job.done.wait()
        assert len(table.jobs) <= 5 + 1 and table.get(running.id) is running  # the bound, plus the newest
        assert sum(j.footprint() for j in table.jobs.values()) <= 6 * one
        assert not any(hasattr(j, "data") for j in table.jobs.values())
        assert all(len(g["prompt"]) <= 200 for g in table.recent_graphs(50))
        gate.release.set()
        await running.done.wait()

    run(main())
