"""Domain errors, and the one place that turns them (and Redis failures) into HTTP answers."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger("imagequeue.api")

REDIS_RETRY_AFTER_SECONDS = 5


class ImageQueueError(Exception):
    """Base of every error a service raises on purpose."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ImageQueueError):
    status_code = 404


class Conflict(ImageQueueError):
    status_code = 409


class Unprocessable(ImageQueueError):
    """A 422 in FastAPI's shape: `detail` is a list of {loc, msg, type}."""

    status_code = 422

    def __init__(self, msg: str, loc: tuple[str | int, ...] = ("body",)) -> None:
        super().__init__(msg)
        self.loc = loc


class TooManyRequests(ImageQueueError):
    status_code = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Unauthorized(ImageQueueError):
    status_code = 401


class ServiceUnavailable(ImageQueueError):
    """A backing service (the image store) cannot be reached, or is busy; the request may be tried again
    after `retry_after` seconds."""

    status_code = 503

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class SafeJSONResponse(JSONResponse):
    """JSON that renders whatever text it holds: an error may echo input that is not valid Unicode
    (a lone surrogate), which plain UTF-8 encoding refuses; then such characters go out as JSON escapes."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        try:
            return SafeJSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
        except (ValueError, RecursionError):
            # The refused input itself cannot be written back as JSON (NaN, Infinity, nesting too deep
            # to encode): the errors go without it.
            bare = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in errors]
            return SafeJSONResponse({"detail": jsonable_encoder(bare)}, status_code=422)

    @app.exception_handler(ImageQueueError)
    async def _domain(_: Request, exc: ImageQueueError) -> JSONResponse:
        headers: dict[str, str] = {}
        body: dict[str, object] = {"detail": exc.detail}
        if isinstance(exc, Unprocessable):
            body = {"detail": [{"loc": list(exc.loc), "msg": exc.detail, "type": "value_error"}]}
        if isinstance(exc, TooManyRequests | ServiceUnavailable):
            headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        return SafeJSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    @app.exception_handler(redis.exceptions.BusyLoadingError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return JSONResponse(
            {"detail": "The queue store (Redis) is unavailable; try again in a few seconds."},
            status_code=503,
            headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)},
        )
