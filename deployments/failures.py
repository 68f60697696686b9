"""What a client learns of an unexpected failure: a short message with an error id, never the Ray error text,
traceback, pid, node IP or a server path; those go to the server log under the same id."""

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("ray.serve")
RETRY_AFTER = {"Retry-After": "2"}  # seconds a client should wait before retrying a 503


class EngineBusy(Exception):
    """No engine can take the work now (its queue is full, or no replica runs): a 503 with Retry-After."""


class Refused(Exception):
    """The request does not fit the engine's memory budget (docs/memory.md): a 413 naming the limit and the
    smallest change that would fit."""


class InternalError(Exception):
    """An unexpected failure as clients see it (its message is safe to return); `error_id` finds it in the log."""

    def __init__(self, message: str, error_id: str = ""):
        super().__init__(message)
        self.error_id = error_id


def public_failure(what: str, e: BaseException, context: str = "") -> InternalError:
    """Log `e` in full (and `context`, e.g. the request line) under a new error id; the `InternalError` to raise
    instead ("`what` failed (error id ...)")."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s failed (error id %s)%s: %s: %s", what, error_id, f" [{context}]" if context else "",
              type(e).__name__, e, exc_info=e)
    return InternalError(f"{what} failed (error id {error_id}; the server log has the details)", error_id)


def handle_unexpected(app: FastAPI) -> None:
    """Answer any exception no route turned into an HTTP error with a 500 whose body is only the public message
    and its error id (`{"detail": ..., "error_id": ...}`); the traceback goes to the server log."""

    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        failure = public_failure("request", e, context=f"{request.method} {request.url.path}")
        return JSONResponse({"detail": str(failure), "error_id": failure.error_id}, status_code=500,
                            headers={"X-Error-Id": failure.error_id})

    async def busy(request: Request, e: Exception) -> JSONResponse:  # no engine free now: come back, never a 500
        return JSONResponse({"detail": str(e)}, status_code=503, headers=RETRY_AFTER)

    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(EngineBusy, busy)
