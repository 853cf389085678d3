"""The FastAPI application: create_app() (tests, or `uvicorn app.main:create_app --factory`), and `app` for
`uvicorn app.main:app`.

Importing this module reads no setting and connects to nothing: `app` is built on first access, which
is when uvicorn loads it to serve, and Redis is connected when the server starts (the lifespan).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis
import redis.asyncio
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import Settings, get_settings
from app.core.errors import install_error_handlers
from app.core.local_auth import LocalSecret, with_local_secret
from app.core.logging import configure_logging
from app.core.metrics import ApiMetrics, install_metrics
from app.core.security import TokenCache, sign_image
from app.routers import events, generate, health, images, metrics, models, queues
from app.services.images import open_store
from app.services.images.serving import ImageServer
from app.services.models import load_catalog
from app.services.queue.fleet import FleetService
from app.services.queue.queue_service import QueueService
from app.services.queue.store import REDIS_ENCODING_ERRORS, QueueStore
from app.services.queue.sweep import sweep_forever
from app.services.queue.tickets import Tickets, ticket_timeout

STATIC_DIR = Path(__file__).with_name("static")
STORE_ANNOUNCE_SECONDS = 60.0
log = logging.getLogger("imagequeue.api")
# The web client loads nothing from elsewhere and is never framed; it puts user text in the page only
# as text, and this keeps a slip from becoming script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ClientFiles(StaticFiles):
    """The web client's files, revalidated on each load so a page never mixes modules of two versions."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        # Browsers run module scripts only when served as JavaScript, whatever the host's MIME table says.
        if path.endswith(".js") and response.status_code == 200:
            response.headers["Content-Type"] = "text/javascript; charset=utf-8"
        return response


def page_headers(settings: Settings) -> dict[str, str]:
    """The web client's headers; images may also come from the image store's public endpoint."""
    if not settings.s3_public_url:
        return PAGE_HEADERS
    parts = urlsplit(settings.s3_public_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    csp = PAGE_HEADERS["Content-Security-Policy"].replace("img-src 'self'", f"img-src 'self' {origin}")
    return {**PAGE_HEADERS, "Content-Security-Policy": csp}


def redis_clients(settings: Settings) -> tuple[redis.asyncio.Redis, redis.Redis]:
    """An async client for the API's own work and a sync one for RQ; both fail fast when Redis is down."""
    url = settings.effective_redis_url
    # A blocking pool: past max_connections a request waits (briefly) for a free connection
    # instead of failing at once.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_socket_timeout,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        health_check_interval=15,
        # One retry after a lost connection (Redis restarted), none after a timeout: a Redis that
        # hangs answers 503 within one socket timeout, and a script that may have run is not run again.
        retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(redis.ConnectionError,)),
        encoding_errors=REDIS_ENCODING_ERRORS,
    )
    async_client = redis.asyncio.Redis(connection_pool=pool)
    sync_client = redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(redis.ConnectionError,)),
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        health_check_interval=15,
        encoding_errors=REDIS_ENCODING_ERRORS,
    )
    return async_client, sync_client


class BodySizeLimit:
    """413 for request bodies over the configured size, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": _too_large(self.max_bytes)}, status_code=413)
        await response(scope, receive, send)


def _too_large(max_bytes: int) -> str:
    return f"request body larger than {max_bytes} bytes"


class _TooLarge(HTTPException):
    """Raised while the body is read (a chunked body has no Content-Length to check first). An
    HTTPException, because FastAPI turns any other error met reading the body into a 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status_code=413, detail=_too_large(max_bytes))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application, with `settings` or the environment's; on a developer machine that set no
    JWT_SECRET, with the local one. An unusable configuration exits with its reason."""
    settings, local = with_local_secret(settings or get_settings())
    try:
        settings.check_auth()
        configure_logging(settings.log_level, "api")
        catalog = load_catalog(settings)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"imagequeue: {exc}") from None
    if local is not None:
        _announce(local)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_client, sync_client = redis_clients(settings)
        store = QueueStore(async_client)

        def image_url(queue_id: str, index: int, attempt: int, expires: int) -> str:
            signature = sign_image(settings, queue_id, index, attempt, expires)
            return f"/images/{queue_id}/{index}?a={attempt}&exp={expires}&sig={signature}"

        try:
            image_store = open_store(settings, async_client)
        except ValueError as exc:
            raise SystemExit(f"imagequeue: {exc}") from None
        images = ImageServer(image_store, store.blob, store.gc_recheck,
                             thumbnail_wait=settings.thumbnail_wait_seconds)
        tickets = Tickets(sync_client, ticket_timeout(settings))
        app.state.queue_service = QueueService(store, tickets, settings, catalog, image_url, images)
        app.state.fleet = FleetService(store, catalog, images)
        background = [
            asyncio.create_task(_announce_image_store(app.state.fleet)),
            # Workers sweep too; the API's keeps expired queues' objects going while no worker runs.
            asyncio.create_task(sweep_forever(image_store, store, settings.image_store_sweep_seconds,
                                              {"sweeper": "api"})),
        ]
        log.info("api ready: models %s, redis %s, images in %s", ", ".join(catalog.models),
                 _redacted(settings.effective_redis_url), image_store.location)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            images.close()
            await image_store.aclose()
            await async_client.aclose()
            sync_client.close()

    app = FastAPI(
        title="imagequeue",
        version="1.0.0",
        summary="A queue service for batch image generation",
        description="Batches of image jobs on Redis + RQ, with live progress, cancel and history. "
        "Authenticate with `Authorization: Bearer <JWT>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.token_cache = TokenCache()
    app.state.catalog = catalog
    install_error_handlers(app)
    api_metrics = ApiMetrics()
    app.state.metrics = api_metrics
    install_metrics(app, api_metrics)
    for module in (queues, generate, images, events, models, health, metrics):
        app.include_router(module.router)

    if (STATIC_DIR / "index.html").exists():
        app.mount("/static", ClientFiles(directory=STATIC_DIR), name="static")

        @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html", headers=page_headers(settings))

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app


async def _announce_image_store(service: FleetService) -> None:
    """Keeps telling workers which image store this API reads (a worker writing elsewhere says so)."""
    while True:
        try:
            await service.announce_image_store()
        except redis.RedisError as exc:
            log.debug("could not announce the image store: %s", exc)
        await asyncio.sleep(STORE_ANNOUNCE_SECONDS)


def _redacted(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _announce(local: LocalSecret) -> None:
    where = f"generated in {local.path}" if local.created else f"kept in {local.path}"
    print(
        f"imagequeue: no JWT_SECRET is set, so tokens are signed with the local secret {where} "
        "(for development; the container images refuse to start without JWT_SECRET).\n"
        "imagequeue: get a token with:  python -m app.cli token USER",
        file=sys.stderr,
        flush=True,
    )


def __getattr__(name: str) -> FastAPI:
    """`app`, built once on first access (PEP 562): importing the module creates nothing."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals()["app"] = create_app()
    return built
