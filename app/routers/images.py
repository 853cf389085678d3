"""Image download: with the owner's bearer token, or by a signed URL (for <img> tags)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.background import BackgroundTask

from app.core.errors import NotFound, ServiceUnavailable, Unauthorized
from app.core.security import bearer_scheme, user_from_credentials
from app.routers.deps import COMMON_RESPONSES, AppSettings, Service
from app.services.images import RangeNotSatisfiable, StoreUnavailable, parse_range
from app.services.images.serving import ImageGone, ThumbnailBusy
from app.services.queue.queue_service import ImageSignature

router = APIRouter(tags=["images"], responses=COMMON_RESPONSES)

# An object is never rewritten (a new attempt gets a new key), so a browser may keep it for as long
# as its URL lives; private, since URLs are per user.
CACHE_CONTROL = "private, max-age=31536000, immutable"
REDIRECT_CACHE_CONTROL = "private, max-age=60"
# A preview URL names one preview (?v=, the count so far), but the route answers with the latest.
PREVIEW_CACHE_CONTROL = "private, max-age=30"
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


@dataclass(frozen=True, slots=True)
class ImageAccess:
    """Who asks for an image: its owner (by the bearer token) or the holder of a signed URL."""

    user_id: str | None = None
    signature: ImageSignature | None = None


async def image_access(
    request: Request,
    exp: Annotated[int | None, Query()] = None,
    sig: Annotated[str | None, Query(max_length=64)] = None,
    a: Annotated[int | None, Query(ge=0, le=2**31, description="the attempt a signed URL binds")] = None,
) -> ImageAccess:
    """A signed URL's `exp`, `sig` (and `a`), else the bearer token (401 without either). With both, the
    token is the fallback: the owner still gets an image whose URL (from an old status) has expired."""
    if exp is not None and sig is not None:
        owner = None
        if "authorization" in request.headers:
            with contextlib.suppress(Unauthorized):  # the signature decides; a bad token changes nothing
                owner = user_from_credentials(request, await bearer_scheme(request)).id
        return ImageAccess(user_id=owner, signature=ImageSignature(exp, sig, a))
    return ImageAccess(user_id=user_from_credentials(request, await bearer_scheme(request)).id)


Access = Annotated[ImageAccess, Depends(image_access)]


def _matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match holds `*` or this ETag (weak or strong) among its comma-separated values."""
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


@router.get(
    "/images/{queue_id}/{index}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}}},
        206: {"description": "The bytes a Range header asked for"},
        302: {"description": "To a presigned URL on the image store (S3 with S3_PUBLIC_URL)"},
        304: {"description": "Not modified (If-None-Match)"},
        404: {"description": "No such image, or its bytes are gone (the detail says which)"},
        416: {"description": "Range not satisfiable"},
        503: {"description": "The image store is unreachable, or a thumbnail is still being made: retry after "
                             "`Retry-After`"},
    },
)
async def get_image(
    queue_id: str,
    index: int,
    request: Request,
    service: Service,
    settings: AppSettings,
    access: Access,
    thumb: Annotated[bool, Query(description="the ~256 px WebP thumbnail")] = False,
) -> Response:
    """A succeeded image's bytes (or its thumbnail's), streamed or redirected to the image store."""
    image = await service.image_for(queue_id, index, user_id=access.user_id, signature=access.signature)
    try:
        url = await service.images.presigned_url(image, thumb, settings.image_url_ttl_seconds)
        if url is not None:
            return RedirectResponse(url, status_code=302, headers={"Cache-Control": REDIRECT_CACHE_CONTROL})
        stream = await service.images.open(image, thumb, None)
        if stream.etag and _matches(request.headers.get("if-none-match", ""), stream.etag):
            await stream.aclose()
            return Response(status_code=304, headers={"ETag": stream.etag, "Cache-Control": CACHE_CONTROL})
        try:
            # If-Range: the range only while the image is the one the client has part of, else all of it.
            if_range = request.headers.get("if-range")
            ranged = if_range is None or if_range.strip() == stream.etag
            byte_range = parse_range(request.headers.get("range") if ranged else None, stream.size)
        except RangeNotSatisfiable:
            await stream.aclose()
            return Response(status_code=416, headers={"Content-Range": f"bytes */{stream.size}"})
        if byte_range is not None and byte_range != (0, stream.size):
            await stream.aclose()
            stream = await service.images.open(image, thumb, byte_range)
    except ImageGone as exc:
        raise NotFound(exc.message) from None
    except ThumbnailBusy as exc:
        raise ServiceUnavailable(exc.message, retry_after=2) from None
    except StoreUnavailable as exc:
        raise ServiceUnavailable(f"image store unavailable: {exc.message}") from None
    ext = EXTENSIONS.get(stream.content_type, "bin")
    headers = {
        "Cache-Control": CACHE_CONTROL,
        "ETag": stream.etag,
        "Accept-Ranges": "bytes",
        "Content-Length": str(stream.stop - stream.start),
        "Content-Disposition": f'inline; filename="{queue_id}-{index}{"-thumb" if thumb else ""}.{ext}"',
        "X-Content-Type-Options": "nosniff",
    }
    status = 206 if stream.partial else 200
    if stream.partial:
        headers["Content-Range"] = f"bytes {stream.start}-{stream.stop - 1}/{stream.size}"
    if request.method == "HEAD":  # what a download tool checks first: the headers, none of the bytes
        await stream.aclose()
        return Response(status_code=status, headers=headers, media_type=stream.content_type)
    return StreamingResponse(stream.chunks, status_code=status, headers=headers,
                             media_type=stream.content_type, background=BackgroundTask(stream.aclose))


# HEAD (what download tools ask first): the same answer without the bytes; one OpenAPI entry, the GET's.
router.add_api_route("/images/{queue_id}/{index}", get_image, methods=["HEAD"], response_class=Response,
                     include_in_schema=False)


@router.get(
    "/images/{queue_id}/{index}/preview",
    response_class=Response,
    responses={
        200: {"content": {"image/webp": {}}},
        404: {"description": "No such image, it is not running, or it has no preview yet (the detail says which)"},
    },
)
async def get_preview(
    queue_id: str,
    index: int,
    service: Service,
    access: Access,
    v: Annotated[int | None, Query(description="the preview the URL was made for (the latest is sent)")] = None,
) -> Response:
    """A running image's latest in-progress preview: a small WebP, replaced as its steps go on and
    gone once the image finishes (then its `url` has the image). Signed like the image's URL."""
    data = await service.preview_for(queue_id, index, user_id=access.user_id, signature=access.signature)
    return Response(data, media_type="image/webp", headers={
        "Cache-Control": PREVIEW_CACHE_CONTROL,
        "Content-Disposition": f'inline; filename="{queue_id}-{index}-preview.webp"',
        "X-Content-Type-Options": "nosniff",
    })
