"""The provider contract: what one image request is, what comes back, how a provider fails."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from app.services.providers.progress import ProgressCallback


class ProviderKind(StrEnum):
    """The protocols a model can be served with: the one definition of the kinds."""

    PROCEDURAL = "procedural"
    OPENAI = "openai"
    AUTOMATIC1111 = "automatic1111"
    COMFYUI = "comfyui"

    @classmethod
    def parse(cls, value: object, where: str = "") -> ProviderKind:
        """The kind named `value`; a ValueError saying `where` and listing the known kinds otherwise."""
        try:
            return cls(str(value))
        except ValueError:
            known = ", ".join(k.value for k in cls)
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}unknown provider kind {str(value)!r} (known: {known})") from None


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
    # Called with each Progress while the image runs (see progress.py); None: nobody listens.
    on_progress: ProgressCallback | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    data: bytes
    content_type: str = "image/png"


class ProviderError(Exception):
    """A provider failed; `message` is the provider's own words where it gave any."""

    kind: ClassVar[str] = "rejected"  # the outcome label of metrics

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class ProviderRateLimited(ProviderError):
    """429 from the provider."""

    kind = "rate_limited"


class ProviderUnavailable(ProviderError):
    """5xx, timeout or connection failure."""

    kind = "unavailable"


class ProviderRejected(ProviderError):
    """A 4xx other than 429, or an answer that holds no image: retrying will not help."""


class ImageProvider(Protocol):
    """One attempt at one image against one backend."""

    name: str

    async def generate(self, request: ImageRequest) -> GeneratedImage: ...

    async def interrupt(self, request: ImageRequest) -> None: ...

    async def aclose(self) -> None:
        """Releases what the provider keeps between images (ComfyUI's progress socket)."""
        ...


# A provider's Retry-After is honoured up to this long; beyond it is more likely a mistake than a plan.
MAX_RETRY_AFTER_SECONDS = 300.0

# Request fields a user's `params` may not set: they are the request's own (prompt, seed, size) or
# the operator's (model, how many images one request makes, server-side scripts and settings).
# The API refuses them with a 422; providers also apply them last, so they hold regardless.
RESERVED_PARAMS: dict[ProviderKind, frozenset[str]] = {
    ProviderKind.PROCEDURAL: frozenset(),
    ProviderKind.OPENAI: frozenset({
        "prompt", "n", "size", "response_format", "model", "user", "stream", "partial_images",
    }),
    ProviderKind.AUTOMATIC1111: frozenset({
        "prompt", "negative_prompt", "seed", "width", "height", "batch_size", "n_iter", "override_settings",
        "override_settings_restore_afterwards", "script_name", "script_args", "send_images", "save_images",
        # A second pass or a second model would get around the size limit and the operator's model;
        # server-side scripts and infotext can set anything at all.
        "enable_hr", "firstphase_width", "firstphase_height", "alwayson_scripts", "infotext",
    }),
    ProviderKind.COMFYUI: frozenset({"prompt", "negative_prompt", "seed", "width", "height", "model"}),
}
# Whole families: the hires-fix pass (`hr_scale`, `hr_resize_x`, `hr_checkpoint_name`, and the variants
# of Forge and SD.Next) and the refiner (`refiner_checkpoint`, `refiner_switch_at`, ...).
RESERVED_PREFIXES: dict[ProviderKind, tuple[str, ...]] = {ProviderKind.AUTOMATIC1111: ("hr_", "refiner_")}


def is_reserved(key: str, kind: ProviderKind) -> bool:
    """Whether `params` may not set `key` for a provider of `kind`."""
    return key in RESERVED_PARAMS[kind] or key.startswith(RESERVED_PREFIXES.get(kind, ()))


def request_values(request: ImageRequest) -> dict[str, Any]:
    """The request's own fields under the names the A1111 and ComfyUI protocols use."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or "",
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
    }


def provider_params(params: Mapping[str, Any], kind: ProviderKind) -> dict[str, Any]:
    """A request's params less the fields reserved for the request and the operator."""
    return {k: v for k, v in params.items() if not is_reserved(k, kind)}
