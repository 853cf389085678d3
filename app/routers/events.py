"""Live progress as Server-Sent Events, replayable with Last-Event-ID."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.core.errors import Unauthorized, Unprocessable
from app.core.security import (
    CurrentUser,
    User,
    bearer_scheme,
    stream_token,
    user_from_credentials,
    verify_stream_token,
)
from app.routers.deps import COMMON_RESPONSES, AppSettings, Service
from app.services.queue.queue_service import QueueEvent

router = APIRouter(tags=["events"], responses=COMMON_RESPONSES)

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


async def _stream(
    request: Request, batches: AsyncGenerator[list[QueueEvent], None], *, end: dict[str, str] | None
) -> AsyncIterator[ServerSentEvent]:
    """The events as SSE; `end` is sent after a queue's final event. A comment goes first, so a client
    (or a proxy) waiting for the body's first bytes knows the stream is open before any event or ping."""
    yield ServerSentEvent(comment="open")
    async with aclosing(batches):
        async for batch in batches:
            for event in batch:
                yield ServerSentEvent(data=json.dumps(event.data), event=event.type, id=event.id)
            if await request.is_disconnected():
                return
    if end is not None:
        yield ServerSentEvent(data=json.dumps(end), event="end")


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


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Who reads an event stream, and from where (None: from the start, or from now on)."""

    user: User
    resume_from: str | None


async def stream_request(
    request: Request,
    token: Annotated[str | None, Query(max_length=1024)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    resume: Annotated[str | None, Query(alias="last_event_id", max_length=64)] = None,
) -> StreamRequest:
    """The reader (bearer header or `?token=`) and its resume point, both checked before the stream starts."""
    return StreamRequest(await _user(request, token), _resume_from(last_event_id, resume))


Stream = Annotated[StreamRequest, Depends(stream_request)]


@router.get("/queue-events/{queue_id}", response_class=EventSourceResponse)
async def queue_events(queue_id: str, request: Request, service: Service, stream: Stream) -> EventSourceResponse:
    """The queue's events from the start (or after Last-Event-ID), then live, ending with the final one."""
    batches = await service.events(stream.user.id, queue_id, stream.resume_from)
    return EventSourceResponse(_stream(request, batches, end={"queue_id": queue_id}), ping=PING_SECONDS)


@router.get("/events", response_class=EventSourceResponse)
async def user_events(request: Request, service: Service, stream: Stream) -> EventSourceResponse:
    """Every event of all the user's queues, live (from Last-Event-ID when reconnecting)."""
    # Without a resume point, from now on: resolved before the response starts, so an unreachable Redis
    # is a 503.
    batches = await service.events(stream.user.id, None, stream.resume_from)
    return EventSourceResponse(_stream(request, batches, end=None), ping=PING_SECONDS)
