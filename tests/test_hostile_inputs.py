"""No input makes the service answer 5xx: every hostile value (non-finite or out-of-range numbers, lone surrogates,
impossible route parameters) is refused with a 4xx whose message names the field, in JSON and msgpack bodies alike;
an unexpected failure is a 500 with an error id and nothing of the server; and the service keeps answering.

The request models are also checked on their own (no Ray) at each bound: the largest accepted value and the
smallest refused one (attribute_ray/settings.py declares the bounds)."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgpack
import pytest
from pydantic import ValidationError

from attribute_ray.api import GraphRequest, GraphView, InterventionRequest, InterventionSpec, SupernodeSpec
from attribute_ray.errors import InterventionError
from attribute_ray.settings import INDEX_MAX, MAX_FEATURE_NODES, SEED_MAX, VALUE_MAX, GraphSettings
from tests.conftest import deploy_app, marked_pair

pytestmark = pytest.mark.timeout(600)
MARKER = "leakmarker-h6x"  # a parent folder of everything the service reads; never in a response
PREFIX = "/hostile"
BIG = 10**30  # overflowed a tensor size as max_feature_nodes
DIGITS50 = "9" * 50
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400")  # JSON literals Python's parser takes (1e400 becomes inf)
MSGPACK_NON_FINITE = (math.nan, math.inf, -math.inf)
LONE = '"a\\ud800b"'  # JSON text of a string with a lone surrogate
INVALID_UTF8 = b"a\xed\xa0\x80b"  # the same surrogate as (invalid) UTF-8 bytes in a msgpack string
JSON_T, MSGPACK_T = "application/json", "application/msgpack"


# ----- the table -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile request: `body` sent as `content_type` to POST `path` (or a GET when body is None); the
    answer must be a 4xx in `statuses` whose text names `field`."""

    name: str
    path: str
    field: str
    body: bytes | None = None
    content_type: str = JSON_T
    statuses: tuple[int, ...] = (422,)


def json_body(base: str, field: str, literal: str) -> bytes:
    """A JSON object written by hand (json.dumps would refuse NaN only with allow_nan=False): `base` members plus
    `"field": literal`."""
    return ("{" + base + f', "{field}": {literal}' + "}").encode()


def packed(obj: dict) -> bytes:
    """msgpack of `obj`; bytes values become msgpack *strings* (use_bin_type=False), so invalid UTF-8 gets through."""
    return msgpack.packb(obj, use_bin_type=False)


GRAPH_ROUTES = ("/v1/graphs", "/v1/graphs?wait=false", "/v1/graphs/stream")
INTERVENTION_ROUTES = ("/v1/interventions", "/v1/steer")
GRAPH_FLOATS = {"desired_logit_prob": ("0", "1.0000001"), "node_threshold": ("-0.1", "1.5"),
                "edge_threshold": ("-1e-9", "2")}  # with finite out-of-range neighbours
GRAPH_INTS = {"max_n_logits": ("1001",), "max_feature_nodes": (str(MAX_FEATURE_NODES + 1),),
              "batch_size": ("65537",), "update_interval": ("1000001",)}
EDIT = '"interventions": [{"layer": 0, "feature": 1, "op": "set", "value": 1}]'
IV = '{"layer": 0, "feature": 1, "op": "%s", "value": %s}'


def graph_cases() -> list[Case]:
    base = '"prompt": "the cat sat"'
    raw: list[tuple[str, str, str]] = []  # (case name, field, JSON literal)
    for field, neighbours in {**GRAPH_FLOATS, **GRAPH_INTS}.items():
        extra = ("-1", str(BIG), "0.5") if field in GRAPH_INTS else ()
        raw += [(f"{field}={v}", field, v) for v in (*NON_FINITE, *neighbours, *extra)]
    cases = [Case(f"json {n}", "", f, json_body(base, f, v)) for n, f, v in raw]
    cases += [Case("json prompt lone surrogate", "", "prompt", f'{{"prompt": {LONE}}}'.encode()),
              Case("json targets lone surrogate", "", "targets", json_body(base, "targets", f"[{LONE}]")),
              Case("json tokens 1e30", "", "tokens", f'{{"tokens": [1, {BIG}]}}'.encode()),
              Case("json tokens -1", "", "tokens", b'{"tokens": [1, -1]}'),
              Case("json tokens NaN", "", "tokens", b'{"tokens": [1, NaN]}'),
              Case("json targets 1e30", "", "targets", json_body(base, "targets", f"[{BIG}]")),
              Case("json slug script", "", "slug", json_body(base, "slug", '"<script>alert(1)</script>"'))]
    for field in GRAPH_FLOATS:
        cases += [Case(f"msgpack {field}={v}", "", field, packed({"prompt": "the cat sat", field: v}), MSGPACK_T)
                  for v in MSGPACK_NON_FINITE]
    for field in GRAPH_INTS:
        cases += [Case(f"msgpack {field}={v}", "", field, packed({"prompt": "the cat sat", field: v}), MSGPACK_T)
                  for v in (-1, 2**64 - 1, math.nan)]  # 2**64 - 1: the largest int msgpack holds
    cases.append(Case("msgpack prompt invalid utf-8", "", "prompt", packed({"prompt": INVALID_UTF8}), MSGPACK_T))
    return [Case(f"{c.name} -> {route}", route, c.field, c.body, c.content_type)
            for route in GRAPH_ROUTES for c in cases]


def intervention_cases() -> list[Case]:
    base = '"prompt": "the cat sat"'
    raw: list[tuple[str, str, str]] = [  # (case name, field, JSON members after base)
        ("value 1e308 set", "value", f'"interventions": [{IV % ("set", "1e308")}]'),
        ("value -1e300 add", "value", f'"interventions": [{IV % ("add", "-1e300")}]'),
        ("value just past 1e6", "value", f'"interventions": [{IV % ("scale", "1000000.0000001")}]'),
        ("supernode value 1e308", "value", '"supernodes": [{"label": "s", "features": [[0, 1]], "op": "set", '
                                           '"value": 1e308}]'),
        ("supernode feature 1e30", "features", f'"supernodes": [{{"label": "s", "features": [[0, {BIG}]]}}]'),
        ("supernode label lone surrogate", "label", f'"supernodes": [{{"label": {LONE}, "features": [[0, 1]]}}]'),
        ("layer 1e30", "layer", f'"interventions": [{{"layer": {BIG}, "feature": 1}}]'),
        ("layer -1", "layer", '"interventions": [{"layer": -1, "feature": 1}]'),
        ("feature 1e30", "feature", f'"interventions": [{{"layer": 0, "feature": {BIG}}}]'),
        ("feature -1", "feature", '"interventions": [{"layer": 0, "feature": -1}]'),
        ("positions 1e30", "positions", f'"interventions": [{{"layer": 0, "feature": 1, "positions": [{BIG}]}}]'),
        ("read_features 1e30", "read_features", f'{EDIT}, "read_features": [[{BIG}, 0, 1]]'),
        ("constrained_layers 1e30", "constrained_layers", f'{EDIT}, "constrained_layers": [{BIG}]'),
    ]
    raw += [(f"value {v}", "value", f'"interventions": [{IV % ("set", v)}]') for v in NON_FINITE]
    raw += [(f"temperature {v}", "temperature", f'{EDIT}, "temperature": {v}') for v in (*NON_FINITE, "-1", "10.5")]
    raw += [(f"seed {v}", "seed", f'{EDIT}, "seed": {v}') for v in (2**64, 2**70, 2**63, -1, "NaN")]
    raw += [(f"{f} {v}", f, f'{EDIT}, "{f}": {v}') for f in ("top_k", "max_new_tokens") for v in (BIG, -1, "NaN")]
    cases = [Case(f"json {n}", "", f, ("{" + base + ", " + members + "}").encode()) for n, f, members in raw]
    cases.append(Case("json prompt lone surrogate", "", "prompt", f'{{"prompt": {LONE}, {EDIT}}}'.encode()))
    edit = [{"layer": 0, "feature": 1, "op": "set", "value": 1.0}]
    cases += [Case(f"msgpack value {v}", "", "value", packed({"prompt": "the cat sat", "interventions": [
        {"layer": 0, "feature": 1, "op": "set", "value": v}]}), MSGPACK_T) for v in (*MSGPACK_NON_FINITE, 1e308)]
    cases += [Case(f"msgpack temperature {v}", "", "temperature",
                   packed({"prompt": "the cat sat", "interventions": edit, "temperature": v}), MSGPACK_T)
              for v in MSGPACK_NON_FINITE]
    cases += [Case("msgpack seed 2**64-1", "", "seed",
                   packed({"prompt": "the cat sat", "interventions": edit, "seed": 2**64 - 1}), MSGPACK_T),
              Case("msgpack prompt invalid utf-8", "", "prompt",
                   packed({"prompt": INVALID_UTF8, "interventions": edit}), MSGPACK_T)]
    return [Case(f"{c.name} -> {route}", route, c.field, c.body, c.content_type)
            for route in INTERVENTION_ROUTES for c in cases]


def route_cases() -> list[Case]:
    """GET routes whose path or query is hostile; {graph} is replaced by a stored graph's id."""
    features = [f"/v1/features/{p}.json" for p in ("-5", "-1", DIGITS50, str(2 * (2 * INDEX_MAX + 1) ** 2))]
    features += [f"/v1/features/{a}/{b}" for a, b in (("-1", "0"), ("0", "-1"), ("-5", "-5"), (DIGITS50, "0"),
                                                      ("0", DIGITS50), (str(INDEX_MAX + 1), "0"))]
    cases = [Case(f"GET {p}", p, "feature", statuses=(404,)) for p in features]
    query = [("slug", "<script>alert(1)</script>"), ("slug", "%ED%A0%80"), ("slug", "a" * 129)]
    query += [(f, v) for f in ("node_threshold", "edge_threshold") for v in ("nan", "inf", "-inf", "1e400", "-0.1",
                                                                            "1.5")]
    cases += [Case(f"GET graph ?{f}={v}", f"/v1/graphs/{{graph}}?{f}={v}", f) for f, v in query]
    cases += [Case(f"GET graphs ?limit={v}", f"/v1/graphs?limit={v}", "limit") for v in (BIG, -1, "nan")]
    cases += [Case(f"GET ui {p}", f"/ui/{p}", "UI file", statuses=(404,))
              for p in ("%00", "a%00b.js", "..%2F..%2Fetc%2Fpasswd")]
    return cases


CASES = graph_cases() + intervention_cases() + route_cases()


# ----- the service -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """The tiny pair and its stores below a MARKER folder; layer 1 of the feature store is a corrupt file (an
    unexpected failure of a route)."""
    model_dir, tc_dir, store, features = marked_pair(tmp_path_factory.mktemp("hostile") / MARKER, [(0, 1), (1, 1)])
    (features / "features" / "layer_001.parquet").write_bytes(b"not a parquet file")
    return model_dir, tc_dir, store, features


@pytest.fixture(scope="module")
def service(pair, serve_url) -> str:
    """Base URL of the app on the tiny pair, deployed under PREFIX."""
    model_dir, tc_dir, store, features = pair
    return deploy_app(serve_url, "hostile", PREFIX, model=str(model_dir), transcoder=str(tc_dir), max_queued_requests=4,
                      max_prompt_tokens=64, graph_store=str(store), feature_store=str(features))


@pytest.fixture(scope="module")
def graph_id(service) -> str:
    """A stored graph's id, and proof that every route answers a well-formed request before the table is sent."""
    from attribute_ray.neuronpedia import cantor

    r = httpx.post(f"{service}/v1/graphs", json={"prompt": "the cat sat", "max_feature_nodes": 20}, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert httpx.get(f"{service}/v1/features/0/1", timeout=60).status_code == 200
    assert httpx.get(f"{service}/v1/features/{cantor(0, 1)}.json", timeout=60).json()["index"] == 1
    edit = {"prompt": "the cat sat", "interventions": [{"layer": 0, "feature": 1, "op": "set", "value": VALUE_MAX}],
            "max_new_tokens": 3, "temperature": 1.0, "seed": SEED_MAX}  # the largest accepted values work
    for route in INTERVENTION_ROUTES:
        answer = httpx.post(f"{service}{route}", json=edit, timeout=120)
        assert answer.status_code == 200, (route, answer.text[:300])
    return r.headers["x-graph-id"]


def _no_server_detail(text: str, pair) -> None:
    for secret in (MARKER, str(Path.home()), tempfile.gettempdir(), "Traceback", "RayTaskError", "pid="):
        assert secret not in text, (secret, text[:500])
    assert str(pair[0]) not in text


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_with_a_message_naming_the_field(case: Case, service, graph_id, pair) -> None:
    url = f"{service}{case.path.replace('{graph}', graph_id)}"
    if case.body is None:
        r = httpx.get(url, timeout=60)
    else:
        r = httpx.post(url, content=case.body, headers={"content-type": case.content_type}, timeout=60)
    assert r.status_code in case.statuses, (r.status_code, r.text[:500])
    detail = r.json()["detail"]  # a message, or pydantic's list of {loc, msg, type} (the field is in loc)
    assert case.field in (detail if isinstance(detail, str) else json.dumps(detail)), r.text[:500]
    _no_server_detail(r.text, pair)


def test_an_unexpected_failure_is_a_500_with_an_error_id_and_the_details_in_the_log(service, graph_id, pair) -> None:
    import ray

    r = httpx.get(f"{service}/v1/features/1/1", timeout=60)  # layer 1's file is corrupt
    assert r.status_code == 500, r.text[:300]
    body = r.json()
    assert set(body) == {"detail", "error_id"} and body["error_id"] in body["detail"]
    assert r.headers["x-error-id"] == body["error_id"]
    _no_server_detail(r.text, pair)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    logged = [p for p in logs.rglob("*.log") if body["error_id"] in p.read_text(errors="replace")]
    assert logged, f"error id {body['error_id']} is in no log under {logs}"
    assert any("v1/features/1/1" in p.read_text(errors="replace") for p in logged)  # the request is there


def test_the_service_still_answers_a_normal_graph(service, graph_id, pair) -> None:
    from attribute_ray.graph import Graph
    from attribute_ray.loading import load_tokenizer, tokenize

    body = {"prompt": "a dog ran home", "max_feature_nodes": 10}  # not stored yet: a new job on the same engine
    r = httpx.post(f"{service}/v1/graphs", json=body, headers={"accept": MSGPACK_T}, timeout=300)
    assert r.status_code == 200, r.text[:300]
    graph = Graph.from_msgpack(r.content)
    assert graph.n_pos == len(tokenize(load_tokenizer(str(pair[0])), body["prompt"]))
    assert httpx.get(f"{service}/v1/graphs/{graph_id}", params={"node_threshold": 1, "edge_threshold": 0},
                     timeout=60).status_code == 200  # the bounds themselves are accepted
    assert httpx.get(f"{service}/readyz", timeout=60).status_code == 200


# ----- the models' bounds, without Ray --------------------------------------------------------------------


def _refused(make, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        make()
    assert field in {str(part) for err in e.value.errors() for part in err["loc"]}, e.value


def _above(x: float) -> float:
    return math.nextafter(x, math.inf)


@pytest.mark.parametrize(("field", "lowest", "highest", "refused"), [
    ("max_n_logits", 1, 1000, (0, 1001)), ("max_feature_nodes", 1, MAX_FEATURE_NODES, (0, MAX_FEATURE_NODES + 1)),
    ("batch_size", 1, 65536, (0, 65537)), ("update_interval", 1, 10**6, (0, 10**6 + 1)),
    ("desired_logit_prob", math.ulp(0.0), 1.0, (0.0, _above(1.0))),
    ("node_threshold", 0.0, 1.0, (-math.ulp(0.0), _above(1.0))),
    ("edge_threshold", 0.0, 1.0, (-math.ulp(0.0), _above(1.0))),
])
def test_graph_settings_bounds(field: str, lowest, highest, refused) -> None:
    for ok in (lowest, highest):
        assert getattr(GraphSettings(**{field: ok}), field) == ok
        assert getattr(GraphRequest(prompt="x", **{field: ok}), field) == ok
    for bad in (*refused, math.nan, math.inf, -math.inf, float("1e400"), 10**30):
        _refused(lambda: GraphSettings(**{field: bad}), field)
        _refused(lambda: GraphRequest(prompt="x", **{field: bad}), field)


def test_graph_view_bounds_and_slug() -> None:
    assert GraphView(node_threshold=0.0, edge_threshold=1.0, slug="a" * 128).slug == "a" * 128
    _refused(lambda: GraphView(slug="a" * 129), "slug")
    _refused(lambda: GraphView(slug="<script>"), "slug")
    _refused(lambda: GraphView(node_threshold=math.nan), "node_threshold")


def test_intervention_bounds() -> None:
    for v in (VALUE_MAX, -VALUE_MAX):
        assert InterventionSpec(layer=INDEX_MAX, feature=INDEX_MAX, op="set", value=v).value == v
        assert SupernodeSpec(label="s", features=[(INDEX_MAX, INDEX_MAX)], value=v).value == v
    for bad in (_above(VALUE_MAX), -_above(VALUE_MAX), 1e308, -1e300, math.nan, math.inf):
        _refused(lambda: InterventionSpec(layer=0, feature=1, op="set", value=bad), "value")
        _refused(lambda: SupernodeSpec(label="s", features=[(0, 1)], value=bad), "value")
    _refused(lambda: InterventionSpec(layer=INDEX_MAX + 1, feature=0), "layer")
    _refused(lambda: InterventionSpec(layer=0, feature=INDEX_MAX + 1), "feature")
    assert InterventionSpec(layer=0, feature=0, positions=[-INDEX_MAX, INDEX_MAX]).positions == [-INDEX_MAX, INDEX_MAX]
    _refused(lambda: InterventionSpec(layer=0, feature=0, positions=[INDEX_MAX + 1]), "positions")


def test_intervention_request_bounds() -> None:
    ok = InterventionRequest(prompt="x \U0001F600", seed=SEED_MAX, temperature=10.0, top_k=100, max_new_tokens=256)
    assert (ok.seed, ok.temperature) == (SEED_MAX, 10.0)  # an astral character is valid Unicode
    for field, bad in [("seed", SEED_MAX + 1), ("seed", 2**64), ("seed", 2**70), ("seed", -1),
                       ("temperature", _above(10.0)), ("temperature", math.nan), ("temperature", -0.1),
                       ("top_k", 101), ("max_new_tokens", 257), ("prompt", "a\ud800"), ("tokens", [INDEX_MAX + 1]),
                       ("read_features", [(0, 0, INDEX_MAX + 1)]), ("constrained_layers", [INDEX_MAX + 1])]:
        _refused(lambda: InterventionRequest(**{"prompt": "x", field: bad}), field)
    _refused(lambda: GraphRequest(prompt="\udcff"), "prompt")
    _refused(lambda: GraphRequest(prompt="x", targets=["\ud800"]), "targets")


def test_library_interventions_refuse_the_same_values() -> None:
    from attribute_ray import ReplacementModel
    from attribute_ray.interventions import Intervention, generate_with_interventions
    from attribute_ray.tiny import tiny_model, transcoder_for

    assert Intervention(0, 1, "set", VALUE_MAX).value == VALUE_MAX
    for bad in (_above(VALUE_MAX), -1e300, 1e308, math.nan, math.inf):
        with pytest.raises(InterventionError, match="value"):
            Intervention(0, 1, "set", bad)
    model, tok = tiny_model("llama", 0)
    rm = ReplacementModel(model, tok, transcoder_for(model))
    assert len(generate_with_interventions(rm, [1, 2], [], max_new_tokens=2, temperature=1.0, seed=SEED_MAX)[1]) <= 2
    for seed in (SEED_MAX + 1, 2**64, -1):
        with pytest.raises(InterventionError, match="seed"):
            generate_with_interventions(rm, [1, 2], [], max_new_tokens=2, temperature=1.0, seed=seed)


def test_route_parameter_checks_at_their_bounds() -> None:
    from fastapi import HTTPException

    from attribute_ray.neuronpedia import cantor
    from deployments.checks import MAX_CANTOR_ID, cantor_address, feature_address

    assert feature_address(INDEX_MAX, INDEX_MAX) == (INDEX_MAX, INDEX_MAX)
    assert cantor_address(MAX_CANTOR_ID) == (INDEX_MAX, INDEX_MAX)
    assert cantor_address(cantor(3, 7)) == (3, 7)
    for call in (lambda: feature_address(INDEX_MAX + 1, 0), lambda: feature_address(0, -1),
                 lambda: cantor_address(MAX_CANTOR_ID + 1), lambda: cantor_address(-1), lambda: cantor_address(10**50)):
        with pytest.raises(HTTPException) as e:
            call()
        assert e.value.status_code == 404 and "feature" in e.value.detail
