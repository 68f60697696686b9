"""attribute_ray.client against an in-process fake of the Serve HTTP contract (httpx.MockTransport; no network)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from attribute_ray import ReplacementModel, attribute
from attribute_ray.client import AsyncClient, Client, Job, ServiceError
from attribute_ray.graph import Graph
from attribute_ray.tiny import tiny_model, transcoder_for

URL = "http://serve.test:8000"
TOKEN = "s3cret-token-xyz"


@pytest.fixture(scope="module")
def served() -> tuple[Graph, bytes]:
    model, tok = tiny_model("llama")
    g = attribute("the cat sat", ReplacementModel(model, tok, transcoder_for(model)))
    return g, g.to_msgpack()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record time.sleep calls instead of sleeping."""
    calls: list[float] = []
    monkeypatch.setattr("attribute_ray.client.time.sleep", calls.append)
    return calls


class FakeService:
    """Emulates the service contract; `script` lists canned responses (or exceptions) served before the real ones."""

    def __init__(self, blob: bytes, token: str | None = None):
        self.blob = blob
        self.token = token
        self.requests: list[httpx.Request] = []
        self.script: list[httpx.Response | Exception] = []
        self.jobs: dict[str, dict] = {}
        self.job_plan: dict[str, list[dict]] = {}  # job_id -> successive GET answers

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        path, method = request.url.path, request.method
        if path in ("/healthz", "/readyz"):
            return httpx.Response(200, json={"status": "ok"})
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"detail": "missing or invalid bearer token"})
        if path == "/v1/models" and method == "GET":
            return httpx.Response(200, json={"model": "tiny", "n_layers": 3, "limits": {}, "defaults": {}})
        if path == "/v1/graphs" and method == "POST":
            body = json.loads(request.content)
            if (body.get("prompt") is None) == (body.get("tokens") is None):
                return httpx.Response(422, json={"detail": [
                    {"loc": ["body"], "msg": "exactly one of prompt or tokens", "type": "value_error"}]})
            if request.url.params.get("wait") == "false":
                job = {"job_id": f"j{len(self.jobs)}", "graph_id": None, "status": "queued", "progress": None,
                       "error": None}
                self.jobs[job["job_id"]] = job
                return httpx.Response(202, json={k: job[k] for k in ("job_id", "graph_id", "status")})
            return self._graph(request)
        if path.startswith("/v1/jobs/"):
            job_id = path.rsplit("/", 1)[1]
            if job_id not in self.jobs:
                return httpx.Response(404, json={"detail": f"unknown job {job_id}"})
            if method == "DELETE":
                self.jobs[job_id]["status"] = "cancelled"
            elif self.job_plan.get(job_id):
                self.jobs[job_id].update(self.job_plan[job_id].pop(0))
            return httpx.Response(200, json=self.jobs[job_id])
        if path.startswith("/v1/graphs/") and method == "GET":
            if path.rsplit("/", 1)[1] != "g1":
                return httpx.Response(404, json={"detail": "unknown graph"})
            return self._graph(request)
        return httpx.Response(404, json={"detail": "Not Found"})

    def _graph(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Accept") == "application/msgpack":
            return httpx.Response(200, content=self.blob, headers={"Content-Type": "application/msgpack",
                                                                   "X-Graph-Id": "g1"})
        return httpx.Response(200, json={"metadata": {"slug": "g1"}, "nodes": [], "links": []})

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]


def make(served, token: str | None = None, server_token: str | None = None, **kw) -> tuple[Client, FakeService]:
    fake = FakeService(served[1], server_token)
    kw.setdefault("backoff", 0.0)
    return Client(URL, token, transport=httpx.MockTransport(fake), **kw), fake


def assert_same_graph(a: Graph, b: Graph) -> None:
    assert torch.equal(a.rows, b.rows)
    assert torch.equal(a.input_tokens, b.input_tokens)
    assert torch.equal(a.active_features, b.active_features)
    assert a.logit_targets == b.logit_targets and a.input_string == b.input_string


# ----- round trips and request shape ---------------------------------------------------------------
def test_graph_round_trip(served):
    client, fake = make(served)
    with client:
        g = client.graph("the cat sat")
    assert_same_graph(g, served[0])
    (req,) = fake.requests
    assert req.method == "POST" and req.url.path == "/v1/graphs" and req.url.params["wait"] == "true"
    assert req.headers["Accept"] == "application/msgpack"


def test_settings_sent_exactly(served):
    client, fake = make(served)
    client.graph("the cat sat")
    client.graph([1, 2, 3], max_n_logits=5, desired_logit_prob=0.9, max_feature_nodes=None, batch_size=8,
                 node_threshold=0.7, edge_threshold=0.95, targets=["a", "b"], slug="s")
    client.graph(torch.tensor([4, 5]), targets=[7])
    assert fake.bodies() == [
        {"prompt": "the cat sat", "tokens": None},
        {"prompt": None, "tokens": [1, 2, 3], "max_n_logits": 5, "desired_logit_prob": 0.9, "max_feature_nodes": None,
         "batch_size": 8, "node_threshold": 0.7, "edge_threshold": 0.95, "targets": ["a", "b"], "slug": "s"},
        {"prompt": None, "tokens": [4, 5], "targets": [7]},
    ]
    with pytest.raises(TypeError):
        client.graph("x", prompt="y")


def test_bearer_header(served):
    client, fake = make(served, token=TOKEN, server_token=TOKEN)
    client.graph("the cat sat")
    client.models()
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in fake.requests)
    anon, fake2 = make(served)
    anon.graph("the cat sat")
    assert "Authorization" not in fake2.requests[0].headers


def test_missing_token_is_401_not_retried(served, sleeps):
    client, fake = make(served, token=None, server_token=TOKEN)
    with pytest.raises(ServiceError) as ei:
        client.graph("the cat sat")
    assert ei.value.status_code == 401 and "bearer token" in ei.value.detail
    assert len(fake.requests) == 1 and sleeps == []


def test_graph_json_fetch_models_health(served):
    client, fake = make(served)
    assert client.graph_json("the cat sat")["metadata"]["slug"] == "g1"
    assert fake.requests[-1].headers["Accept"] == "application/json"
    assert_same_graph(client.fetch("g1"), served[0])
    assert client.fetch("g1", format="json")["metadata"]["slug"] == "g1"
    assert fake.requests[-1].url.path == "/v1/graphs/g1" and not fake.requests[-1].url.params
    client.fetch("g1", format="json", node_threshold=0.5, slug="cat")
    assert dict(fake.requests[-1].url.params) == {"node_threshold": "0.5", "slug": "cat"}
    with pytest.raises(ValueError):
        client.fetch("g1", format="xml")
    assert client.models()["n_layers"] == 3
    assert client.health() and client.health(ready=False)
    assert fake.requests[-2].url.path == "/readyz" and fake.requests[-1].url.path == "/healthz"


def test_health_false_without_retry(served, sleeps):
    client, fake = make(served)
    fake.script = [httpx.Response(503, headers={"Retry-After": "5"}, json={"detail": "not ready"})]
    assert client.health() is False
    fake.script = [httpx.ConnectError("refused")]
    assert client.health() is False
    assert sleeps == [] and len(fake.requests) == 2


# ----- retry policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_honoured(served, sleeps, status):
    client, fake = make(served, backoff=10.0)
    busy = lambda s: httpx.Response(status, headers={"Retry-After": s}, json={"detail": "queue full"})  # noqa: E731
    fake.script = [busy("0"), busy("0")]
    assert_same_graph(client.graph("the cat sat"), served[0])
    assert len(fake.requests) == 3
    assert sleeps == [0.0, 0.0]  # the header, not backoff=10
    fake.script = [busy("2")]
    client.graph("the cat sat")
    assert 2.0 <= sleeps[-1] <= 2.2  # Retry-After plus at most 10% jitter


@pytest.mark.parametrize("status", [503, 429])
def test_retry_exhausted(served, sleeps, status):
    client, fake = make(served, retries=3, backoff=0.5, max_backoff=1.5)
    fake.script = [httpx.Response(status, json={"detail": "queue full"})] * 10
    with pytest.raises(ServiceError) as ei:
        client.graph("the cat sat")
    assert ei.value.status_code == status and "queue full" in str(ei.value) and str(status) in str(ei.value)
    assert len(fake.requests) == 4  # retries + 1
    # no Retry-After: exponential backoff 0.5, 1.0, then capped at 1.5, each plus <= 10% jitter
    assert len(sleeps) == 3
    assert all(b <= s <= b * 1.1 for s, b in zip(sleeps, [0.5, 1.0, 1.5]))


def test_unparseable_retry_after_falls_back_to_backoff(served, sleeps):
    client, fake = make(served, backoff=0.25)
    fake.script = [httpx.Response(503, headers={"Retry-After": "soon"}), httpx.Response(503, headers={
        "Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})]  # an HTTP-date in the past -> 0
    client.graph("the cat sat")
    assert 0.25 <= sleeps[0] <= 0.275 and sleeps[1] == 0.0


def test_transport_error_retried(served, sleeps):
    client, fake = make(served, backoff=0.1)
    fake.script = [httpx.ConnectError("connection refused"), httpx.ReadTimeout("timed out")]
    assert_same_graph(client.graph("the cat sat"), served[0])
    assert len(fake.requests) == 3 and len(sleeps) == 2 and 0.1 <= sleeps[0] <= 0.11 and 0.2 <= sleeps[1] <= 0.22


def test_transport_error_exhausted(served, sleeps):
    client, fake = make(served, token=TOKEN, retries=2)
    fake.script = [httpx.ConnectError(f"refused {TOKEN}")] * 5  # even an echoed token is scrubbed
    with pytest.raises(ServiceError) as ei:
        client.models()
    assert ei.value.status_code is None and "ConnectError" in str(ei.value)
    assert isinstance(ei.value.__cause__, httpx.ConnectError)
    assert len(fake.requests) == 3 and TOKEN not in str(ei.value)


@pytest.mark.parametrize("status,detail,text", [
    (400, "prompt is empty", "prompt is empty"),
    (404, "unknown graph", "unknown graph"),
    (413, "body too large", "body too large"),
    (500, "boom", "boom"),
    (422, [{"loc": ["body", "max_n_logits"], "msg": "Input should be greater than 0", "type": "greater_than"},
           {"loc": ["body", "slug"], "msg": "String should have at most 64 characters", "type": "string_too_long"}],
     "body.max_n_logits: Input should be greater than 0; body.slug: String should have at most 64 characters"),
])
def test_errors_not_retried(served, sleeps, status, detail, text):
    client, fake = make(served)
    fake.script = [httpx.Response(status, json={"detail": detail})] * 3
    with pytest.raises(ServiceError) as ei:
        client.graph("the cat sat")
    assert ei.value.status_code == status and ei.value.detail == text
    assert text in str(ei.value) and str(status) in str(ei.value)
    assert len(fake.requests) == 1 and sleeps == []


def test_non_json_error_body(served, sleeps):
    """A 5xx that is not the service's JSON (a proxy's or gateway's own error) is retried like a lost connection,
    then reported with its text; the service's own 500s are not retried (test_errors_not_retried)."""
    client, fake = make(served, retries=2)
    fake.script = [httpx.Response(502, text="<html>bad gateway</html>")] * 3
    with pytest.raises(ServiceError, match="bad gateway") as ei:
        client.models()
    assert ei.value.status_code == 502 and len(fake.requests) == 3 and len(sleeps) == 2
    fake.script = [httpx.Response(500, text="Internal Server Error")]  # then the service answers
    assert client.models()["n_layers"] > 0


def test_unknown_ids_404(served):
    client, _ = make(served)
    for call in (lambda: client.job("nope"), lambda: client.cancel("nope"), lambda: client.fetch("nope")):
        with pytest.raises(ServiceError) as ei:
            call()
        assert ei.value.status_code == 404


# ----- jobs -----------------------------------------------------------------------------------------
def _plan(fake: FakeService, job_id: str, total: int = 4) -> None:
    fake.job_plan[job_id] = [
        {"status": "running", "progress": {"phase": "trace", "done": i, "total": total}} for i in range(1, total)
    ] + [{"status": "done", "progress": {"phase": "trace", "done": total, "total": total}, "graph_id": "g1"}]


def test_submit_wait_progress_callback(served, sleeps):
    client, fake = make(served)
    job = client.submit("the cat sat", max_n_logits=3)
    assert job == Job("j0", None, "queued", None, None) and not job.finished
    assert fake.requests[0].url.params["wait"] == "false" and fake.bodies()[0]["max_n_logits"] == 3
    _plan(fake, "j0")
    seen: list[Job] = []
    g = client.wait(job, progress=seen.append, poll=0.05)
    assert_same_graph(g, served[0])
    done = [j.progress["done"] for j in seen if j.progress]
    assert done == [1, 2, 3, 4] and seen[0].status == "queued" and seen[-1].status == "done"
    assert sleeps == [0.05] * 4
    last = fake.requests[-1]
    assert last.url.path == "/v1/graphs/g1" and last.headers["Accept"] == "application/msgpack"


def test_wait_tqdm_bar_and_job_id_string(served, sleeps, capsys):
    client, fake = make(served)
    job = client.submit("the cat sat")
    _plan(fake, job.job_id)
    assert_same_graph(client.wait(job.job_id, progress=True), served[0])
    assert "trace" in capsys.readouterr().err


def test_wait_already_done(served, sleeps):
    client, fake = make(served)
    assert_same_graph(client.wait(Job("j9", "g1", "done")), served[0])
    assert [r.url.path for r in fake.requests] == ["/v1/graphs/g1"] and sleeps == []


def test_wait_failed_job(served, sleeps):
    client, fake = make(served)
    job = client.submit("the cat sat")
    fake.job_plan[job.job_id] = [{"status": "running"}, {"status": "failed", "error": "CUDA out of memory"}]
    with pytest.raises(ServiceError, match="CUDA out of memory") as ei:
        client.wait(job)
    assert job.job_id in str(ei.value)


def test_wait_timeout(served):
    client, fake = make(served)
    job = client.submit("the cat sat")  # stays queued forever
    with pytest.raises(TimeoutError, match=job.job_id):
        client.wait(job, poll=0.01, timeout=0.05)
    assert len(fake.requests) >= 3


def test_cancel(served, sleeps):
    client, fake = make(served)
    job = client.submit("the cat sat")
    cancelled = client.cancel(job.job_id)
    assert cancelled.status == "cancelled" and cancelled.job_id == job.job_id and cancelled.finished
    assert fake.requests[-1].method == "DELETE" and fake.requests[-1].url.path == f"/v1/jobs/{job.job_id}"
    assert client.job(job.job_id).status == "cancelled"
    with pytest.raises(ServiceError, match="cancelled"):
        client.wait(job)


def test_wait_true_answered_202_falls_back_to_polling(served, sleeps):
    client, fake = make(served)
    fake.jobs["j5"] = {"job_id": "j5", "graph_id": None, "status": "queued", "progress": None, "error": None}
    _plan(fake, "j5", total=2)
    fake.script = [httpx.Response(202, json={"job_id": "j5", "graph_id": None, "status": "queued"})]
    assert_same_graph(client.graph("the cat sat"), served[0])
    fake.jobs["j5"]["status"] = "queued"
    _plan(fake, "j5", total=2)
    fake.script = [httpx.Response(202, json={"job_id": "j5", "graph_id": None, "status": "queued"})]
    assert client.graph_json("the cat sat", slug="cat", batch_size=4)["nodes"] == []
    assert dict(fake.requests[-1].url.params) == {"slug": "cat"}
    assert fake.requests[-1].headers["Accept"] == "application/json"


# ----- secrets, base url, async ---------------------------------------------------------------------
def test_token_never_leaks(served, sleeps):
    client, fake = make(served, token=TOKEN, retries=1)
    assert repr(client) == f"Client(url={URL!r})" and TOKEN not in repr(client) and TOKEN not in str(client)
    fake.script = [httpx.Response(401, json={"detail": f"bad token {TOKEN}"})]
    with pytest.raises(ServiceError) as ei:
        client.graph("the cat sat")
    assert TOKEN not in str(ei.value) and TOKEN not in repr(ei.value) and TOKEN not in ei.value.detail
    fake.script = [httpx.Response(503, json={"detail": "full"})] * 2
    with pytest.raises(ServiceError) as ei:
        client.graph("the cat sat")
    assert TOKEN not in str(ei.value)


def test_base_url_with_prefix(served):
    fake = FakeService(served[1])
    seen = []
    def strip_prefix(r: httpx.Request) -> httpx.Response:
        seen.append(r.url.path)
        return fake(httpx.Request(r.method, str(r.url).replace("/attr", ""), headers=r.headers, content=r.content))

    client = Client(URL + "/attr/", transport=httpx.MockTransport(strip_prefix))
    client.models()
    assert seen == ["/attr/v1/models"] and repr(client) == f"Client(url={URL + '/attr'!r})"


def test_async_client(served, monkeypatch):
    fake = FakeService(served[1], TOKEN)

    async def no_sleep(s):
        return None

    monkeypatch.setattr("attribute_ray.client.asyncio.sleep", no_sleep)

    async def main():
        async with AsyncClient(URL, TOKEN, backoff=0.0, transport=httpx.MockTransport(fake)) as c:
            fake.script = [httpx.Response(503, headers={"Retry-After": "0"}), httpx.ConnectError("refused")]
            g = await c.graph("the cat sat", slug="x")
            job = await c.submit("the cat sat")
            _plan(fake, job.job_id)
            seen = []
            g2 = await c.wait(job, progress=seen.append)
            with pytest.raises(ServiceError) as ei:
                await c.job("nope")
            return g, g2, seen, ei.value, await c.models(), await c.health(), repr(c)

    g, g2, seen, err, models, ok, r = asyncio.run(main())
    assert_same_graph(g, served[0])
    assert_same_graph(g2, served[0])
    assert seen[-1].status == "done" and err.status_code == 404 and models["model"] == "tiny" and ok
    assert r == f"AsyncClient(url={URL!r})"


# ----- the default retry budget is time, not a count ---------------------------------------------------
def test_default_retries_outlast_a_long_busy_spell(served, sleeps):
    client, fake = make(served)  # default retries: None, retry_deadline 600 s
    assert client.retries is None and client.retry_deadline == 600.0
    fake.script = [httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "queue full"})] * 60
    assert_same_graph(client.graph("the cat sat"), served[0])  # 60 refusals (~2 minutes of waiting): still arrives
    assert len(fake.requests) == 61 and len(sleeps) == 60 and all(2.0 <= s <= 2.2 for s in sleeps)


def test_retry_deadline_ends_the_wait(served, sleeps):
    client, fake = make(served, retry_deadline=5.0)
    fake.script = [httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "queue full"})] * 10
    with pytest.raises(ServiceError) as ei:
        client.graph("the cat sat")
    assert ei.value.status_code == 503 and "queue full" in ei.value.detail
    # sleeps of Retry-After (+ jitter) until 5 s are spent; the last one is cut to what is left
    assert sum(sleeps) == pytest.approx(5.0) and len(sleeps) == 3 and len(fake.requests) == 4
    client, fake = make(served, retry_deadline=5.0, backoff=1.0)
    fake.script = [httpx.ConnectError("refused")] * 100
    sleeps.clear()
    with pytest.raises(ServiceError, match="ConnectError"):
        client.models()  # backoff 1, 2, then the 2 s left
    assert len(fake.requests) == 4
    assert sum(sleeps) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        Client(URL, retry_deadline=0)
    with pytest.raises(ValueError):
        Client(URL, retries=-1)
