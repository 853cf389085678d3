"""Prometheus scrape endpoint."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.errors import Unauthorized
from app.core.metrics import ApiMetrics
from app.routers.deps import AppSettings, Fleet

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, fleet: Fleet, settings: AppSettings) -> Response:
    """The API's metrics and the fleet's figures from Redis, in Prometheus text format."""
    _check_scraper(request, settings.metrics_token)
    api_metrics: ApiMetrics = request.app.state.metrics
    await fleet.refresh_metrics(api_metrics)
    return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _check_scraper(request: Request, expected: str | None) -> None:
    """With METRICS_TOKEN set, a scrape must send it as a bearer token (a user's JWT is not enough)."""
    if not expected:
        return
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), expected.encode()):
        raise Unauthorized("/metrics needs the scrape token (Authorization: Bearer <METRICS_TOKEN>)")
