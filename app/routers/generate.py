"""One image, synchronously when it is quick enough."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from app.core.security import CurrentUser
from app.models.queue import GenerateRequest, GenerateResult, QueueStatus
from app.routers.deps import COMMON_RESPONSES, CREATE_RESPONSES, AppSettings, Service

router = APIRouter(tags=["generate"], responses=COMMON_RESPONSES)


@router.post(
    "/generate",
    response_model=GenerateResult,
    responses={
        202: {"model": QueueStatus, "description": "Not done within `wait`: poll the queue"},
        **CREATE_RESPONSES,
    },
)
async def generate(
    body: GenerateRequest,
    user: CurrentUser,
    service: Service,
    settings: AppSettings,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for the image")] = 60,
) -> GenerateResult | JSONResponse:
    """Generate one image as a high-priority one-image queue; 202 if it takes longer than `wait`."""
    created = await service.generate(user.id, body)
    status = await service.wait_terminal(user.id, created.queue_id, min(wait, settings.max_generate_wait_seconds))
    if status.finished_at and status.images:
        return GenerateResult(queue_id=status.queue_id, image=status.images[0])
    return JSONResponse(status.model_dump(mode="json"), status_code=202)
