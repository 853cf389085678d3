"""Live progress as Server-Sent Events, replayable with Last-Event-ID."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.core.errors import NotFound, Unauthorized, Unprocessable
from app.core.security import (
    CurrentUser,
    User,
    bearer_scheme,
    sign_image,
    signature_expiry,
    stream_token,
    user_from_credentials,
    verify_stream_token,
)
from app.routers.deps import COMMON_RESPONSES, AppSettings, Service
from app.services.queue.queue_service import valid_queue_id
from app.services.queue.store import user_key

router = APIRouter(tags=["events"], responses=COMMON_RESPONSES)

BLOCK_MS = 1000
PING_SECONDS = 15
STREAM_TOKEN_TTL_SECONDS = 300
_EVENT_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
MAX_ID_PART = 2**64 - 1  # a Redis stream id is two unsigned 64-bit numbers


async def _user(request: Request, token: str | None) -> User:
    """Bearer header, or the short-lived `token` query parameter (EventSource cannot send headers)."""
    settings = request.app.state.settings
    if token:
        return verify_stream_token(settings, token)
    credentials = await bearer_scheme(request)
    if credentials is None:
        raise Unauthorized("missing bearer token or stream token (?token=, from POST /stream-token)")
    return user_from_credentials(request, credentials)


@router.post("/stream-token")
async def new_stream_token(user: CurrentUser, settings: AppSettings) -> dict[str, Any]:
    """A short-lived token for `?token=` on the event streams (for EventSource)."""
    return {
        "token": stream_token(settings, user.id, STREAM_TOKEN_TTL_SECONDS),
        "expires_in": STREAM_TOKEN_TTL_SECONDS,
    }


def _decorate(request: Request, data: dict[str, Any]) -> dict[str, Any]:
    if data.get("type") == "image" and data.get("status") == "succeeded":
        settings = request.app.state.settings
        qid, idx = data["queue_id"], int(data["index"])
        attempt = int(data.get("attempt", 0))
        if attempt:
            exp = signature_expiry(settings)
            sig = sign_image(settings, qid, idx, attempt, exp)
            data["url"] = f"/images/{qid}/{idx}?exp={exp}&sig={sig}"
    return data


async def _stream(request: Request, key: str, after: str, *, until_final: bool) -> AsyncIterator[ServerSentEvent]:
    redis = request.app.state.redis
    last = after
    while True:
        if await request.is_disconnected():
            return
        batch = await redis.xread({key: last}, block=BLOCK_MS, count=500)
        for _, entries in batch:
            for entry_id, fields in entries:
                last = entry_id.decode()
                raw = fields[b"d"]
                data = _decorate(request, json.loads(raw))
                yield ServerSentEvent(data=json.dumps(data), event=data.get("type", "message"), id=last)
                if until_final and data.get("final"):
                    yield ServerSentEvent(data=json.dumps({"queue_id": data["queue_id"]}), event="end")
                    return


def _resume_from(header: str | None, query: str | None) -> str | None:
    """The Last-Event-ID header (EventSource's own reconnects), else `last_event_id` in the query (a new
    EventSource, which cannot set headers, resuming where an earlier one stopped). Checked here, before
    the response starts: Redis refuses an id it cannot parse only once the stream is under way."""
    for value, loc in ((header, ("header", "Last-Event-ID")), (query, ("query", "last_event_id"))):
        if value:
            if not _valid_event_id(value):
                raise Unprocessable(f"{loc[1]} must be an event id as a stream sent it: <ms>-<seq>, each part "
                                    f"at most {MAX_ID_PART}", loc)
            return value
    return None


def _valid_event_id(value: str) -> bool:
    return bool(_EVENT_ID.match(value)) and all(int(part) <= MAX_ID_PART for part in value.split("-"))


@router.get("/queue-events/{queue_id}", response_class=EventSourceResponse)
async def queue_events(
    queue_id: str,
    request: Request,
    service: Service,
    token: Annotated[str | None, Query(max_length=1024)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    resume: Annotated[str | None, Query(alias="last_event_id", max_length=64)] = None,
) -> EventSourceResponse:
    """The queue's events from the start (or after Last-Event-ID), then live, ending with the final one."""
    user = await _user(request, token)
    if not valid_queue_id(queue_id):
        raise NotFound("queue not found")
    meta = await service.store.meta(queue_id)
    if meta is None or meta.get("uk") != user_key(user.id):
        raise NotFound("queue not found")
    key = service.store.queue_events_key(queue_id)
    after = _resume_from(last_event_id, resume) or "0-0"
    return EventSourceResponse(_stream(request, key, after, until_final=True), ping=PING_SECONDS)


@router.get("/events", response_class=EventSourceResponse)
async def user_events(
    request: Request,
    service: Service,
    token: Annotated[str | None, Query(max_length=1024)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    resume: Annotated[str | None, Query(alias="last_event_id", max_length=64)] = None,
) -> EventSourceResponse:
    """Every event of all the user's queues, live (from Last-Event-ID when reconnecting)."""
    user = await _user(request, token)
    key = service.store.user_events_key(user_key(user.id))
    # Without a resume point, from now on: resolved here, before the response starts, so an unreachable
    # Redis is a 503.
    after = _resume_from(last_event_id, resume) or await service.store.newest_event_id(key)
    return EventSourceResponse(_stream(request, key, after, until_final=False), ping=PING_SECONDS)
