"""Image download: with the owner's bearer token, or by a signed URL (for <img> tags)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.core.security import bearer_scheme, user_from_credentials
from app.routers.deps import COMMON_RESPONSES, Service
from app.services.queue.queue_service import ImageSignature

router = APIRouter(tags=["images"], responses=COMMON_RESPONSES)

CACHE_CONTROL = "private, max-age=3600"  # an image of a given attempt never changes
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


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
    exp: Annotated[int | None, Query()] = None,
    sig: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """A succeeded image's bytes."""
    if exp is not None and sig is not None:
        image = await service.image_for(queue_id, index, signature=ImageSignature(exp, sig))
    else:
        user = user_from_credentials(request, await bearer_scheme(request))
        image = await service.image_for(queue_id, index, user_id=user.id)
    data = await image.read()
    ext = EXTENSIONS.get(image.content_type, "bin")
    return Response(
        data,
        media_type=image.content_type,
        headers={
            "Cache-Control": CACHE_CONTROL,
            "Content-Disposition": f'inline; filename="{queue_id}-{index}.{ext}"',
            "X-Content-Type-Options": "nosniff",
        },
    )
