"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.metrics import ApiMetrics
from app.routers.deps import Fleet

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, fleet: Fleet) -> Response:
    """The API's metrics and the fleet's figures from Redis, in Prometheus text format."""
    api_metrics: ApiMetrics = request.app.state.metrics
    await fleet.refresh_metrics(api_metrics)
    return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)
