"""Request bodies in, results out: JSON or msgpack, chosen by the request's Content-Type and Accept headers."""

import json
from typing import TypeVar

import msgpack
from fastapi import HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from attribute_ray.graph import Graph
from attribute_ray.memory import STREAM_CHUNK, release_memory
from attribute_ray.settings import PruneSettings
from attribute_ray.store import GraphStore

MSGPACK = "application/msgpack"
M = TypeVar("M", bound=BaseModel)


def wants_msgpack(request: Request) -> bool:
    return MSGPACK in request.headers.get("accept", "")


async def parse_body(request: Request, model: type[M], max_bytes: int) -> M:
    """The body as `model`: 413 when larger than `max_bytes`, 400 when undecodable, 422 naming invalid fields.

    JSON's NaN / Infinity and msgpack's non-finite floats parse, and the models refuse them by field name; invalid
    UTF-8 in a msgpack string decodes to lone surrogates, which the models refuse the same way as JSON's "\ud800"."""
    body = await request.body()
    if len(body) > max_bytes:
        raise HTTPException(413, f"request body of {len(body)} bytes exceeds {max_bytes}")
    try:
        if MSGPACK in request.headers.get("content-type", ""):
            raw = msgpack.unpackb(body, raw=False, unicode_errors="surrogateescape")
        else:
            raw = json.loads(body or b"null")
    except Exception as e:  # noqa: BLE001 - any decode failure is the client's
        raise HTTPException(400, f"malformed request body: {type(e).__name__}: {e}") from e
    if not isinstance(raw, dict):
        raise HTTPException(422, "request body must be an object")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise unprocessable(e) from e


def unprocessable(e: ValidationError) -> HTTPException:
    """422 whose detail lists pydantic's errors (field, message), as FastAPI's own validation does; without the
    offending input, which may be NaN, a lone surrogate or megabytes long."""
    return HTTPException(422, json.loads(e.json(include_url=False, include_input=False)))


def result_response(request: Request, result: dict) -> Response:
    if wants_msgpack(request):
        return Response(msgpack.packb(result, use_bin_type=True), media_type=MSGPACK)
    return JSONResponse(result)


def stored_graph_response(store: GraphStore, key: str) -> Response | None:
    """Graph `key`'s msgpack streamed from the store (never read whole into memory); None when absent."""
    headers = {"X-Graph-Id": key}
    path = store.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=MSGPACK, headers=headers) if key in store else None
    f = store.open(key)
    if f is None:
        return None

    def pieces():
        with f:
            while piece := f.read(STREAM_CHUNK):
                yield piece

    return StreamingResponse(pieces(), media_type=MSGPACK, headers=headers)


def graph_response(data: bytes, key: str, *, msgpack_wanted: bool, prune: PruneSettings, pruned: bool = False,
                   slug: str | None = None, scan: str | None = None, feature_json_base_url: str | None = None) -> Response:
    """A stored graph's msgpack bytes (docs/formats.md §e for JSON) as the client asked: msgpack as stored, or
    its pruned view when `pruned`; otherwise Neuronpedia JSON, always pruned. Decodes: run it in a thread."""
    headers = {"X-Graph-Id": key}
    try:
        if msgpack_wanted:
            if pruned:
                data = Graph.from_msgpack(data).pruned(prune.node_threshold, prune.edge_threshold).to_msgpack()
            return Response(data, media_type=MSGPACK, headers=headers)
        graph_json = Graph.from_msgpack(data).to_neuronpedia_json(
            slug or key[:16], node_threshold=prune.node_threshold, edge_threshold=prune.edge_threshold, scan=scan,
            feature_json_base_url=feature_json_base_url)
        return JSONResponse(graph_json, headers=headers)
    finally:
        del data
        release_memory()  # the decoded rows were the size of the graph: give their pages back
