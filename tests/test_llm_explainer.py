"""The `llm` explainer: prompts and parsing, retries against an httpx MockTransport, and the real thing against
`deployments/chat.py` serving a tiny chat model (its own Ray, started as ``python -m deployments.chat``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from attribute_ray.explanations.llm import (
    EndpointError,
    LLMExplainer,
    chat_prompt_ids,
    detection_score,
    explanation_messages,
    format_example,
    local_chat,
    openai_chat,
    parse_explanation,
    parse_yes_no,
)
from attribute_ray.explanations.records import Example, FeatureRecord
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(300)

NAME = "tiny-chat"
TEMPLATE = ("{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' <eos> ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}")


def ex(text: str, fires: str = "") -> Example:
    """An example of space-separated words; the feature fires (activation 1.0, 2.0 on `fires`) on the marked words."""
    words = text.split()
    return Example([(" " if i else "") + w for i, w in enumerate(words)],
                   [2.0 if w == fires else 1.0 if w.isupper() else 0.0 for w in words])


def record() -> FeatureRecord:
    train = [ex("the capital of france is paris", "paris"), ex("paris is a big city", "paris"), ex("we sat in paris", "paris")]
    held = [ex("the river of paris", "paris"), ex("paris has a red dog", "paris"), ex("one two paris", "paris")]
    neg = [ex("the cat sat on the dog"), ex("blue green red"), ex("he ran over the game"), ex("the team score")]
    return FeatureRecord(2, 7, train, held, neg, [" France", " French"], [" dog"])


# ----- prompts and parsing ------------------------------------------------------------------------------------


def test_examples_are_marked_and_explanations_parsed() -> None:
    e = Example(["The", " capital", " of", " New", " York", " is", " big"], [0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 3.0])
    assert format_example(e) == "The capital of <<New York>> is <<big>>"
    assert format_example(e, mark=False) == "The capital of New York is big"
    msgs = explanation_messages(record(), n_examples=2)
    assert [m["role"] for m in msgs] == ["system", "user"] and "<<like this>>" in msgs[0]["content"]
    assert msgs[1]["content"].splitlines() == ["Example 1: the capital of france is <<paris>>",
                                               "Example 2: <<paris>> is a big city",
                                               "Tokens the feature promotes: 'France', 'French'", "Explanation:"]
    assert parse_explanation("Let me think.\n**Explanation:** \"the city of Paris\"\nmore") == "the city of Paris"
    assert parse_explanation("\n  mentions of <<Paris>>  \n") == "mentions of Paris"
    assert parse_explanation("Example 1: the <<cat>>\n<<<<<<\nExplanation: <<cats>>, dogs") == "cats, dogs"
    assert parse_explanation("Example 1: the <<cat>>\n<<<<<<") == parse_explanation("") == ""
    e = Example(["a", "\n\n", "  b"], [0.0, 0.0, 1.0])
    assert explanation_messages(FeatureRecord(0, 0, [e], [], [], [], []))[1]["content"] == "Example 1: a <<b>>\nExplanation:"
    assert [parse_yes_no(r) for r in ("Yes.", " no", "The answer is YES", "Nope", "false", "")] == [
        True, False, True, None, False, None]


def test_detection_score_is_balanced_accuracy() -> None:
    rec, seen = record(), []

    def says_yes_on(words: set[str]):
        def chat(messages: list[dict]) -> str:
            text = messages[-1]["content"].split("Text: ")[1].split("\n")[0]
            assert "Explanation: Paris\n" in messages[-1]["content"] and "<<" not in text  # examples unmarked
            seen.append(text)
            return "Yes" if set(text.split()) & words else "No, it does not."
        return chat

    assert detection_score(says_yes_on({"paris"}), rec, "Paris") == 1.0
    order = list(seen)
    assert sorted(order) == sorted(format_example(e, mark=False) for e in rec.held_out + rec.negatives)
    seen.clear()
    assert detection_score(says_yes_on({"paris"}), rec, "Paris") == 1.0 and seen == order  # deterministic order
    assert detection_score(lambda m: "yes", rec, "Paris") == 0.5  # always yes: TPR 1, TNR 0
    assert detection_score(lambda m: "I cannot tell", rec, "Paris") == 0.5  # no answer counts as no: TPR 0, TNR 1
    # yes on "the river of paris", "paris has a red dog" (2 of 3 held-out) and on 3 of the 4 negatives
    tpr, tnr = 2 / 3, 1 / 4
    assert detection_score(says_yes_on({"river", "has", "the"}), rec, "Paris") == pytest.approx((tpr + tnr) / 2)


# ----- retries --------------------------------------------------------------------------------------------------


def scripted(*answers):
    """A MockTransport answering with `answers` in turn (an int status, (status, headers), or an exception); it keeps
    the requests it got."""
    got: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        got.append(request)
        a = queue.pop(0)
        if isinstance(a, Exception):
            raise a
        status, headers = a if isinstance(a, tuple) else (a, {})
        body = {"choices": [{"message": {"role": "assistant", "content": "fine"}}]} if status == 200 else {"error": "x"}
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handle), got


def test_429_then_200_waits_retry_after() -> None:
    transport, got = scripted((429, {"Retry-After": "3"}), 200)
    sleeps: list[float] = []
    chat = openai_chat("http://llm.test:9", "m", api_key="k", transport=transport, sleep=sleeps.append)
    assert chat([{"role": "user", "content": "hi"}]) == "fine"
    assert sleeps == [3.0] and len(got) == 2
    req = got[-1]
    assert (req.method, str(req.url)) == ("POST", "http://llm.test:9/v1/chat/completions")
    assert req.headers["authorization"] == "Bearer k"
    assert json.loads(req.content) == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 128,
                                       "temperature": 0}


def test_backoff_is_exponential_and_bounded() -> None:
    transport, got = scripted(503, httpx.ConnectError("refused"), 502, 200)
    sleeps: list[float] = []
    chat = openai_chat("http://llm.test/v1/", "m", backoff_s=0.5, transport=transport, sleep=sleeps.append)
    assert chat([{"role": "user", "content": "hi"}]) == "fine"
    assert sleeps == [0.5, 1.0, 2.0] and str(got[0].url) == "http://llm.test/v1/chat/completions"

    transport, got = scripted(*[500] * 10)
    sleeps = []
    chat = openai_chat("http://llm.test", "m", max_retries=3, backoff_s=0.5, transport=transport, sleep=sleeps.append)
    with pytest.raises(EndpointError, match=r"http://llm.test failed after 4 attempts; last: HTTP 500"):
        chat([{"role": "user", "content": "hi"}])
    assert len(got) == 4 and sleeps == [0.5, 1.0, 2.0]

    transport, _ = scripted((429, {"Retry-After": "100000"}), 200)
    sleeps = []
    openai_chat("http://llm.test", "m", transport=transport, sleep=sleeps.append)([{"role": "user", "content": "hi"}])
    assert sleeps == [60.0]  # a Retry-After is honoured up to max_backoff_s


def test_client_errors_and_bad_responses_fail_at_once() -> None:
    transport, got = scripted(400)
    sleeps: list[float] = []
    with pytest.raises(EndpointError, match=r"http://llm.test refused the request \(HTTP 400"):
        openai_chat("http://llm.test", "m", transport=transport, sleep=sleeps.append)([{"role": "user", "content": "x"}])
    assert len(got) == 1 and sleeps == []
    bad = httpx.MockTransport(lambda r: httpx.Response(200, text="not json"))
    with pytest.raises(EndpointError, match="malformed response"):
        openai_chat("http://llm.test", "m", transport=bad)([{"role": "user", "content": "x"}])


# ----- against the repository's chat deployment -------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny llama with a chat template (the tiny tokenizer has none)."""
    from attribute_ray.loading import load_tokenizer
    from attribute_ray.tiny import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("chat") / "tiny-chat", "llama", seed=3)
    tok = load_tokenizer(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def start_server(chat_model: Path, log_dir: Path) -> tuple[str, subprocess.Popen, object]:
    """(base URL, process, log file) of ``python -m deployments.chat`` on its own local Ray, once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(log_dir / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.chat", "--model", str(chat_model), "--port", str(port), "--route-prefix",
         "/llm", "--log-requests", "1000", "--max-tokens-limit", "128", "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}/llm"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"chat server exited: {Path(log.name).read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return url, proc, log
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            stop(proc)
            raise AssertionError(f"chat server not up: {Path(log.name).read_text()[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    """(base URL, process) of the chat server; stopped with SIGINT at the end."""
    url, proc, log = start_server(chat_model, tmp_path_factory.mktemp("chatlog"))
    try:
        yield url, proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def local(chat_model):
    """The same model in this process."""
    from attribute_ray.loading import load_model

    return load_model(chat_model)


def test_models_and_bad_requests(server) -> None:
    url, _ = server
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    msgs = [{"role": "user", "content": "the cat"}]
    cases = [({"model": NAME}, 400, "messages"), ({"model": NAME, "messages": []}, 400, "messages"),
             ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
             ({"model": NAME, "messages": msgs, "stream": True}, 400, "stream"),
             ({"model": NAME, "messages": msgs, "temperature": -1}, 400, "temperature"),
             ({"model": NAME, "messages": msgs, "max_tokens": 129}, 400, "limit 128"),
             ({"model": "gpt-9", "messages": msgs}, 404, "gpt-9")]
    for body, status, word in cases:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == status and word in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400


def test_completion_is_the_local_models_greedy_reply(server, local) -> None:
    url, _ = server
    model, tok = local
    msgs = [{"role": "system", "content": "you are a cat"}, {"role": "user", "content": "where is the big red dog"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": msgs, "max_tokens": 12,
                                                       "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["model"] == NAME and j["choices"][0]["message"]["role"] == "assistant"
    assert j["choices"][0]["message"]["content"] == local_chat(model, tok, max_new_tokens=12)(msgs)
    usage = j["usage"]
    assert usage["prompt_tokens"] == len(chat_prompt_ids(tok, msgs)) and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_llm_explainer_against_the_server(server, local) -> None:
    url, _ = server
    rec = record()
    remote = LLMExplainer(openai_chat(url, NAME, max_tokens=16, timeout_s=60), n_examples=3)
    mirror = LLMExplainer(local_chat(*local, max_new_tokens=16), n_examples=3)
    text = remote.explain(rec)
    assert text == mirror.explain(rec)
    score = remote.score(rec, text)
    assert 0.0 <= score <= 1.0 and score == mirror.score(rec, text)

    log = httpx.get(f"{url}/debug/requests", timeout=30).json()[-(1 + len(rec.held_out) + len(rec.negatives)):]
    assert all(r["model"] == NAME and r["temperature"] == 0 and r["max_tokens"] == 16 for r in log)
    explain, detect = log[0], log[1:]
    assert [m["role"] for m in explain["messages"]] == ["system", "user"]
    assert "Example 1: the capital of france is <<paris>>" in explain["messages"][1]["content"]
    shown = sorted(m["messages"][1]["content"].split("Text: ")[1].split("\n")[0] for m in detect)
    assert shown == sorted(format_example(e, mark=False) for e in rec.held_out + rec.negatives)
    assert all(f"Explanation: {text}\n" in m["messages"][1]["content"] for m in detect)


def test_killed_endpoint_raises_endpoint_error(server) -> None:
    """The endpoint dies in the middle of scoring: the next request fails after bounded retries, nothing hangs."""
    url, proc = server
    chat = openai_chat(url, NAME, max_tokens=4, timeout_s=10, max_retries=3, backoff_s=0.05)
    calls = []

    def dying(messages: list[dict]) -> str:
        calls.append(1)
        if len(calls) == 3:
            stop(proc)  # SIGINT: serve.shutdown, ray.shutdown, exit
        return chat(messages)

    with pytest.raises(EndpointError, match=rf"{url} failed after 4 attempts; last: ConnectError"):
        detection_score(dying, record(), "Paris")
    assert len(calls) == 3 and proc.returncode == 0


def explain_job(cache: Path, url: str, *extra: str) -> subprocess.Popen:
    """``python -m jobs.explain_features`` with the llm explainer against `url`, one feature per chunk."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.explain_features", str(cache), "--explainer", "llm", "--endpoint", url,
         "--llm-model", NAME, "--chunk-size", "1", "--concurrency", "1", "--n-held-out", "3", "--n-negatives", "3",
         *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


@pytest.mark.timeout(900)
def test_job_stores_llm_explanations_resumes_and_survives_a_dying_endpoint(chat_model, tmp_path) -> None:
    """The job against the real chat server: every feature explained and scored in the store, a rerun does
    nothing; a second cache whose endpoint is stopped mid-run keeps what was done, reports the rest and exits 1,
    and a rerun against a live endpoint finishes only the rest."""
    from attribute_ray.explanations import active_features, explained, read_explanations
    from tests.test_explanations import make_cache

    url, proc, log = start_server(chat_model, tmp_path)
    try:
        done_cache, _, _ = make_cache(tmp_path / "a")
        keys = set(active_features(done_cache))
        job = explain_job(done_cache, url)
        out, _ = job.communicate(timeout=240)
        assert job.returncode == 0 and f"{len(keys)} written, 0 left" in out, out
        assert explained(done_cache, "llm") == keys
        for k in keys:
            (e,) = read_explanations(done_cache, *k)
            assert e.explainer == "llm" and e.score is not None and 0.0 <= e.score <= 1.0
        files = {p: p.read_bytes() for p in (done_cache / "features" / "explanations").rglob("*.parquet")}
        job = explain_job(done_cache, url)
        out, _ = job.communicate(timeout=240)
        assert job.returncode == 0 and "0 written, 0 left" in out, out
        assert {p: p.read_bytes() for p in files} == files

        cache, _, _ = make_cache(tmp_path / "b")
        job = explain_job(cache, url, "--n-held-out", "8", "--n-negatives", "8")  # slower: time to stop the server
        deadline = time.time() + 240
        while not explained(cache, "llm"):
            assert job.poll() is None and time.time() < deadline, job.stdout.read() if job.poll() is not None else ""
            time.sleep(0.2)
        stop(proc)
        out, _ = job.communicate(timeout=240)
        first = explained(cache, "llm")
        assert job.returncode == 1 and "EndpointError" in out and f"{len(keys) - len(first)} features left" in out, out
        assert first and first < keys  # some done, some left
        kept = {k: read_explanations(cache, *k) for k in first}
    finally:
        stop(proc)
        log.close()

    (tmp_path / "again").mkdir()
    url, proc, log = start_server(chat_model, tmp_path / "again")
    try:
        job = explain_job(cache, url, "--n-held-out", "8", "--n-negatives", "8")
        out, _ = job.communicate(timeout=240)
        assert job.returncode == 0 and f"{len(keys) - len(first)} written, 0 left" in out, out
        assert explained(cache, "llm") == keys and {k: read_explanations(cache, *k) for k in first} == kept
    finally:
        stop(proc)
        log.close()
