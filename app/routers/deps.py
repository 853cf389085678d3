"""Shared route dependencies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from app.core.config import Settings
from app.services.queue.fleet import FleetService
from app.services.queue.queue_service import QueueService


async def get_service(request: Request) -> QueueService:
    service: QueueService = request.app.state.queue_service
    return service


async def get_fleet(request: Request) -> FleetService:
    fleet: FleetService = request.app.state.fleet
    return fleet


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


Service = Annotated[QueueService, Depends(get_service)]
Fleet = Annotated[FleetService, Depends(get_fleet)]
AppSettings = Annotated[Settings, Depends(get_settings_dep)]


class ErrorDetail(BaseModel):
    """An error answer: what went wrong, in words."""

    detail: str


# Answers every authenticated route can give besides its own; documented once, for OpenAPI.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "A request body that is not JSON (or not UTF-8)"},
    401: {"model": ErrorDetail, "description": "Missing, malformed, expired or wrongly signed token "
          "(with `WWW-Authenticate: Bearer`)"},
    503: {"model": ErrorDetail, "description": "The queue store (Redis) is unreachable; retry after `Retry-After`"},
}
CREATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorDetail, "description": "Request body larger than MAX_BODY_BYTES"},
    429: {"model": ErrorDetail, "description": "Past the user's admission limits; retry after `Retry-After`"},
}
