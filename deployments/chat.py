"""A small OpenAI-compatible chat-completions endpoint over a local transformers chat model, as a Ray Serve app.

    python -m deployments.chat --model demo --port 8001        # SmolLM2-135M-Instruct of the demo preset, offline
    python -m deployments.chat --model PATH --port 8001 --route-prefix /chat
    serve run deployments.chat:chat_builder model=PATH

Routes: ``POST /v1/chat/completions`` (OpenAI's request and response JSON, no streaming), ``GET /v1/models``,
``GET /healthz`` and, when `log_requests` > 0, ``GET /debug/requests`` (the last validated requests, for tests).
Bad input is a 400 (404 for an unknown model) with OpenAI's ``{"error": {...}}`` body. Generation is
`attribute_ray.explanations.llm.generate_reply` (chat template, greedy at temperature 0) in a worker thread,
one at a time per replica. It serves the `llm` explainer offline and in tests; on a cluster use vLLM or Ray
Serve LLM, which speak the same API.
No `from __future__ import annotations` here: FastAPI would misread the route signatures (docs/ray-notes.md #1).
"""

import argparse
import asyncio
import os
import signal
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from attribute_ray.config_args import add_arguments, from_arguments
from attribute_ray.devices import DtypeName


class ChatArgs(BaseModel):
    """What the chat endpoint serves and with which resources (the builder's one argument)."""

    model: str = Field(description="local folder or cached hub id of a transformers chat model; 'demo' = the demo "
                       "preset's SmolLM2-135M-Instruct (offline)")
    name: str | None = Field(None, description="model name requests must send and /v1/models lists; default: a "
                             "local folder's name, else `model` as given")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible")
    dtype: DtypeName = Field("auto", description="auto: bfloat16 on a GPU, float32 on the CPU")
    num_cpus: float = Field(1.0, ge=0, description="per replica; also its torch thread count (at least 1)")
    num_gpus: float = Field(0.0, ge=0, description="per replica")
    num_replicas: int = Field(1, ge=1, description="replicas of the model")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    log_requests: int = Field(0, ge=0, description="keep the last N validated requests at GET /debug/requests (0: off)")

    def served_name(self) -> str:
        """`name`, else a local folder's name, else the reference as given (a hub id, as vLLM names it; 'demo')."""
        if self.name:
            return self.name
        return Path(self.model).name if os.path.isdir(self.model) else self.model


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="only text parts are accepted")
    text: str = Field(description="the part's text")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(description="who speaks")
    content: str | list[TextPart] = Field(description="the message: a string or a list of text parts")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """OpenAI's chat-completions request; fields this server does not use (top_p, user, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the served model's name (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (capped by max_tokens_limit)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float = Field(1.0, ge=0, le=2, description="sampling temperature; 0: greedy")
    seed: int | None = Field(None, description="sampling seed")
    stop: str | list[str] | None = Field(None, description="strings that end the reply")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: Literal[False] = Field(False, description="streaming is not supported")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


@serve.deployment(name="ChatModel", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class ChatModel:
    def __init__(self, args: ChatArgs):
        import torch

        from attribute_ray.devices import resolve_device, resolve_dtype
        from attribute_ray.loading import load_model

        torch.set_num_threads(max(1, int(args.num_cpus)))
        device = resolve_device(args.device)
        self.model, self.tokenizer = load_model(_model_path(args.model), device=device,
                                                dtype=resolve_dtype(args.dtype, device))
        self.args, self.name, self.created = args, args.served_name(), int(time.time())
        self.lock = threading.Lock()  # one generation at a time: the model is not shared across threads
        self.log: deque[dict] = deque(maxlen=max(1, args.log_requests))

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="attribute-ray chat", description="OpenAI-compatible chat completions over a local model.")
        app.get("/healthz")(self.healthz)
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.completions)
        if self.args.log_requests:
            app.get("/debug/requests")(self.requests)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
            return _error(400, problems or "invalid request")

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

        return app

    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "attribute-ray"}]}

    async def requests(self) -> list[dict]:
        return list(self.log)

    async def completions(self, body: ChatRequest) -> dict:
        from attribute_ray.explanations.llm import generate_reply

        if body.model != self.name:
            raise HTTPException(404, f"model {body.model!r} is not served here; this endpoint serves {self.name!r}")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(256, self.args.max_tokens_limit)
        if max_tokens > self.args.max_tokens_limit:
            raise HTTPException(400, f"max_tokens {max_tokens} is above this server's limit {self.args.max_tokens_limit}")
        if self.args.log_requests:
            self.log.append(body.model_dump(mode="json"))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

        def work():
            with self.lock:
                return generate_reply(self.model, self.tokenizer, messages, max_new_tokens=max_tokens,
                                      temperature=body.temperature, seed=body.seed or 0, stop=stop)

        reply = await asyncio.to_thread(work)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
        }


def _model_path(model: str) -> str:
    if model == "demo":
        from attribute_ray.presets import smollm2_instruct_dir

        return str(smollm2_instruct_dir())
    return model


def chat_builder(args) -> serve.Application:
    """`args`: a `ChatArgs` or a dict of its fields (``serve run deployments.chat:chat_builder model=PATH``)."""
    args = args if isinstance(args, ChatArgs) else ChatArgs.model_validate(args)
    return ChatModel.options(ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
                             num_replicas=args.num_replicas).bind(args)


def main(argv: list[str] | None = None) -> int:
    """Serve the chat app on a local Ray (or the cluster at RAY_ADDRESS) until SIGINT / SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m deployments.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port of the HTTP proxy (default 8001)")
    parser.add_argument("--route-prefix", default="/", help="where the app is mounted (default /)")
    add_arguments(parser, ChatArgs)
    ns = parser.parse_args(argv)
    args = from_arguments(ChatArgs, ns)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    try:
        if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):  # no resource arguments (docs/ray-notes.md #7)
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        elif not ray.is_initialized():  # our own lean Ray: never silently join (and later shut down) another one
            ray.init(address="local", object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(chat_builder(args), name="chat", route_prefix=ns.route_prefix)
        base = f"http://{ns.host}:{ns.port}{ns.route_prefix.rstrip('/')}"
        print(f"chat endpoint for {args.served_name()!r} at {base}/v1/chat/completions. Ctrl-C to stop.", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    except KeyboardInterrupt:
        pass
    print("stopping ...", flush=True)
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
