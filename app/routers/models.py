"""The model catalogue with live figures."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.core.security import CurrentUser
from app.routers.deps import COMMON_RESPONSES, Service

router = APIRouter(tags=["models"], responses=COMMON_RESPONSES)

UNHEALTHY_WINDOW_MS = 60_000


@router.get("/models")
async def list_models(_: CurrentUser, service: Service) -> dict[str, Any]:
    """Configured models: provider, live workers and their concurrency, pending images, recent images/s, health."""
    store, catalog = service.store, service.catalog
    workers = await store.workers()
    inflight = await store.inflight()
    out = []
    for model in catalog.models.values():
        serving = [w for w in workers if model.name in w.get("models", [])]
        health = await store.provider_health(model.name)
        ok_at, error_at = int(health.get("ok_at", 0)), int(health.get("error_at", 0))
        healthy: bool | None = None
        if ok_at or error_at:
            healthy = ok_at >= error_at
        out.append({
            "name": model.name,
            "provider": model.provider,
            "default": model.name == catalog.default,
            "max_concurrency": model.max_concurrency or None,
            "workers": len(serving),
            "concurrency": sum(int(w.get("concurrency", 0)) for w in serving),
            "pending": await store.claimable(model.name),
            "running": max(0, inflight.get(model.name, 0)),
            "images_per_second": round(await store.throughput(model.name), 2),
            "healthy": healthy,
            "last_error": health.get("error") if healthy is False else None,
        })
    return {"default": catalog.default, "models": out}
