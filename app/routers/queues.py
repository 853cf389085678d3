"""Queue endpoints: create, status, cancel, retry, delete, active queues and history."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status

from app.core.conditional import if_none_match, not_modified, tagged
from app.core.errors import Unprocessable
from app.core.security import CurrentUser
from app.models.queue import CreateQueueRequest, HistoryPage, QueueList, QueueStatus, RetryRequest
from app.routers.deps import COMMON_RESPONSES, CREATE_RESPONSES, Service
from app.services.queue.queue_service import Tagged
from app.services.queue.states import QueueState

router = APIRouter(tags=["queues"], responses=COMMON_RESPONSES)
log = logging.getLogger("imagequeue.api")

MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_PAGE_INDEX = 2**31 - 1  # far past any queue's size; larger numbers are refused (422), not carried into Redis
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown queue, or someone else's"}}
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: If-None-Match names the answer's current ETag (every 200 carries one)"}
}


@router.post(
    "/create-queue", status_code=status.HTTP_201_CREATED, response_model=QueueStatus, responses=CREATE_RESPONSES
)
async def create_queue(
    body: CreateQueueRequest,
    request: Request,
    user: CurrentUser,
    service: Service,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> QueueStatus:
    """Create a queue of images from prompts or a template with variables."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise Unprocessable(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} characters", ("header", "Idempotency-Key")
        )
    result, replayed = await service.create(user.id, body, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        metrics = request.app.state.metrics
        metrics.queues_created.labels(result.model, result.priority.value).inc()
        metrics.images_created.labels(result.model).inc(result.total)
        log.info("queue %s created: %d image(s)", result.queue_id, result.total,
                 extra={"queue_id": result.queue_id, "user": user.id, "model": result.model, "images": result.total})
    return result


@router.get("/queue-status/{queue_id}", response_model=QueueStatus, responses={**_NOT_FOUND, **_NOT_MODIFIED})
async def queue_status(
    queue_id: str,
    request: Request,
    user: CurrentUser,
    service: Service,
    images_offset: Annotated[int, Query(ge=0, le=MAX_PAGE_INDEX)] = 0,
    images_limit: Annotated[
        int | None, Query(ge=0, le=MAX_PAGE_INDEX, description="0 = counts only; omitted = all")
    ] = None,
) -> QueueStatus:
    """A queue's status, counts, position, ETA and (a page of) its images; 304 while If-None-Match names it."""
    answer = await service.status_answer(
        user.id, queue_id, images_offset=images_offset, images_limit=images_limit, known=_known(request)
    )
    # The hot polling path: the service's bytes go out as they are (no re-validation of its own data).
    return _tagged(answer)  # type: ignore[return-value]


@router.post(
    "/cancel-queue/{queue_id}",
    response_model=QueueStatus,
    responses={**_NOT_FOUND, 409: {"description": "Queue already completed or failed"}},
)
async def cancel_queue(queue_id: str, user: CurrentUser, service: Service) -> QueueStatus:
    """Cancel a queue: pending images at once, running ones stopped and discarded."""
    result = await service.cancel(user.id, queue_id)
    log.info("queue %s cancelled", queue_id, extra={"queue_id": queue_id, "user": user.id})
    return result


@router.post(
    "/retry-queue/{queue_id}",
    response_model=QueueStatus,
    responses={
        **_NOT_FOUND,
        409: {"description": "Queue still running, or nothing to retry"},
        422: {"description": "The retry would run more images than the per-user pending limit"},
        429: CREATE_RESPONSES[429],
    },
)
async def retry_queue(
    queue_id: str, user: CurrentUser, service: Service, body: RetryRequest | None = None
) -> QueueStatus:
    """Run a finished queue's failed (and optionally cancelled) images again."""
    result = await service.retry(user.id, queue_id, bool(body and body.include_cancelled))
    log.info("queue %s retried", queue_id, extra={"queue_id": queue_id, "user": user.id, "images": result.pending})
    return result


@router.delete(
    "/queue/{queue_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**_NOT_FOUND, 409: {"description": "Queue still running"}},
)
async def delete_queue(queue_id: str, user: CurrentUser, service: Service) -> Response:
    """Delete a finished queue and its images now."""
    await service.delete(user.id, queue_id)
    log.info("queue %s deleted", queue_id, extra={"queue_id": queue_id, "user": user.id})
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/active-queues", response_model=QueueList, responses=_NOT_MODIFIED)
async def active_queues(request: Request, user: CurrentUser, service: Service) -> QueueList:
    """The user's queues that have not finished, newest first (without images)."""
    return _tagged(await service.active_answer(user.id, _known(request)))  # type: ignore[return-value]


@router.get("/history", response_model=HistoryPage, responses=_NOT_MODIFIED)
async def history(
    request: Request,
    user: CurrentUser,
    service: Service,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_PAGE_INDEX)] = 0,
    status: Annotated[QueueState | None, Query()] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    search: Annotated[str | None, Query(max_length=200)] = None,
    images_limit: Annotated[
        int | None, Query(ge=0, le=MAX_PAGE_INDEX, description="First N images of each queue (0 = none); omitted = all")
    ] = None,
) -> HistoryPage:
    """The user's finished queues within the TTL, newest first, with their images."""
    answer = await service.history_answer(
        user.id, limit=limit, offset=offset, status=status, tag=tag, search=search, images_limit=images_limit,
        known=_known(request),
    )
    return _tagged(answer)  # type: ignore[return-value]


def _known(request: Request) -> list[str] | None:
    """The tags of the copies the client holds (If-None-Match)."""
    return if_none_match(request.headers.get("if-none-match"))


def _tagged(answer: Tagged) -> Response:
    return not_modified(answer.etag) if answer.body is None else tagged(answer.body, answer.etag)
