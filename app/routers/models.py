"""The model catalogue with live figures."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.core.security import CurrentUser
from app.routers.deps import COMMON_RESPONSES, Fleet

router = APIRouter(tags=["models"], responses=COMMON_RESPONSES)


@router.get("/models")
async def list_models(_: CurrentUser, fleet: Fleet) -> dict[str, Any]:
    """Configured models: provider, live workers and their concurrency, pending images, recent images/s, health."""
    return await fleet.models_overview()
