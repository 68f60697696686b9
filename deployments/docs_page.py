"""The service's API documentation, offline: the OpenAPI document with every request model, and Swagger UI at
``/docs`` from the assets PyPI ``fastapi-offline`` ships (no CDN, no validator badge). ``/redoc`` is off: ReDoc's
bundle always fetches its vendor's logo from the web.

The POST routes read their bodies themselves (JSON or msgpack, deployments/encoding.py), so FastAPI cannot infer the
body model: a route passes ``openapi_extra=request_body(Model)``, and `documented_app` puts the model's schema
(and the models it nests) into the document's ``components/schemas``.
"""

from importlib.resources import files

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deployments.encoding import MSGPACK

ASSETS = files("fastapi_offline") / "static"
ASSET_ROUTE = "/docs/assets"
ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}
COMPONENTS = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` of a route whose body is `model`, sent as JSON or msgpack (a ``$ref`` into the components)."""
    schema = {"$ref": COMPONENTS.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {t: {"schema": schema} for t in ("application/json", MSGPACK)}}}


def documented_app(request_models: tuple[type[BaseModel], ...], **fastapi_kw) -> FastAPI:
    """A FastAPI app (`fastapi_kw`: title, version, ...) whose document holds `request_models`' schemas and whose
    /docs page loads nothing from outside the app."""
    app = FastAPI(docs_url=None, redoc_url=None, **fastapi_kw)
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generate()  # FastAPI's, cached in app.openapi_schema; completed in place
            _, defs = models_json_schema([(m, "validation") for m in request_models], ref_template=COMPONENTS)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in defs.get("$defs", {}).items():
                schemas.setdefault(name, schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # the app's route prefix
        document, assets = f"{root}{app.openapi_url}", f"{root}{ASSET_ROUTE}"
        return get_swagger_ui_html(openapi_url=document, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js", swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon.png", swagger_ui_parameters={"validatorUrl": None})

    @app.get(ASSET_ROUTE + "/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSET_TYPES:
            raise HTTPException(404, f"no documentation asset {name!r}")
        return FileResponse(str(ASSETS / name), media_type=ASSET_TYPES[name], headers={"Cache-Control": "max-age=86400"})

    return app
