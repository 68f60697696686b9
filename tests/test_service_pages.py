"""What the service shows people: /docs offline, every POST body in the OpenAPI document, and no server
filesystem path in anything it returns (the tiny pair lives under a folder whose name is a recognisable marker)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import msgpack
import pytest

from attribute_ray import api
from tests.conftest import deploy_app, marked_pair

pytestmark = pytest.mark.timeout(300)
MARKER = "leakmarker-q7zx"  # a parent folder of the model and transcoder; never in a response
PREFIX = "/svc"  # the app under a route prefix: the pages must find their assets and document below it


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(model dir, transcoder dir, graph store dir, feature store dir), all below a MARKER folder."""
    return marked_pair(tmp_path_factory.mktemp("pages") / MARKER, [(0, 1)])


@pytest.fixture(scope="module")
def service(pair, serve_url) -> str:
    """Base URL of the app, deployed under PREFIX."""
    model_dir, tc_dir, store, features = pair
    return deploy_app(serve_url, "pages", PREFIX, model=str(model_dir), transcoder=str(tc_dir), max_queued_requests=4,
                      max_prompt_tokens=64, graph_store=str(store), feature_store=str(features))


def operations(document: dict) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in an OpenAPI document."""
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return [(m.upper(), p) for p, item in document["paths"].items() for m in item if m in methods]


def test_every_post_route_documents_its_request_model(service) -> None:
    document = httpx.get(f"{service}/openapi.json", timeout=30).json()
    schemas = document["components"]["schemas"]
    posts = [(m, p) for m, p in operations(document) if m == "POST"]
    assert posts  # the service has POST routes, and each one is checked below
    for _, path in posts:
        body = document["paths"][path]["post"].get("requestBody")
        assert body and body["required"], path
        for media in ("application/json", "application/msgpack"):
            ref = body["content"][media]["schema"]["$ref"]
            assert ref.startswith("#/components/schemas/"), (path, ref)
            name = ref.rsplit("/", 1)[1]
            model = getattr(api, name)  # a request model of the shared contract, attribute_ray/api.py
            assert set(schemas[name]["properties"]) == set(model.model_json_schema()["properties"]), path
    refs = []

    def walk(node) -> None:
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if "$ref" in node else [])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(document)
    assert all(r.rsplit("/", 1)[1] in schemas for r in refs), [r for r in refs if r.rsplit("/", 1)[1] not in schemas]


def _browse(url: str, ready: str) -> tuple[list[str], list[str], object]:
    """Open `url` in Debian's Chromium with every request off 127.0.0.1 aborted; returns (requested URLs, page
    errors, the value of the JS expression `ready` once truthy)."""
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def route(r) -> None:
                requested.append(r.request.url)
                r.continue_() if urlparse(r.request.url).hostname == "127.0.0.1" else r.abort()

            page.route("**/*", route)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            value = page.wait_for_function(ready, timeout=60_000).json_value()
            page.wait_for_load_state("networkidle")
        finally:
            browser.close()
    return requested, errors, value


def test_docs_render_offline(service) -> None:
    document = httpx.get(f"{service}/openapi.json", timeout=30).json()
    ops = operations(document)
    # Swagger UI: one block per operation, each with its method and path, and the request models under Schemas
    shown = ("document.querySelectorAll('.opblock').length && document.querySelector('.models') && "
             "[[...document.querySelectorAll('.opblock')].map(b => [b.querySelector('.opblock-summary-method')"
             ".textContent, b.querySelector('.opblock-summary-path').dataset.path]), "
             "document.querySelector('.models').textContent]")
    requested, errors, (blocks, models) = _browse(f"{service}/docs", shown)
    assert sorted(map(tuple, blocks)) == sorted(ops)
    assert "GraphRequest" in models and "InterventionRequest" in models
    assert [u for u in requested if urlparse(u).hostname != "127.0.0.1"] == [] and errors == []
    assert any(u.endswith("/svc/docs/assets/swagger-ui-bundle.js") for u in requested)
    # /redoc is off (ReDoc's bundle fetches its vendor's logo from the web)
    assert httpx.get(f"{service}/redoc", timeout=30).status_code == 404


def test_no_server_path_in_any_response(service, pair) -> None:
    model_dir, tc_dir, store, features = pair
    secrets = [MARKER, str(Path.home()), tempfile.gettempdir(), str(model_dir), str(tc_dir), str(store), str(features)]
    bodies: dict[str, str] = {}

    def keep(name: str, r: httpx.Response, status: int | None = None) -> httpx.Response:
        assert status is None or r.status_code == status, (name, r.status_code, r.text[:300])
        bodies[name] = r.text
        return r

    models = keep("models", httpx.get(f"{service}/v1/models", timeout=60), 200).json()
    assert (models["model"], models["transcoder"]) == (model_dir.name, tc_dir.name)  # the folders' names
    body = {"prompt": "the cat sat", "max_feature_nodes": 20}
    g = keep("graph json", httpx.post(f"{service}/v1/graphs", json=body, timeout=120), 200)
    assert g.json()["metadata"]["scan"] == tc_dir.name
    m = httpx.post(f"{service}/v1/graphs", json=body, headers={"accept": "application/msgpack"}, timeout=120)
    header = {k: v for k, v in msgpack.unpackb(m.content, raw=False).items() if k != "arrays"}
    assert (header["model"], header["transcoder"]) == (model_dir.name, tc_dir.name)
    bodies["graph msgpack header"] = json.dumps(header)
    gid = g.headers["x-graph-id"]
    keep("graph by id", httpx.get(f"{service}/v1/graphs/{gid}", params={"node_threshold": 0.5}, timeout=60), 200)
    keep("graph list", httpx.get(f"{service}/v1/graphs", timeout=60), 200)
    feature = keep("feature", httpx.get(f"{service}/v1/features/0/1", timeout=60), 200).json()
    assert feature["transcoder_id"] == tc_dir.name
    # a job that fails inside the engine (a node budget no tensor can hold), seen through its view and a wait
    huge = {"prompt": "the dog ran", "max_feature_nodes": 10**30}
    job = keep("job queued", httpx.post(f"{service}/v1/graphs", json=huge, params={"wait": "false"}, timeout=60)).json()
    if job.get("job_id"):  # a request model that bounds the field refuses it at once (4xx), also checked here
        for _ in range(600):
            view = keep("job view", httpx.get(f"{service}/v1/jobs/{job['job_id']}", timeout=30), 200).json()
            if view["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert view["status"] == "failed", view
    assert keep("failed wait", httpx.post(f"{service}/v1/graphs", json=huge, timeout=120)).status_code >= 400
    # 4xx errors
    keep("400", httpx.post(f"{service}/v1/graphs", content=b"{nope", headers={"content-type": "application/json"},
                           timeout=30), 400)
    keep("422", httpx.post(f"{service}/v1/graphs", json={"tokens": [0, 10**6]}, timeout=30), 422)
    keep("404 graph", httpx.get(f"{service}/v1/graphs/{'0' * 32}", timeout=30), 404)
    keep("404 job", httpx.get(f"{service}/v1/jobs/nope", timeout=30), 404)
    keep("404 feature", httpx.get(f"{service}/v1/features/0/999", timeout=30), 404)
    keep("404 ui", httpx.get(f"{service}/ui/../../etc/passwd", timeout=30))
    keep("intervention 422", httpx.post(f"{service}/v1/interventions", json={"prompt": "the cat",
                                        "interventions": [{"layer": 99, "feature": 0}]}, timeout=60), 422)
    for page in ("/", "/docs", "/openapi.json"):
        keep(page, httpx.get(f"{service}{page}", timeout=30), 200)
    leaks = {(name, s) for name, text in bodies.items() for s in secrets if s in text}
    assert leaks == set(), leaks


def test_display_names(tmp_path) -> None:
    from attribute_ray.presets import DEMO_MODEL_DIR, DEMO_TRANSCODER_DIR, display_name

    snapshot = tmp_path / "hub" / "models--someone--tiny-lm" / "snapshots" / "0123abcd"
    (snapshot / "sub").mkdir(parents=True)
    (tmp_path / "m.Q4_1.gguf").write_bytes(b"")
    cases = {
        "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M",  # hub references as given
        "nev/SmolLM2-CLT-135M-73k-k32@main": "nev/SmolLM2-CLT-135M-73k-k32@main",
        "hf://user/repo/sub?revision=r": "hf://user/repo/sub?revision=r",
        str(tmp_path / MARKER / "my-model"): "my-model",  # a local folder (there or not) by its name
        str(tmp_path / MARKER / "my-model") + "/": "my-model",
        str(tmp_path / "m.Q4_1.gguf"): "m.Q4_1",
        str(snapshot): "someone/tiny-lm",  # a Hugging Face cache snapshot by its repo id
        str(snapshot / "sub"): "someone/tiny-lm/sub",
        str(DEMO_MODEL_DIR): "SmolLM2-135M-Instruct",  # the demo preset's folders
        str(DEMO_TRANSCODER_DIR): "attribute-ray demo transcoder",
    }
    assert {ref: display_name(ref) for ref in cases} == cases
