"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.models.queue import Health
from app.routers.deps import Fleet

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(fleet: Fleet) -> Health | JSONResponse:
    """Redis reachability and live workers; 503 when Redis is unreachable."""
    report = await fleet.health()
    if not report.redis:
        return JSONResponse(report.model_dump(), status_code=503)
    return report


@router.get("/ready", responses={503: {"description": "Redis unreachable"}})
async def ready(fleet: Fleet) -> JSONResponse:
    """Readiness for load balancers: 200 when this API instance can serve requests."""
    if not await fleet.ready():
        return JSONResponse({"ready": False, "detail": "Redis is unreachable"}, status_code=503)
    return JSONResponse({"ready": True})
