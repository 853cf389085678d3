"""ImageService: one async interface over pluggable image providers.

Providers make one attempt at one image; ImageService adds retries with exponential backoff and
jitter (honouring Retry-After), and a shared RateGate so a provider's 429 slows every worker down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import hashlib
import random
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from PIL import Image, ImageDraw


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """One image to generate."""

    prompt: str
    seed: int
    width: int
    height: int
    negative_prompt: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None  # the provider-side model name, if any
    request_id: str = ""  # "<queue_id>:<index>", for logs and provider-side cancel


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    data: bytes
    content_type: str = "image/png"


class ProviderError(Exception):
    """A provider failed; `message` is the provider's own words where it gave any."""

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class ProviderRateLimited(ProviderError):
    """429 from the provider."""


class ProviderUnavailable(ProviderError):
    """5xx, timeout or connection failure."""


class ProviderRejected(ProviderError):
    """A 4xx other than 429, or an answer that holds no image: retrying will not help."""


class ImageProvider(Protocol):
    """One attempt at one image against one backend."""

    name: str

    async def generate(self, request: ImageRequest) -> GeneratedImage: ...

    async def interrupt(self, request: ImageRequest) -> None: ...


class RateGate(Protocol):
    """Shared back-off across every worker that calls the same provider."""

    async def wait(self) -> None: ...

    async def defer(self, seconds: float) -> None: ...


MAX_PROCEDURAL_LATENCY_MS = 60_000
# Request fields a user's `params` may not set: they are the request's own (prompt, seed, size) or
# the operator's (model, how many images one request makes, server-side scripts and settings).
# The API refuses them with a 422; providers also apply them last, so they hold regardless.
RESERVED_PARAMS: dict[str, frozenset[str]] = {
    "procedural": frozenset(),
    "openai": frozenset({"prompt", "n", "size", "response_format", "model", "user"}),
    "automatic1111": frozenset({
        "prompt", "negative_prompt", "seed", "width", "height", "batch_size", "n_iter", "override_settings",
        "override_settings_restore_afterwards", "script_name", "script_args", "send_images", "save_images",
    }),
    "comfyui": frozenset({"prompt", "negative_prompt", "seed", "width", "height", "model"}),
}
# Renders up to this size run on the event loop. Measured: even 64x64 renders (~0.2 ms) are better
# in the executor at 32 slots, since a burst of them on the loop delays every other slot's next claim.
INLINE_RENDER_PIXELS = 0


def _render(prompt: str, seed: int, width: int, height: int) -> bytes:
    """A vertical two-colour gradient with a few discs, all chosen by a hash of prompt and seed."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    rng = random.Random(digest)
    ends = Image.new("RGB", (1, 2))
    ends.putpixel((0, 0), (digest[0], digest[1], digest[2]))
    ends.putpixel((0, 1), (digest[3], digest[4], digest[5]))
    img = ends.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for _ in range(3 + digest[6] % 5):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(max(2, short // 10), max(3, short // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    return _png(img)


def _png(img: Image.Image) -> bytes:
    """An RGB image as PNG. Pillow's own PNG writer spends ~0.2 ms of fixed cost per image, which
    dominates small images at hundreds per second; the format is simple enough to write directly:
    signature, IHDR, one zlib-compressed IDAT of filter-0 rows, IEND."""
    width, height = img.size
    raw = img.tobytes()
    stride = width * 3
    rows = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b"")


class ProceduralProvider:
    """Built in, no network: a deterministic PNG from prompt + seed + size. With a simulated latency,
    a call takes that long in all, rendering included, as a model server's answer would."""

    name = "procedural"

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        fail = request.params.get("fail")
        try:
            latency = float(request.params.get("latency_ms", self.latency_ms))
        except (TypeError, ValueError):
            raise ProviderRejected("params.latency_ms must be a number of milliseconds") from None
        # A demo knob, not a way to hold a worker's slot: bounded (NaN compares false, so it becomes 0).
        latency = min(latency, MAX_PROCEDURAL_LATENCY_MS) if latency > 0 else 0.0
        started = time.monotonic()
        if fail:
            await asyncio.sleep(latency / 1000)
            raise ProviderRejected(str(fail))
        if request.width * request.height <= INLINE_RENDER_PIXELS:
            data = _render(request.prompt, request.seed, request.width, request.height)
        else:
            data = await asyncio.get_running_loop().run_in_executor(
                None, _render, request.prompt, request.seed, request.width, request.height
            )
        remaining = latency / 1000 - (time.monotonic() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)
        return GeneratedImage(data)

    async def interrupt(self, request: ImageRequest) -> None:
        return None


def _kind(exc: ProviderError) -> str:
    if isinstance(exc, ProviderRateLimited):
        return "rate_limited"
    if isinstance(exc, ProviderUnavailable):
        return "unavailable"
    return "rejected"


class ImageService:
    """Generates one image with retries, backoff and a shared rate gate."""

    def __init__(
        self,
        provider: ImageProvider,
        *,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        gate: RateGate | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.provider = provider
        self.observe = observe  # called after every attempt with its outcome kind and duration
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.gate = gate
        self._sleep = sleep

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        attempt = 0
        while True:
            if self.gate is not None:
                await self.gate.wait()
            started = time.monotonic()
            try:
                image = await self.provider.generate(request)
            except ProviderError as exc:
                self._observe(_kind(exc), started)
                if not exc.retryable or attempt >= self.max_retries:
                    if attempt:
                        raise type(exc)(
                            f"after {attempt + 1} attempts: {exc.message}",
                            retryable=exc.retryable,
                            retry_after=exc.retry_after,
                        ) from exc
                    raise
                delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, 300.0))
                if isinstance(exc, ProviderRateLimited) and self.gate is not None:
                    await self.gate.defer(delay)
                attempt += 1
                await self._sleep(delay)
            else:
                self._observe("ok", started)
                return image

    def _observe(self, kind: str, started: float) -> None:
        if self.observe is not None:
            self.observe(kind, time.monotonic() - started)

    async def interrupt(self, request: ImageRequest) -> None:
        await self.provider.interrupt(request)


_IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"RIFF", "image/webp"))


def provider_params(params: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A request's params less the fields reserved for the request and the operator."""
    reserved = RESERVED_PARAMS[kind]
    return {k: v for k, v in params.items() if k not in reserved}


def _content_type(data: bytes) -> str:
    for magic, ctype in _IMAGE_MAGIC:
        if data.startswith(magic):
            return ctype
    return "application/octet-stream"


def _retry_after(value: str | None) -> float | None:
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


def _error_text(response: httpx.Response) -> str:
    """The provider's own words: OpenAI's error.message, A1111's detail/error/errors, else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        # A1111 puts an exception class in "error" and the words in "detail" or "errors".
        parts = [_detail_text(body[k]) for k in ("detail", "errors") if body.get(k)]
        if parts or body.get("error"):
            return ": ".join(dict.fromkeys(parts)) or str(body["error"])
    return str(body)[:500]


def _detail_text(detail: object) -> str:
    """FastAPI's 422 detail is a list of {"loc", "msg"}: say "body.width: value is not an integer"."""
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        return "; ".join(".".join(map(str, d.get("loc", ()))) + f": {d['msg']}" for d in detail)
    return str(detail)


def _b64(payload: str) -> bytes:
    return base64.b64decode(payload, validate=True)


async def _decode_b64(payload: str) -> bytes:
    """Large images decode off the loop, so other generations are not stalled."""
    if len(payload) > 256 * 1024:
        return await asyncio.get_running_loop().run_in_executor(None, _b64, payload)
    return _b64(payload)


class _HttpProvider:
    """Shared request/response handling of the HTTP providers."""

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
    ) -> httpx.Response:
        """One call; timeouts, connection errors, 429 and 5xx become retryable errors, other answers return."""
        timeout = self.timeout if timeout is None else timeout
        try:
            response = await self.client.request(
                method, self.base_url + path, json=body, params=params, headers=self._headers(), timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise self._error(ProviderUnavailable, f"timed out after {timeout:g}s", retryable=True) from exc
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise self._error(
                ProviderUnavailable, f"cannot connect to {self._shown_url}: {reason}", retryable=True
            ) from exc
        status = response.status_code
        if status == 429:
            raise self._error(
                ProviderRateLimited,
                f"429 {_error_text(response)}",
                retryable=True,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if status >= 500:
            raise self._error(
                ProviderUnavailable,
                f"{status} {_error_text(response)}",
                retryable=True,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        return response

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = await self._request("POST", path, body=body)
        status = response.status_code
        if status >= 400:
            raise self._error(ProviderRejected, f"{status} {_error_text(response)}")
        try:
            return response.json()
        except ValueError as exc:
            raise self._error(
                ProviderRejected, f"returned no image: answered {status} with a body that is not JSON"
            ) from exc

    async def _image(self, b64: object) -> GeneratedImage:
        if not isinstance(b64, str) or not b64:
            raise self._error(ProviderRejected, "returned no image")
        try:
            data = await _decode_b64(b64.split(",", 1)[-1] if b64.startswith("data:") else b64)
        except (binascii.Error, ValueError) as exc:
            raise self._error(ProviderRejected, "returned no image: its base64 does not decode") from exc
        if not data:
            raise self._error(ProviderRejected, "returned no image: it is empty")
        return GeneratedImage(data, _content_type(data))

    async def interrupt(self, request: ImageRequest) -> None:
        return None


class OpenAIProvider(_HttpProvider):
    """The OpenAI Images API (and compatible servers): POST {url}/images/generations."""

    name = "openai"

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        body: dict[str, Any] = provider_params(request.params, "openai")
        body.update(prompt=request.prompt, n=1, size=f"{request.width}x{request.height}", response_format="b64_json")
        if request.model or self.model:
            body["model"] = request.model or self.model
        answer = await self._post("/images/generations", body)
        data = answer.get("data") if isinstance(answer, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        return await self._image(first.get("b64_json"))


class Automatic1111Provider(_HttpProvider):
    """The Stable Diffusion web UI API (A1111, Forge, SD.Next): POST {url}/sdapi/v1/txt2img."""

    name = "automatic1111"

    def __init__(self, *args: Any, interrupt_on_cancel: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # /sdapi/v1/interrupt stops whatever the server is generating, so it is only safe when
        # the server runs one job at a time for this worker alone.
        self.supports_interrupt = interrupt_on_cancel

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        body: dict[str, Any] = provider_params(request.params, "automatic1111")
        body.update(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or "",
            seed=request.seed,
            width=request.width,
            height=request.height,
            batch_size=1,
            n_iter=1,
        )
        model = request.model or self.model
        if model:
            body["override_settings"] = {"sd_model_checkpoint": model}
        answer = await self._post("/sdapi/v1/txt2img", body)
        images = answer.get("images") if isinstance(answer, dict) else None
        return await self._image(images[0] if isinstance(images, list) and images else None)

    async def interrupt(self, request: ImageRequest) -> None:
        if not self.supports_interrupt:
            return
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(self.base_url + "/sdapi/v1/interrupt", headers=self._headers(), timeout=5)


def build_provider(
    kind: str,
    *,
    client: httpx.AsyncClient,
    url: str | None,
    api_key: str | None,
    model: str | None,
    timeout: float,
    procedural_latency_ms: float = 0.0,
) -> ImageProvider:
    """The provider of `kind`, sharing `client` for its HTTP calls."""
    if kind == "procedural":
        return ProceduralProvider(procedural_latency_ms)
    if kind in ("openai", "automatic1111"):
        if not url:
            raise ValueError(f"provider {kind!r} needs IMAGE_PROVIDER_URL (or a url in the model catalogue)")
        cls = OpenAIProvider if kind == "openai" else Automatic1111Provider
        return cls(client, url, api_key=api_key, model=model, timeout=timeout)
    if kind == "comfyui":
        raise ValueError("provider 'comfyui' needs a workflow: build it with providers.build_model_provider")
    raise ValueError(f"unknown provider {kind!r}; known: procedural, openai, automatic1111, comfyui")
