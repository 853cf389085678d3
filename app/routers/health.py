"""Liveness and readiness."""

from __future__ import annotations

import asyncio

import redis.exceptions
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.models.queue import Health
from app.routers.deps import Service

router = APIRouter(tags=["health"])

HEALTH_REDIS_TIMEOUT_SECONDS = 2.0


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(service: Service) -> Health | JSONResponse:
    """Redis reachability and live workers; 503 when Redis is unreachable."""
    try:
        async with asyncio.timeout(HEALTH_REDIS_TIMEOUT_SECONDS):
            await service.store.ping()
            workers = await service.store.workers()
            models: dict[str, dict[str, int]] = {}
            for name in service.catalog.models:
                serving = [w for w in workers if name in w.get("models", [])]
                models[name] = {
                    "workers": len(serving),
                    "concurrency": sum(int(w.get("concurrency", 0)) for w in serving),
                    "pending": await service.store.claimable(name),
                }
    except (redis.exceptions.RedisError, TimeoutError):
        body = Health(status="degraded", redis=False, workers=0, warnings=["Redis is unreachable"])
        return JSONResponse(body.model_dump(), status_code=503)
    warnings = [f"no live worker serves model {n!r}" for n, m in models.items() if m["workers"] == 0]
    return Health(
        status="ok",
        redis=True,
        workers=len(workers),
        worker_concurrency=sum(int(w.get("concurrency", 0)) for w in workers),
        models=models,
        warnings=warnings,
    )


@router.get("/ready", responses={503: {"description": "Redis unreachable"}})
async def ready(service: Service) -> JSONResponse:
    """Readiness for load balancers: 200 when this API instance can serve requests."""
    try:
        async with asyncio.timeout(HEALTH_REDIS_TIMEOUT_SECONDS):
            await service.store.ping()
    except (redis.exceptions.RedisError, TimeoutError):
        return JSONResponse({"ready": False, "detail": "Redis is unreachable"}, status_code=503)
    return JSONResponse({"ready": True})
