"""Shared route dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.core.config import Settings
from app.services.queue.queue_service import QueueService


async def get_service(request: Request) -> QueueService:
    service: QueueService = request.app.state.queue_service
    return service


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


Service = Annotated[QueueService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings_dep)]
