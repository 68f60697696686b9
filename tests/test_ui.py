"""The web UI in a real browser (Debian's Chromium via Playwright) against the served demo preset.

The demo prompt with default settings, as a new user sees it at 1440×900: what is drawn (through the page's
`window.__explorer.geometry()`, documented in deployments/ui/app.js) and what the DOM shows, compared with the
service's own answers over HTTP. Screenshots of each state go to $ATTRIBUTE_RAY_ARTIFACTS/ui (default
tests/artifacts/ui).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(900)
PROMPT = "The capital of France is"
VIEWPORT = {"width": 1440, "height": 900}
SHOTS = Path(os.environ.get("ATTRIBUTE_RAY_ARTIFACTS", Path(__file__).parent / "artifacts")) / "ui"
GRAPH_URL = re.compile(r"/v1/graphs/[0-9a-f]{32}(\?|$)")
FEATURE = 0  # node types in geometry(): feature, error, token, logit


@pytest.fixture(scope="module")
def url(serve_url, tmp_path_factory) -> str:
    """Base URL of the demo application (SmolLM2-135M-Instruct + the shipped transcoder and dashboards)."""
    from ray import serve

    from deployments.app import app_builder
    from deployments.config import AppArgs

    os.environ["HF_HUB_OFFLINE"] = "1"
    args = AppArgs(preset="demo", num_gpus=0, num_cpus=2, graph_store=str(tmp_path_factory.mktemp("store")))
    serve.run(app_builder(args), name="demo", route_prefix="/")
    return serve_url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@contextmanager
def demo_page(browser, url: str, errors: list[str], requests: list | None = None) -> Iterator:
    """A 1440×900 page that ran the demo prompt with default settings and drew its graph. Console and page errors
    go to `errors` (except a feature without a dashboard: a 404 the panel reports, which Chromium logs)."""
    page = browser.new_page(viewport=VIEWPORT)

    def console(m) -> None:
        if m.type == "error" and not ("404" in m.text and "/v1/features/" in (m.location or {}).get("url", "")):
            errors.append(m.text)

    page.on("console", console)
    page.on("pageerror", lambda e: errors.append(str(e)))
    if requests is not None:
        page.on("request", lambda r: requests.append(r))
    try:
        page.goto(f"{url}/")
        page.fill("#prompt", PROMPT)
        page.click("#run")
        ready(page)
        yield page
    finally:
        page.close()


def ready(page) -> None:
    """Wait until the graph is drawn and the labels fetched with dashboards have arrived (they re-render)."""
    page.wait_for_function("window.__explorer && window.__explorer.ready === true", timeout=300_000)
    page.wait_for_function("window.__explorer.settled()", timeout=120_000)


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def overlap(a: dict, b: dict) -> bool:
    """Whether two boxes {x, y, width, height} share interior points."""
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


def inside(inner: dict, outer: dict) -> bool:
    return (outer["x"] <= inner["x"] and inner["x"] + inner["width"] <= outer["x"] + outer["width"]
            and outer["y"] <= inner["y"] and inner["y"] + inner["height"] <= outer["y"] + outer["height"])


def graph_id(page) -> str:
    return re.search(r"graph=([0-9a-f]{32})", page.url).group(1)


def server_json(url: str, gid: str, node_threshold: float, edge_threshold: float) -> dict:
    r = httpx.get(f"{url}/v1/graphs/{gid}", params={"node_threshold": node_threshold, "edge_threshold": edge_threshold},
                  headers={"accept": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_default_demo_view_is_readable(url, browser) -> None:
    """Few edges, nothing overlapping, special tokens apart, one msgpack request, pruning equal to the server's."""
    errors: list[str] = []
    requests: list = []
    with demo_page(browser, url, errors, requests) as page:
        shot(page, "default")
        # exactly one graph request, and it asks for msgpack
        graph_requests = [r for r in requests if GRAPH_URL.search(r.url)]
        assert len(graph_requests) == 1, [r.url for r in graph_requests]
        assert graph_requests[0].method == "GET" and "application/msgpack" in graph_requests[0].headers["accept"]

        geo = page.evaluate("window.__explorer.geometry()")
        selected_edges = page.evaluate("window.__explorer.selectedEdges()")
        assert 0 < geo["edges"] <= selected_edges  # only the selected node's edges, not the whole graph
        for name in ("logitLabels", "tokenLabels"):
            boxes = [label["box"] for label in geo[name]]
            assert len(boxes) > 1 and all(b["width"] > 0 and b["height"] > 0 for b in boxes)
            assert not [(a, b) for a, b in combinations(boxes, 2) if overlap(a, b)], name
        nodes = geo["nodes"]
        assert not [(a["id"], b["id"]) for a, b in combinations(nodes, 2)
                    if (a["x"] - b["x"]) ** 2 + (a["y"] - b["y"]) ** 2 < (a["r"] + b["r"]) ** 2]
        # all drawn inside the viewport
        assert all(0 <= n["x"] - n["r"] and n["x"] + n["r"] <= VIEWPORT["width"] for n in nodes)

        # the logits read as token and probability; the chat marker is a greyed label, not part of the prompt
        gid = graph_id(page)
        data = server_json(url, gid, 0.8, 0.98)
        logits = sorted((n for n in data["nodes"] if n["feature_type"] == "logit"), key=lambda n: -n["token_prob"])
        top = next(label for label in geo["logitLabels"] if label["id"] == logits[0]["node_id"])
        assert "Paris" in top["text"] and f"{100 * logits[0]['token_prob']:.1f}%" in top["text"]
        assert [t["special"] for t in geo["tokenLabels"]] == [True] + [False] * 5
        assert geo["tokenLabels"][0]["text"] == "<|im_start|>"
        assert page.input_value("#prompt") == PROMPT
        assert "<|im_start|>" not in page.inner_text("#model-info")

        # pruned in the browser exactly as the server prunes (docs/method.md §7)
        drawn = {n["id"] for n in nodes}
        assert drawn == {n["node_id"] for n in data["nodes"]}
        assert page.evaluate("window.__explorer.stats") == {"nodes": len(data["nodes"]), "edges": len(data["links"])}
        page.eval_on_selector("#node-threshold", "e => { e.value = '0.5'; e.dispatchEvent(new Event('input')); }")
        page.wait_for_function("window.__explorer.stats.nodes < %d" % len(data["nodes"]), timeout=30_000)
        half = server_json(url, gid, 0.5, 0.98)
        assert page.evaluate("window.__explorer.stats") == {"nodes": len(half["nodes"]), "edges": len(half["links"])}
        assert "nt=0.50" in page.url

        # all edges on request; the JSON download is fetched only now, at the current thresholds
        page.check("#all-edges")
        assert page.evaluate("window.__explorer.geometry().edges") == len(half["links"])
        shot(page, "all-edges")
        with page.expect_download() as dl:
            page.click("#download-json")
        downloaded = json.loads(Path(dl.value.path()).read_text())
        json_requests = [r for r in requests if GRAPH_URL.search(r.url)][1:]
        assert len(json_requests) == 1 and "application/json" in json_requests[0].headers["accept"]
        assert "node_threshold=0.5" in json_requests[0].url
        assert {n["node_id"] for n in downloaded["nodes"]} == {n["node_id"] for n in half["nodes"]}
    assert not errors, errors


def test_clicking_a_feature_puts_its_dashboard_in_view(url, browser) -> None:
    errors: list[str] = []
    with demo_page(browser, url, errors) as page:
        nodes = page.evaluate("window.__explorer.geometry()")["nodes"]
        feature = next(n for n in nodes if n["type"] == FEATURE and httpx.get(
            f"{url}/v1/features/{n['id'].split('_')[0]}/{n['id'].split('_')[1]}", timeout=30).status_code == 200)
        layer, index, _ = feature["id"].split("_")
        page.mouse.move(feature["x"], feature["y"])  # hover: a tooltip names the feature
        page.wait_for_selector("#graph-wrap .tooltip:not([hidden])", timeout=10_000)
        assert f"L{layer} #{index}" in page.inner_text("#graph-wrap .tooltip")
        shot(page, "hover")
        page.mouse.click(feature["x"], feature["y"])  # a real click on the node's pixel
        page.wait_for_selector("#dashboard .example", timeout=30_000)
        assert f"L{layer} #{index}" in page.inner_text("#dashboard h3")
        for pane in ("#dashboard", "#panel"):
            assert inside(page.locator(pane).bounding_box(), {"x": 0, "y": 0, **VIEWPORT}), pane
        assert page.locator("#dashboard .example").first.is_visible()
        assert page.locator("#panel .edge-item").count() > 0
        assert f"sel={feature['id']}" in page.url
        geo = page.evaluate("window.__explorer.geometry()")
        assert geo["edges"] <= page.evaluate("window.__explorer.selectedEdges()")
        shot(page, "feature-selected")
    assert not errors, errors


def test_subgraph_of_pinned_nodes_and_a_supernode(url, browser) -> None:
    """Five pinned features from three layers get five distinct places; a supernode's box holds its members; the
    pins and the supernode come back from the URL."""
    errors: list[str] = []
    with demo_page(browser, url, errors) as page:
        features = [n for n in page.evaluate("window.__explorer.nodes()") if n["type"] == "feature"]
        by_layer: dict[int, list[str]] = {}
        for n in sorted(features, key=lambda n: -n["pos"]):  # later positions first: a wider subgraph
            by_layer.setdefault(n["layer"], []).append(n["id"])
        layers = sorted(by_layer, key=lambda l: -len(by_layer[l]))[:3]
        assert len(layers) == 3 and len(by_layer[layers[0]]) >= 2 and len(by_layer[layers[1]]) >= 2
        chosen = by_layer[layers[0]][:2] + by_layer[layers[1]][:2] + by_layer[layers[2]][:1]

        def pin(node_id: str) -> None:
            page.evaluate("id => window.__explorer.select(id)", node_id)
            page.click("#pin")

        for node_id in chosen[:2]:
            pin(node_id)
        page.fill("#group-label", "pair")
        page.click("#group")
        for node_id in chosen[2:]:
            pin(node_id)
        assert page.locator("#pinned li").count() == 3 and page.locator("#supernodes li").count() == 1
        page.click("#tab-subgraph")

        def check() -> None:
            page.wait_for_function("window.__explorer.settled()", timeout=60_000)
            dots = {node_id: page.locator(f'#subgraph circle[data-node-id="{node_id}"]').bounding_box() for node_id in chosen}
            centres = {(round(b["x"] + b["width"] / 2), round(b["y"] + b["height"] / 2)) for b in dots.values()}
            assert len(centres) == 5, dots
            assert not [(a, b) for a, b in combinations(dots, 2) if overlap(dots[a], dots[b])]
            box = page.locator('#subgraph rect.sg-box[data-label="pair"]').bounding_box()
            assert all(inside(dots[m], box) for m in chosen[:2])
            assert not any(inside(dots[m], box) for m in chosen[2:])
            cards = [page.locator(f'#subgraph rect.sg-card[data-node-id="{m}"]').bounding_box() for m in chosen[2:]] + [box]
            assert not [(a, b) for a, b in combinations(cards, 2) if overlap(a, b)]  # labels sit on their own cards
            layers = page.eval_on_selector("#subgraph", "s => [...s.children].map(c => c.getAttribute('class'))")
            assert layers.index("sg-edges") < layers.index("sg-units")  # labels are drawn over edges, never under

        check()
        shot(page, "subgraph")
        page.reload()  # pins, the supernode and the view are in the URL
        ready(page)
        assert page.locator("#pinned li").count() == 3 and page.locator("#supernodes li").count() == 1
        check()
    assert not errors, errors


def test_web_ui_interventions_and_steering(url, browser) -> None:
    errors: list[str] = []
    with demo_page(browser, url, errors) as page:
        node = next(n for n in page.evaluate("window.__explorer.nodes()") if n["type"] == "feature")
        page.evaluate("id => window.__explorer.select(id)", node["id"])
        page.select_option("#iv-op", "scale")
        page.fill("#iv-value", "5")
        page.click("#iv-run")
        page.wait_for_selector("#iv-result .iv-row", timeout=120_000)
        layer, feat, pos = map(int, node["id"].split("_"))
        api = httpx.post(f"{url}/v1/interventions", timeout=120, json={"prompt": PROMPT, "top_k": 10, "interventions": [
            {"layer": layer, "feature": feat, "op": "scale", "value": 5, "positions": [pos]}]}).json()
        shown = page.inner_text("#iv-result")
        assert all(t["token"].strip() in shown for t in api["top_after"][:3])
        page.fill("#iv-tokens", "6")
        page.click("#iv-steer")
        page.wait_for_function("document.querySelector('#iv-steered')?.innerText.length > 0", timeout=120_000)
        shot(page, "interventions")
    assert not errors, errors
