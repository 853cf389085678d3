"""A Python client of the imagequeue API on httpx: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("http://localhost:8000", token) as iq:
        queue = iq.create({"prompts": ["a red fox", "a blue owl"], "count": 2, "seed": 42})
        final = iq.wait(queue["queue_id"], on_event=print)  # follows the live events to the end
        for image in final["images"]:
            if image["status"] == "succeeded":
                iq.download(image["url"]).save(f"out/{image['index']}")  # out/0.png, ...

The protocol is written once: requests, answers turned into errors (`ImageQueueError` and its
subclasses, each a one-line message), Server-Sent Events decoded, 429 and 503 answers waited out
(`Retry-After`), a dropped event stream resumed from its `Last-Event-ID`. The two classes differ
only in how they do I/O. The bearer token is sent to the server's own origin only, so an image URL
that redirects to an object store (or is one) never receives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx

DEFAULT_TIMEOUT_SECONDS = 30.0
STREAM_READ_TIMEOUT_SECONDS = 60.0  # the server pings an idle event stream every 15 s
WAIT_BUDGET_SECONDS = 600.0  # how long one call waits out 429 and 503 answers in all
RECONNECT_BUDGET_SECONDS = 60.0  # how long a lost connection is retried (once the server has answered)
DEFAULT_RETRY_AFTER_SECONDS = 5.0
RECONNECT_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
USER_AGENT = "imagequeue-client/1"


class ImageQueueError(Exception):
    """Base of the client's errors; `str(error)` is one line fit to show a user."""


class Unreachable(ImageQueueError):
    """The server could not be reached, or the connection to it was lost."""


class APIError(ImageQueueError):
    """The server answered with an error: `status`, its `detail`, the `field` it names (422), `retry_after`."""

    def __init__(self, status: int, detail: str, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.retry_after = retry_after


class Unauthorized(APIError):
    """401: a missing, malformed, expired or wrongly signed token."""


class NotFound(APIError):
    """404: an unknown queue, or someone else's."""


class Conflict(APIError):
    """409: the queue's state forbids it (cancelling a completed queue, say)."""


class InvalidRequest(APIError):
    """400, 413 or 422: the server refused the request's content."""


class RateLimited(APIError):
    """429: past the user's admission limits."""


class Unavailable(APIError):
    """502, 503 or 504: the server or its store is briefly away."""


_ERRORS: dict[int, type[APIError]] = {
    400: InvalidRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: InvalidRequest,
    422: InvalidRequest, 429: RateLimited, 502: Unavailable, 503: Unavailable, 504: Unavailable,
}
_LOCATIONS = ("body", "query", "path", "header")

WaitHook = Callable[[ImageQueueError, float], None]
"""Told before each wait: the error being waited out and the seconds it will wait."""


def new_idempotency_key() -> str:
    return f"iq-{uuid.uuid4().hex}"


def _retry_after(value: str | None) -> float | None:
    """Seconds from Retry-After. The API sends delta-seconds; anything else (a proxy's HTTP date) is unknown."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def api_error(response: httpx.Response) -> APIError:
    """The error an unsuccessful answer stands for, with FastAPI's 422 list reduced to its first field."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail: Any = body.get("detail") if isinstance(body, dict) else None
    where: str | None = None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(p) for p in first.get("loc", []) if p not in _LOCATIONS) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        detail = message + (f" (and {len(detail) - 1} more problems)" if len(detail) > 1 else "")
    elif not isinstance(detail, str):
        detail = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    kind = _ERRORS.get(response.status_code, APIError)
    return kind(response.status_code, detail, where, _retry_after(response.headers.get("Retry-After")))


def _unreachable(base: httpx.URL, exc: httpx.TransportError) -> Unreachable:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        reason = f"timed out ({reason})" if str(exc) else "timed out"
    return Unreachable(f"cannot reach the server at {base}: {reason}")


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a queue: its `type` (queue, image, image.progress, …), JSON `data` and `id`."""

    type: str
    data: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class Downloaded:
    """An image's bytes and media type."""

    content: bytes
    content_type: str

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.content_type.split(";")[0].strip().lower(), "bin")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the image (whole or not at all, folders created); adds its type's extension when `path` has none."""
        target = Path(path)
        if not target.suffix:
            target = target.with_name(f"{target.name}.{self.extension}")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, self.content)
        return target


def write_atomic(path: Path, data: bytes) -> None:
    """Writes a temporary file beside `path` and renames it into place: a reader never sees half a file."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        part.write_bytes(data)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _json(response: httpx.Response) -> Any:
    return response.json() if response.content else None


def _downloaded(response: httpx.Response) -> Downloaded:
    return Downloaded(response.content, response.headers.get("content-type", "application/octet-stream"))


@dataclass(frozen=True)
class _Call:
    """One request and how to read its successful answer."""

    method: str
    url: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    read: Callable[[httpx.Response], Any] = _json
    follow_redirects: bool = False
    timeout: httpx.Timeout | None = None

    def kwargs(self) -> dict[str, Any]:
        args: dict[str, Any] = {"method": self.method, "url": self.url, "params": self.params, "json": self.json,
                                "headers": dict(self.headers), "follow_redirects": self.follow_redirects}
        if self.timeout is not None:
            args["timeout"] = self.timeout
        return args

    def result(self, response: httpx.Response) -> Any:
        if not response.is_success:
            raise api_error(response)
        return self.read(response)


class _Bearer(httpx.Auth):
    """The token on requests to the server's own origin only (redirects elsewhere lose it in httpx too);
    `answered` once any response came back, from which point a lost connection is worth retrying."""

    def __init__(self, token: str | None, base: httpx.URL) -> None:
        self.token = token
        self.origin = (base.scheme, base.host, base.port)
        self.answered = False

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.token and (request.url.scheme, request.url.host, request.url.port) == self.origin:
            request.headers["Authorization"] = f"Bearer {self.token}"
        yield request
        self.answered = True


class _Patience:
    """`with patience:` around one attempt. An answer worth waiting out (429, 503) is swallowed while the
    budget lasts, `delay` set to its Retry-After. A connection lost once the server has answered (it
    restarted, a proxy cut it) is retried with back-off for RECONNECT_BUDGET_SECONDS; a server never
    reached fails at once. What is not retried leaves as is, transport errors as `Unreachable`."""

    def __init__(self, bearer: _Bearer, base: httpx.URL, on_wait: WaitHook) -> None:
        self.bearer = bearer
        self.base = base
        self.on_wait = on_wait
        self.deadline = time.monotonic() + WAIT_BUDGET_SECONDS
        self.delay = 0.0
        self._lost_since: float | None = None
        self._drops = 0

    def __enter__(self) -> _Patience:
        self.delay = 0.0
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if isinstance(exc, httpx.TransportError):
            lost = _unreachable(self.base, exc)
            if self.reconnects(lost):
                return True
            raise lost from exc
        return isinstance(exc, RateLimited | Unavailable) and self.waits_out(exc)

    def waits_out(self, exc: APIError) -> bool:
        delay = DEFAULT_RETRY_AFTER_SECONDS if exc.retry_after is None else exc.retry_after
        if time.monotonic() + delay > self.deadline:
            return False
        self.delay = delay
        self.on_wait(exc, delay)
        return True

    def reconnects(self, lost: Unreachable) -> bool:
        now = time.monotonic()
        self._lost_since = self._lost_since or now
        if not self.bearer.answered or now - self._lost_since > RECONNECT_BUDGET_SECONDS:
            return False
        self.delay = RECONNECT_DELAYS_SECONDS[min(self._drops, len(RECONNECT_DELAYS_SECONDS) - 1)]
        self._drops += 1
        self.on_wait(lost, self.delay)
        return True

    def connected(self) -> None:
        self._lost_since, self._drops = None, 0


class _EventStream:
    """One queue's events across reconnections: SSE decoding, the Last-Event-ID to resume from, and (as
    `with stream:` around one connection) what to do when it drops: wait and reconnect, or give up."""

    def __init__(self, patience: _Patience, queue_id: str, last_event_id: str | None) -> None:
        self.patience = patience
        self.queue_id = queue_id
        self.last_id = last_event_id
        self.ended = False
        self._type = ""
        self._data: list[str] = []
        self._id: str | None = None

    @property
    def delay(self) -> float:
        return self.patience.delay

    def call(self) -> _Call:
        headers = {"Accept": "text/event-stream"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        timeout = httpx.Timeout(DEFAULT_TIMEOUT_SECONDS, read=STREAM_READ_TIMEOUT_SECONDS)
        return _Call("GET", f"/queue-events/{self.queue_id}", headers=headers, timeout=timeout)

    def feed(self, line: str) -> Event | None:
        """One line of the stream in; an event out when the line completes one (the final `end` ends it)."""
        if not line:
            return self._dispatch()
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None  # also for comments (":" lines, the server's keep-alive pings)

    def _dispatch(self) -> Event | None:
        kind, data, event_id = self._type or "message", "\n".join(self._data), self._id
        self._type, self._data, self._id = "", [], None
        if not data and kind == "message":
            return None
        self.patience.connected()
        if event_id:
            self.last_id = event_id
        if kind == "end":
            self.ended = True
            return None
        try:
            decoded = json.loads(data) if data else {}
        except ValueError:
            decoded = {"raw": data}
        return Event(kind, decoded if isinstance(decoded, dict) else {"value": decoded}, event_id)

    def __enter__(self) -> _EventStream:
        self.patience.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None and self.ended:
            return False
        if exc is None or isinstance(exc, httpx.TransportError | Unreachable):
            # The connection failed, or closed before the final event: resume after the last event seen.
            reason = _unreachable(self.patience.base, exc) if isinstance(exc, httpx.TransportError) else exc
            lost = Unreachable(f"lost the event stream of queue {self.queue_id}: {reason or 'closed by the server'}")
            if self.patience.reconnects(lost):
                return True
            raise lost from exc
        return isinstance(exc, RateLimited | Unavailable) and self.patience.waits_out(exc)


J = TypeVar("J")  # what a JSON call returns: the decoded body, or an awaitable of it
D = TypeVar("D")  # what a download returns


class _API(Generic[J, D]):
    """The calls that are one request and one answer, written once: `_call` is a function in `Client`
    and a coroutine function in `AsyncClient`."""

    def __init__(self, url: str, token: str | None, on_wait: WaitHook | None) -> None:
        self.url = httpx.URL(url)
        self.on_wait: WaitHook = on_wait or (lambda error, seconds: None)
        self._bearer = _Bearer(token, self.url)

    def _options(self, timeout: float) -> dict[str, Any]:
        return {"base_url": self.url, "auth": self._bearer, "timeout": timeout,
                "headers": {"User-Agent": USER_AGENT, "Accept": "application/json"}}

    def _patience(self) -> _Patience:
        return _Patience(self._bearer, self.url, self.on_wait)

    def _stream(self, queue_id: str, last_event_id: str | None) -> _EventStream:
        return _EventStream(self._patience(), queue_id, last_event_id)

    def _call(self, call: _Call) -> Any:
        raise NotImplementedError

    def create(self, request: Mapping[str, Any], *, idempotency_key: str | None = None) -> J:
        """Creates a queue and returns its QueueStatus. The Idempotency-Key (a random one when none is given)
        makes a repeated create, here or in a later process, return the same queue instead of a second one."""
        headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
        return self._call(_Call("POST", "/create-queue", json=dict(request), headers=headers))

    def status(self, queue_id: str, *, images_offset: int = 0, images_limit: int | None = None) -> J:
        """The QueueStatus, with its images (a page of them with `images_limit`; 0 for counts only)."""
        params: dict[str, int] = {"images_offset": images_offset} if images_offset else {}
        if images_limit is not None:
            params["images_limit"] = images_limit
        return self._call(_Call("GET", f"/queue-status/{queue_id}", params=params))

    def cancel(self, queue_id: str) -> J:
        """Cancels the queue (a no-op on a cancelled one); returns its QueueStatus."""
        return self._call(_Call("POST", f"/cancel-queue/{queue_id}"))

    def retry(self, queue_id: str, *, include_cancelled: bool = False) -> J:
        """Runs a finished queue's failed (and, if asked, cancelled) images again."""
        body = {"include_cancelled": include_cancelled}
        return self._call(_Call("POST", f"/retry-queue/{queue_id}", json=body))

    def active(self) -> J:
        """`{"queues": [...]}`: the user's unfinished queues, newest first."""
        return self._call(_Call("GET", "/active-queues"))

    def history(self, *, limit: int = 20, offset: int = 0, status: str | None = None, tag: str | None = None,
                search: str | None = None, images_limit: int | None = None) -> J:
        """`{"queues": [...], "total": N}`: the user's finished queues, newest first."""
        given = {"status": status, "tag": tag, "search": search, "images_limit": images_limit}
        params = {"limit": limit, "offset": offset, **{k: v for k, v in given.items() if v is not None}}
        return self._call(_Call("GET", "/history", params=params))

    def download(self, url: str) -> D:
        """An image by its `url` from a status or an event (signed, relative or absolute), redirects followed."""
        return self._call(_Call("GET", url, read=_downloaded, follow_redirects=True))


class Client(_API[dict[str, Any], Downloaded]):
    """The blocking client. `on_wait(error, seconds)` is told before each wait for a 429, 503 or reconnect."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                 on_wait: WaitHook | None = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, token, on_wait)
        self._http = httpx.Client(**self._options(timeout), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, call: _Call) -> Any:
        patience = self._patience()
        while True:
            with patience:
                return call.result(self._http.request(**call.kwargs()))
            time.sleep(patience.delay)

    def _lines(self, call: _Call) -> Iterator[str]:
        with self._http.stream(**call.kwargs()) as response:
            if not response.is_success:
                response.read()
                call.result(response)
            yield from response.iter_lines()

    def events(self, queue_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The queue's events from the start (or after `last_event_id`), then live, until its final one;
        a dropped connection is resumed where it stopped."""
        stream = self._stream(queue_id, last_event_id)
        while not stream.ended:
            with stream:
                for line in self._lines(stream.call()):
                    if (event := stream.feed(line)) is not None:
                        yield event
            time.sleep(stream.delay)

    def wait(self, queue_id: str, *, on_event: Callable[[Event], object] | None = None) -> dict[str, Any]:
        """Follows the queue to its end (each event to `on_event`) and returns its final status."""
        for event in self.events(queue_id):
            if on_event is not None:
                on_event(event)
        return self.status(queue_id)


class AsyncClient(_API[Awaitable[dict[str, Any]], Awaitable[Downloaded]]):
    """The asyncio client: the same methods as `Client`, awaited (`events` is an async iterator)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                 on_wait: WaitHook | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, token, on_wait)
        self._http = httpx.AsyncClient(**self._options(timeout), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: _Call) -> Any:
        patience = self._patience()
        while True:
            with patience:
                return call.result(await self._http.request(**call.kwargs()))
            await asyncio.sleep(patience.delay)

    async def _lines(self, call: _Call) -> AsyncIterator[str]:
        async with self._http.stream(**call.kwargs()) as response:
            if not response.is_success:
                await response.aread()
                call.result(response)
            async for line in response.aiter_lines():
                yield line

    async def events(self, queue_id: str, *, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """As `Client.events`."""
        stream = self._stream(queue_id, last_event_id)
        while not stream.ended:
            with stream:
                async for line in self._lines(stream.call()):
                    if (event := stream.feed(line)) is not None:
                        yield event
            await asyncio.sleep(stream.delay)

    async def wait(self, queue_id: str, *, on_event: Callable[[Event], object] | None = None) -> dict[str, Any]:
        """As `Client.wait`."""
        async for event in self.events(queue_id):
            if on_event is not None:
                on_event(event)
        return await self.status(queue_id)
