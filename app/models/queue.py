"""Request and response schemas of the queue endpoints (the HTTP contract)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.services.queue.states import ImageStatus, Priority, QueueState, WebhookEvent

MAX_SEED = 2**53
MAX_PARAMS_DEPTH = 32  # arrays and objects inside params
OutputFormat = Literal["png", "webp", "jpeg"]


def _valid_text(value: str) -> str:
    """JSON can carry a lone surrogate escape ("\\ud800"), which no UTF-8 text holds: refused here, so it
    never reaches Redis (whose client would fail to encode it) or a provider."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone surrogate ({value[exc.start]!r} at position {exc.start}); send valid Unicode"
        ) from None
    return value


def _valid_json_text(value: Any, depth: int = 0) -> Any:
    """A JSON value every program can read back: text as _valid_text, numbers finite and within 64
    bits (NaN, Infinity and 1e999 parse in Python, but no strict JSON writer or reader takes them),
    and nesting at most MAX_PARAMS_DEPTH deep."""
    if depth > MAX_PARAMS_DEPTH:
        raise ValueError(f"nested more than {MAX_PARAMS_DEPTH} levels deep")
    if isinstance(value, str):
        return _valid_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"numbers must be finite, not {value!r}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError("integers must fit in 64 bits")
    if isinstance(value, dict):
        for key, item in value.items():
            _valid_text(key)
            _valid_json_text(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _valid_json_text(item, depth + 1)
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
Params = Annotated[dict[str, Any], AfterValidator(_valid_json_text)]

_CREATE_EXAMPLE: dict[str, Any] = {
    "prompt": "a {colour} {animal}, watercolour",
    "variables": {"colour": ["red", "blue"], "animal": ["fox", "owl"]},
    "count": 2,
    "seed": 42,
    "width": 512,
    "height": 512,
    "priority": "normal",
    "name": "animals",
    "tags": ["demo"],
}


class CreateQueueRequest(BaseModel):
    """A batch: `prompts`, or a `prompt` template with `variables`, times `count`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [_CREATE_EXAMPLE, {"prompts": ["a red fox", "a blue owl"], "count": 3}]}
    )

    prompts: list[Text] | None = Field(default=None, description="Prompts, one image set each")
    prompt: Text | None = Field(default=None, description="Template with {name} placeholders")
    variables: dict[Text, list[Text]] | None = Field(default=None, description="Values per placeholder")
    count: int = Field(default=1, ge=1, strict=True, description="Images per prompt")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True, description="Image i gets seed + i")
    width: int = Field(default=1024, ge=64, strict=True)
    height: int = Field(default=1024, ge=64, strict=True)
    negative_prompt: Text | None = None
    params: Params = Field(default_factory=dict, description="Passed through to the provider")
    priority: Priority = Priority.NORMAL
    model: Text | None = Field(default=None, description="One of GET /models; null means the default")
    name: Text | None = Field(default=None, max_length=200)
    tags: list[Text] = Field(default_factory=list)
    webhook_url: Text | None = Field(default=None, description="POSTed on start, per image and on completion")
    webhook_events: list[Text] | None = Field(
        default=None, description=f"Subset of {', '.join(WebhookEvent)} (default: all)"
    )
    output_format: OutputFormat = Field(
        default="png", description="png (what the model produced, lossless), webp or jpeg"
    )
    output_quality: int | None = Field(
        default=None, ge=1, le=100, strict=True, description="1-100, for webp and jpeg (default 90)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> CreateQueueRequest:
        if (self.prompts is None) == (self.prompt is None):
            raise ValueError("give either 'prompts' (a list) or 'prompt' (a template), not both or neither")
        if self.variables is not None and self.prompt is None:
            raise ValueError("'variables' go with a 'prompt' template")
        return self


class GenerateRequest(BaseModel):
    """One image, run as a one-image high-priority queue."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"prompt": "a lighthouse at dusk", "seed": 7, "width": 512, "height": 512}]}
    )

    prompt: Text
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    width: int = Field(default=1024, ge=64, strict=True)
    height: int = Field(default=1024, ge=64, strict=True)
    negative_prompt: Text | None = None
    params: Params = Field(default_factory=dict)
    model: Text | None = None


class RetryRequest(BaseModel):
    """Which images of a finished queue to run again."""

    include_cancelled: bool = False


class ImageProgress(BaseModel):
    step: int
    steps: int
    fraction: float = Field(description="step / steps, from 0 to 1")


class ImageResult(BaseModel):
    index: int
    prompt: str
    seed: int
    status: ImageStatus
    url: str | None = None
    thumbnail_url: str | None = Field(default=None, description="A WebP of about 256 px on its longest side")
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    progress: ImageProgress | None = Field(
        default=None, description="A running image's steps, where its provider reports them"
    )
    preview_url: str | None = Field(
        default=None, description="A running image's latest in-progress preview (a small WebP), once it has one"
    )


class QueueStatus(BaseModel):
    queue_id: str
    name: str | None = None
    status: QueueState
    priority: Priority
    model: str
    tags: list[str] = Field(default_factory=list)
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    progress: float
    position: int | None = None
    eta_seconds: float | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    attempt: int = 1
    webhook: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list, description="e.g. no live worker serves the model")
    images: list[ImageResult] | None = None
    images_offset: int | None = None
    images_limit: int | None = None


class QueueList(BaseModel):
    queues: list[QueueStatus]


class HistoryPage(BaseModel):
    queues: list[QueueStatus]
    total: int


class GenerateResult(BaseModel):
    queue_id: str
    image: ImageResult


class WorkerClock(BaseModel):
    name: str
    host: str | None = None
    clock_offset_ms: int | None = None  # the worker host's clock minus Redis's, as last measured


class Health(BaseModel):
    status: str
    redis: bool
    workers: int
    worker_concurrency: int = 0
    models: dict[str, Any] = Field(default_factory=dict)
    clocks: list[WorkerClock] = Field(default_factory=list)
    image_store: dict[str, Any] | None = Field(default=None, description="kind, location, reachable")
    warnings: list[str] = Field(default_factory=list)
