"""Shared HTTP plumbing of the network providers: errors from answers, Retry-After, base64 images."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import email.utils
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import orjson
import pybase64

from app.services.providers.base import (
    GeneratedImage,
    ImageRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
)

ERROR_TEXT_CHARS = 500  # how much of a provider's unstructured error body a message keeps
# Base64 payloads up to this size decode on the event loop: pybase64's SIMD decoder takes about
# 0.15 ms for a 1024x1024 PNG's 3.5 MB (the standard library's about 8 ms, holding the GIL).
_SIMD = "C extension active" in pybase64.get_version() and "No SIMD" not in pybase64.get_version()
INLINE_B64_CHARS = (16 << 20) if _SIMD else (256 << 10)
_IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"RIFF", "image/webp"))


def content_type(data: bytes) -> str:
    """The image type from its first bytes (PNG, JPEG, WebP), else application/octet-stream."""
    for magic, ctype in _IMAGE_MAGIC:
        if data.startswith(magic):
            return ctype
    return "application/octet-stream"


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_text(response: httpx.Response) -> str:
    """The provider's own words: OpenAI's error.message, A1111's detail/error/errors, else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:ERROR_TEXT_CHARS] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        # A1111 puts an exception class in "error" and the words in "detail" or "errors".
        parts = [_detail_text(body[k]) for k in ("detail", "errors") if body.get(k)]
        if parts or body.get("error"):
            return ": ".join(dict.fromkeys(parts)) or str(body["error"])
    return str(body)[:ERROR_TEXT_CHARS]


def _detail_text(detail: object) -> str:
    """FastAPI's 422 detail is a list of {"loc", "msg"}: say "body.width: value is not an integer"."""
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        return "; ".join(".".join(map(str, d.get("loc", ()))) + f": {d['msg']}" for d in detail)
    return str(detail)


def _b64(payload: str) -> bytes:
    # What base64.b64decode(validate=True) does (nothing but the alphabet and closing padding), with
    # SIMD: 50 times the standard library's speed, which had been a quarter of the worker's CPU.
    return pybase64.b64decode(payload, validate=True)


async def decode_b64(payload: str) -> bytes:
    """Base64 (or a data: URL) to bytes; large images decode off the loop, so other generations are not stalled."""
    if payload.startswith("data:"):
        payload = payload.split(",", 1)[-1]
    if len(payload) > INLINE_B64_CHARS:
        return await asyncio.get_running_loop().run_in_executor(None, _b64, payload)
    return _b64(payload)


class HttpProvider:
    """Shared request/response handling of the HTTP providers; subclasses set `name` and `generate`."""

    name = "http"

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, *, api_key: str | None, model: str | None, timeout: float
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        # Messages end up in job status and logs: never show credentials from the URL.
        self._shown_url = str(httpx.URL(self.base_url).copy_with(userinfo=b""))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _error(self, cls: type[ProviderError], text: str, **kwargs: Any) -> ProviderError:
        message = f"{self.name}: {text}"
        if self.api_key:
            # A provider may echo the key back in its error body.
            message = message.replace(self.api_key, "***")
        return cls(message, **kwargs)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One call; timeouts, connection errors, 429 and 5xx become retryable errors, other answers return
        (with `stream`, before their body is read: the caller closes them)."""
        timeout = self.timeout if timeout is None else timeout
        request = self.client.build_request(
            method, self.base_url + path, json=body, params=params, headers=self._headers(), timeout=timeout
        )
        with self._transport_errors(timeout):
            response = await self.client.send(request, stream=stream)
        status = response.status_code
        if status == 429 or status >= 500:
            if stream:
                with self._transport_errors(timeout):
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
            raise self._error(
                ProviderRateLimited if status == 429 else ProviderUnavailable,
                f"{status} {error_text(response)}",
                retryable=True,
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        return response

    @contextlib.contextmanager
    def _transport_errors(self, timeout: float) -> Iterator[None]:
        """Timeouts and connection errors, while sending or while reading a streamed body, as retryable errors."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise self._error(ProviderUnavailable, f"timed out after {timeout:g}s", retryable=True) from exc
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise self._error(
                ProviderUnavailable, f"cannot connect to {self._shown_url}: {reason}", retryable=True
            ) from exc

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self._answer(await self._request("POST", path, body=body))

    def _answer(self, response: httpx.Response) -> Any:
        """The JSON of a read answer; a 4xx (429 aside) or a body that is not JSON is a rejection."""
        status = response.status_code
        if status >= 400:
            raise self._error(ProviderRejected, f"{status} {error_text(response)}")
        try:
            return orjson.loads(response.content)  # a few MB of base64 parse several times faster than with json
        except ValueError:
            pass
        try:  # what orjson refuses and json takes: NaN, a byte-order mark, UTF-16, lone surrogates
            return json.loads(response.content)
        except ValueError as exc:
            raise self._error(
                ProviderRejected, f"returned no image: answered {status} with a body that is not JSON"
            ) from exc

    async def _image(self, b64: object) -> GeneratedImage:
        if not isinstance(b64, str) or not b64:
            raise self._error(ProviderRejected, "returned no image")
        try:
            data = await decode_b64(b64)
        except (binascii.Error, ValueError) as exc:
            raise self._error(ProviderRejected, "returned no image: its base64 does not decode") from exc
        if not data:
            raise self._error(ProviderRejected, "returned no image: it is empty")
        return GeneratedImage(data, content_type(data))

    async def interrupt(self, request: ImageRequest) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a Server-Sent Events body; an event's name stands in for a missing "type"."""
    name, data = "", []
    async for line in response.aiter_lines():
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            continue
        text, event_name, name, data = "\n".join(data), name, "", []
        if not text or text == "[DONE]":
            continue
        try:
            event = json.loads(text)
        except ValueError:
            continue
        if isinstance(event, dict):
            event.setdefault("type", event_name)
            yield event
