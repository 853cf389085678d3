"""Image download: with the owner's bearer token, or by a signed URL (for <img> tags)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.core.errors import NotFound
from app.core.security import bearer_scheme, check_image_signature, user_from_credentials
from app.routers.deps import COMMON_RESPONSES, AppSettings, Service
from app.services.queue.store import user_key

router = APIRouter(tags=["images"], responses=COMMON_RESPONSES)


@router.get(
    "/images/{queue_id}/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "No such image"}},
)
async def get_image(
    queue_id: str,
    index: int,
    request: Request,
    service: Service,
    settings: AppSettings,
    exp: Annotated[int | None, Query()] = None,
    sig: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """A succeeded image's bytes."""
    found = await service.image(queue_id, index)
    if found is None:
        raise NotFound("image not found")
    data, content_type, attempt, owner = found
    if exp is not None and sig is not None:
        if not check_image_signature(settings, queue_id, index, attempt, exp, sig):
            raise NotFound("image not found (or the link expired)")
        cache = "private, max-age=3600"
    else:
        user = user_from_credentials(request, await bearer_scheme(request))
        if user_key(user.id) != owner:
            raise NotFound("image not found")
        cache = "private, max-age=3600"
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(content_type, "bin")
    return Response(
        data,
        media_type=content_type,
        headers={
            "Cache-Control": cache,
            "Content-Disposition": f'inline; filename="{queue_id}-{index}.{ext}"',
            "X-Content-Type-Options": "nosniff",
        },
    )
