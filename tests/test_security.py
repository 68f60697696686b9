"""The service's door (deployments/limits.py): only JSON / msgpack bodies, a CORS policy that is off unless
configured, and bodies refused as soon as they pass the limit, with the server's memory bounded.

The middleware is installed on a plain FastAPI app whose route reads its body as the ingress does
(`deployments.encoding.parse_body`); the large-body tests run it under uvicorn in a subprocess so that the
server's RSS can be measured from outside.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from deployments.encoding import parse_body
from deployments.limits import install_limits
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(300)
LIMIT = 1_000_000
GIB = 2**30
CHUNK = 64 * 1024
ROOT = Path(__file__).parent.parent
APP = """
import sys
from fastapi import FastAPI, Request
from pydantic import BaseModel
import uvicorn
from deployments.encoding import parse_body
from deployments.limits import install_limits

class Body(BaseModel):
    prompt: str

app = FastAPI()

@app.post("/v1/graphs")
async def graphs(request: Request) -> dict:
    return {"prompt": (await parse_body(request, Body, {limit})).prompt}

install_limits(app, max_body_bytes={limit})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


class Body(BaseModel):
    prompt: str


def make_app(cors_origins: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/graphs")
    async def graphs(request: Request) -> dict:
        return {"prompt": (await parse_body(request, Body, LIMIT)).prompt}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"model": "m"}

    install_limits(app, max_body_bytes=LIMIT, cors_origins=cors_origins)
    return app


def test_cross_site_simple_bodies_are_refused_and_cors_is_off_by_default() -> None:
    """What a page on another site can POST without a preflight (text/plain, a form, a Blob without a type) gets
    415; JSON and msgpack pass; with no CORS origins configured no response carries Access-Control-Allow-Origin."""
    import msgpack

    client = TestClient(make_app())
    evil = {"Origin": "https://evil.example"}
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", None):
        headers = {**evil, **({"content-type": ctype} if ctype else {})}
        r = client.post("/v1/graphs", content=b'{"prompt": "the cat"}', headers=headers)
        assert r.status_code == 415, (ctype, r.status_code, r.text)
        assert "unsupported content type" in r.json()["detail"]
        assert "access-control-allow-origin" not in r.headers
    ok = client.post("/v1/graphs", json={"prompt": "the cat"}, headers=evil)
    assert ok.status_code == 200 and ok.json() == {"prompt": "the cat"}
    assert "access-control-allow-origin" not in ok.headers
    packed = client.post("/v1/graphs", content=msgpack.packb({"prompt": "a dog"}),
                         headers={"content-type": "application/msgpack; foo=bar"})
    assert packed.status_code == 200 and packed.json() == {"prompt": "a dog"}
    preflight = client.options("/v1/graphs", headers={**evil, "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in client.get("/v1/models", headers=evil).headers


def test_cors_answers_only_the_configured_origin() -> None:
    client = TestClient(make_app(cors_origins=("https://tools.example",)))
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    good = client.options("/v1/graphs", headers={"Origin": "https://tools.example", **ask})
    assert good.status_code == 200
    assert good.headers["access-control-allow-origin"] == "https://tools.example"
    assert "authorization" in good.headers["access-control-allow-headers"].lower()
    bad = client.options("/v1/graphs", headers={"Origin": "https://evil.example", **ask})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    post = client.post("/v1/graphs", json={"prompt": "x"}, headers={"Origin": "https://tools.example"})
    assert post.status_code == 200 and post.headers["access-control-allow-origin"] == "https://tools.example"
    other = client.post("/v1/graphs", json={"prompt": "x"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    refused = client.post("/v1/graphs", content=b"x", headers={"Origin": "https://tools.example",
                                                              "content-type": "text/plain"})
    assert refused.status_code == 415 and refused.headers["access-control-allow-origin"] == "https://tools.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, psutil.Process) of the app under uvicorn in a subprocess."""
    script = tmp_path_factory.mktemp("app") / "app.py"
    script.write_text(textwrap.dedent(APP).replace("{limit}", str(LIMIT)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.post(f"{url}/v1/graphs", json={"prompt": "up"}, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class PeakRss:
    """The process's peak RSS (bytes) while the block runs, sampled every 10 ms."""

    def __init__(self, proc: psutil.Process):
        self.proc, self.peak, self._stop = proc, proc.memory_info().rss, threading.Event()

    def __enter__(self) -> PeakRss:
        self.base = self.peak
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def gib_body(sent: list[int]):
    """1 GiB of a JSON string's inside, in 64 KiB chunks; `sent[0]` counts the bytes handed out."""
    yield b'{"prompt": "'
    for _ in range(GIB // CHUNK):
        sent[0] += CHUNK
        yield b"a" * CHUNK


@pytest.mark.parametrize("declared", [None, str(GIB)], ids=["chunked", "content-length"])
def test_gib_body_is_refused_after_little_more_than_the_limit(server, declared) -> None:
    url, proc = server
    sent = [0]
    headers = {"content-type": "application/json", **({"content-length": declared} if declared else {})}
    with PeakRss(proc) as rss:
        r = httpx.post(f"{url}/v1/graphs", content=gib_body(sent), headers=headers, timeout=60)
    growth = rss.peak - rss.base
    print(f"\n[{declared or 'chunked'}] 413 after {sent[0] / 2**20:.1f} MiB sent of 1024; server RSS "
          f"{rss.base / 2**20:.0f} MiB -> peak {rss.peak / 2**20:.0f} MiB")
    assert r.status_code == 413, r.text
    assert "exceeds" in r.json()["detail"] or "more than" in r.json()["detail"]
    # Whatever the socket buffers held beyond the limit; a body read whole would be 1024 MiB here.
    assert sent[0] < LIMIT + 32 * 2**20
    assert growth < 64 * 2**20
    assert httpx.post(f"{url}/v1/graphs", json={"prompt": "still here"}, timeout=10).json() == {"prompt": "still here"}


def test_lying_content_length_does_not_make_the_server_read_more(server) -> None:
    """Content-Length says 20 bytes, then 1 GiB follows: the server reads the 20 it was promised, answers, and
    reads no further (what follows is no valid request); its memory stays put."""
    url, proc = server
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with PeakRss(proc) as rss, socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/graphs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n")
        s.settimeout(0.5)
        chunk = b"a" * CHUNK
        try:
            while sent < GIB:
                sent += s.send(chunk)
        except (TimeoutError, ConnectionError):
            pass  # the server stopped reading (buffers full) or closed the connection
        s.settimeout(10)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                part = s.recv(65536)
                if not part:
                    break
                reply += part
        except ConnectionError:
            pass
    status = reply.split(b"\r\n")[0]
    print(f"\n[lying content-length] {sent / 2**20:.1f} MiB accepted by the socket of 1024; reply {status!r}; "
          f"server RSS peak +{(rss.peak - rss.base) / 2**20:.0f} MiB")
    assert reply.startswith(b"HTTP/1.1 4"), reply[:200]
    assert sent < 64 * 2**20
    assert rss.peak - rss.base < 64 * 2**20


TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def token_service(serve_url, dirs, tmp_path_factory) -> str:
    """The tiny model's application with `api_token` set, at the root of the module's Serve proxy."""
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    args = AppArgs(model=str(dirs[0]), transcoder=str(dirs[1]), num_gpus=0, api_token=TOKEN,
                   graph_store=str(tmp_path_factory.mktemp("store")))
    serve.run(app_builder(args), name="tokened", route_prefix="/")
    return serve_url


@pytest.mark.timeout(900)
def test_the_ui_asks_for_the_token_keeps_it_for_the_session_and_loads_a_graph(token_service) -> None:
    from playwright.sync_api import sync_playwright

    url = token_service
    assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 401
    r = httpx.post(f"{url}/v1/graphs", json={"prompt": "the cat sat"}, headers={"Authorization": f"Bearer {TOKEN}"},
                   timeout=300)
    assert r.status_code == 200, r.text
    gid = r.headers["X-Graph-Id"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            sent: list[str | None] = []
            page.on("request", lambda q: sent.append(q.headers.get("authorization")) if "/v1/" in q.url else None)
            page.goto(f"{url}/#graph={gid}")
            page.wait_for_selector("#token-dialog[open]", timeout=120_000)
            assert "needs an API token" in page.inner_text("#token-why")
            page.fill("#token", "wrong")
            page.click("#token-save")
            page.wait_for_function("document.getElementById('token-why').textContent.includes('not accepted')"
                                   " && document.getElementById('token-dialog').open", timeout=60_000)
            page.fill("#token", TOKEN)
            page.click("#token-save")
            page.wait_for_function("window.__explorer && window.__explorer.ready === true", timeout=300_000)
            assert not page.eval_on_selector("#token-dialog", "d => d.open")
            assert page.evaluate("sessionStorage.getItem('attribute-ray-token')") == TOKEN
            assert f"Bearer {TOKEN}" in sent and "Bearer wrong" in sent and None in sent
            assert page.inner_text("#model-info") and "missing or wrong" not in page.inner_text("#error")
            sent.clear()
            page.reload()  # the same tab: the token is kept, nothing is asked
            page.wait_for_function("window.__explorer && window.__explorer.ready === true", timeout=300_000)
            assert not page.eval_on_selector("#token-dialog", "d => d.open")
            assert sent and all(h == f"Bearer {TOKEN}" for h in sent), sent
            fresh = browser.new_context().new_page()  # another session: asked again
            fresh.goto(f"{url}/#graph={gid}")
            fresh.wait_for_selector("#token-dialog[open]", timeout=120_000)
        finally:
            browser.close()
